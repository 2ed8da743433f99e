"""Thresholds from the evidence: the log α histogram's two modes, and a validation split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayescomp.compress import compress
from bayescomp.compress import thresholds as thr
from bayescomp.compress.masks import PruneError
from bayescomp.compress.thresholds import (
    ThresholdChoice,
    default_candidates,
    histogram_thresholds,
    split_modes,
    validation_split,
    validation_thresholds,
)
from bayescomp.convert import bayesianize
from bayescomp.train import TrainConfig, evaluate, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _bimodal(n_low: int, n_high: int, seed: int = 0, low=-8.0, high=4.0, sd_low=1.0, sd_high=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n_low, generator=g) * sd_low + low, torch.randn(n_high, generator=g) * sd_high + high])


# ---- split_modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["otsu", "gmm"])
@pytest.mark.parametrize("sizes", [(200, 200), (450, 50), (30, 600)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_modes_recovers_known_split(method, sizes, seed):
    scores = _bimodal(*sizes, seed=seed)
    c = split_modes(scores, method)
    assert isinstance(c, ThresholdChoice) and c.method == method
    assert -4.0 < c.value < 1.0, c
    assert float(c) == c.value
    # it separates the two generating modes exactly (they do not overlap at 1 sd and 12 apart)
    assert c.kept == sizes[0] and c.total == sum(sizes)
    assert c.reason and "degenerate" not in c.details


def test_split_modes_unequal_widths_gmm_moves_towards_narrow_mode():
    scores = _bimodal(300, 300, seed=3, low=-8.0, high=4.0, sd_low=0.3, sd_high=2.5)
    otsu, gmm = split_modes(scores, "otsu"), split_modes(scores, "gmm")
    assert -7.0 < gmm.value < otsu.value < 1.0
    assert gmm.kept == otsu.kept == 300
    assert "gmm" in gmm.details and len(gmm.details["gmm"]["means"]) == 2


@pytest.mark.parametrize("scores, why", [
    ([], "0 finite"),
    ([float("nan")], "0 finite"),
    ([1.5], "1 finite"),
    ([2.0, 2.0, 2.0, 2.0], "equal"),
])
def test_split_modes_degenerate_keeps_everything(scores, why):
    for method in ("otsu", "gmm"):
        c = split_modes(torch.tensor(scores, dtype=torch.float32), method)
        assert why in c.reason and "every group kept" in c.reason or "threshold +inf" in c.reason
        assert c.details.get("degenerate") is True
        finite = [s for s in scores if math.isfinite(s)]
        if finite:
            assert c.value == max(finite) + 1.0 and c.kept == len(finite)
        else:
            assert c.value == math.inf


@pytest.mark.parametrize("seed", [0, 1])
def test_split_modes_unimodal_keeps_everything(seed):
    g = torch.Generator().manual_seed(seed)
    for scores in (torch.randn(2000, generator=g) * 3 - 5, torch.rand(2000, generator=g) * 10):
        c = split_modes(scores)
        assert "unimodal" in c.reason and c.details["degenerate"]
        assert bool((scores < c.value).all())


def test_split_modes_ignores_nan_and_accepts_lists():
    scores = _bimodal(50, 50).tolist() + [float("nan")]
    c = split_modes(scores)
    assert -4.0 < c.value < 1.0 and c.total == 100


def test_split_modes_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        split_modes([1.0, 2.0], "kmeans")


def test_histogram_thresholds_per_layer():
    torch.manual_seed(0)
    bm = bayesianize(nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3)), "gnj", keep_weights=False)
    with torch.no_grad():
        # plant log α = z_logvar − log z_mu²: z_mu = 1, so log α = z_logvar
        first, second = bm[0], bm[2]
        first.z_mu.fill_(1.0)
        first.z_logvar.copy_(_bimodal(25, 15, seed=4))  # 25 kept, 15 pruned
        second.z_mu.fill_(1.0)
        second.z_logvar.fill_(-6.0)  # all equal: degenerate, keeps everything
    out = histogram_thresholds(bm)
    assert set(out) == {"0", "2"}
    assert -4.0 < out["0"].value < 1.0 and out["0"].kept == 25 and out["0"].total == 40
    assert out["2"].kept == 16 and "equal" in out["2"].reason
    # usable as compress thresholds
    result = compress(bm, {n: c.value for n, c in out.items()})
    assert result.report["architecture"].startswith("25-")


# ---- validation split ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, fraction", [(10, 0.3), (1000, 0.1), (7, 0.5), (2, 0.01), (5, 0.99)])
def test_validation_split_disjoint_and_covering(n, fraction):
    train, val = validation_split(n, fraction, seed=3)
    assert len(val) >= 1 and len(train) >= 1
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    assert len(val) == min(max(round(fraction * n), 1), n - 1)
    assert torch.equal(val, torch.sort(val).values)


def test_validation_split_seeded():
    a = validation_split(500, 0.2, seed=1)
    b = validation_split(500, 0.2, seed=1)
    c = validation_split(500, 0.2, seed=2)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("n, fraction", [(1, 0.5), (10, 0.0), (10, 1.0), (10, -0.1)])
def test_validation_split_rejects(n, fraction):
    with pytest.raises(ValueError):
        validation_split(n, fraction)


# ---- validation thresholds on a small trained problem -------------------------------------------

def _synthetic(n: int, seed: int):
    """20 inputs, the first 4 informative; 3 classes from a fixed linear map (separable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.tensor([[2.0, -1.0, 0.5, 0.0], [-1.0, 2.0, 0.0, 1.0], [0.0, -0.5, -2.0, 1.5]])
    y = (x[:, :4] @ w.T).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = _synthetic(1600, seed=10)
    train_idx, val_idx = validation_split(len(x), 0.25, seed=0)
    train = (x[train_idx], y[train_idx])
    val = (x[val_idx], y[val_idx])
    test = _synthetic(400, seed=11)
    bm = bayesianize(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)), "gnj", keep_weights=False)
    fit(bm, train, TrainConfig(epochs=16, batch_size=64, lr=1e-2, seed=0), progress=False)  # 304 steps
    return bm, train, val, test


def test_default_candidates():
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, float("inf")])
    c = default_candidates(s, n=10)
    assert c == [1.5, 2.5, 4.0]
    many = default_candidates(torch.arange(100.0), n=8)
    assert len(many) <= 8 and many == sorted(many) and many[-1] == 100.0 and many[0] == 0.5


def test_validation_thresholds_within_budget_and_only_sees_validation(trained, monkeypatch):
    bm, train, val, test = trained
    val_x, val_y = val
    seen = []
    real_error = thr.classification_error

    def spy(model, x, y, *args, **kwargs):
        seen.append((x, y))
        return real_error(model, x, y, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("validation_thresholds must not load a data set")

    monkeypatch.setattr(thr, "classification_error", spy)
    monkeypatch.setattr("bayescomp.pipeline.load_data", forbidden)
    monkeypatch.setattr("bayescomp.data.load_mnist", forbidden)
    budget = 1.0
    before = {k: v.clone() for k, v in bm.state_dict().items()}
    out = validation_thresholds(bm, val_x, val_y, budget)
    assert all(torch.equal(v, bm.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert seen and all(x is val_x and y is val_y for x, y in seen)
    assert set(out) == {"0", "2"}
    d = out["0"].details
    assert d["feasible"] and d["n_val"] == len(val_x)
    assert d["val_error"] <= d["val_error_uncompressed"] + budget + 1e-9
    assert d["val_error_uncompressed"] == pytest.approx(evaluate(bm, val_x, val_y))
    # the figures it reports are those of the model compress() gives at its thresholds
    thresholds = {n: c.value for n, c in out.items()}
    result = compress(bm, thresholds)
    assert result.report["weights_kept"] == d["weights_kept"]
    err = real_error(result.model, val_x, val_y)
    assert err == pytest.approx(d["val_error"])
    assert err <= evaluate(bm, val_x, val_y) + budget + 1e-9
    # it compresses: the 16 noise inputs (at least) are cheaper to drop than to keep
    assert result.report["weights_kept"] < result.report["weights_total"]
    assert out["0"].kept <= 10 and all(c.method == "validation" and "validation" in c.reason for c in out.values())


def test_validation_thresholds_more_budget_never_keeps_more(trained):
    bm, _, val, _ = trained
    tight = validation_thresholds(bm, *val, budget=0.0)
    loose = validation_thresholds(bm, *val, budget=5.0)
    assert loose["0"].details["weights_kept"] <= tight["0"].details["weights_kept"]
    assert tight["0"].details["val_error"] <= tight["0"].details["val_error_uncompressed"] + 1e-9


def test_validation_thresholds_candidates_and_errors(trained):
    bm, _, val, _ = trained
    out = validation_thresholds(bm, *val, budget=2.0, candidates={"0": [-100.0, 0.0], "2": [-100.0]})
    assert out["2"].kept == 32  # -100 empties the layer (infeasible): its keep-all value stays
    with pytest.raises(PruneError, match="unknown layers"):
        validation_thresholds(bm, *val, budget=1.0, candidates={"0": [0.0], "2": [0.0], "nope": [1.0]})
    with pytest.raises(ValueError, match="budget"):
        validation_thresholds(bm, *val, budget=-1.0)
    with pytest.raises(ValueError, match="validation set"):
        validation_thresholds(bm, val[0][:0], val[1][:0], budget=1.0)


# ---- the pipeline's --auto-thresholds (runs once pipeline.py has the options) ----------------------

def _pipeline_has_auto_thresholds() -> bool:
    from dataclasses import fields

    from bayescomp.pipeline import RunOptions

    return "auto_thresholds" in {f.name for f in fields(RunOptions)}


@pytest.mark.skipif(not _pipeline_has_auto_thresholds(), reason="pipeline.RunOptions has no auto_thresholds yet")
def test_pipeline_validation_thresholds_hold_out_training_examples(tmp_path, monkeypatch):
    import json
    import os
    from pathlib import Path

    import bayescomp.pipeline as pipeline
    from bayescomp.data import load_mnist

    data = os.environ.get("BAYESCOMP_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    test_x, _ = load_mnist("test", data)
    seen = {}
    real = thr.validation_thresholds  # (the validation rule's `choose` calls it: `thresholds.ValidationBudget`)

    def spy(model, val_x, val_y, budget, *args, **kwargs):
        seen["n"], seen["budget"] = len(val_x), budget
        assert val_x is not test_x and len(val_x) != len(test_x)
        return real(model, val_x, val_y, budget, *args, **kwargs)

    monkeypatch.setattr(thr, "validation_thresholds", spy)
    opts = pipeline.RunOptions(model="lenet300", epochs=1, train_subset=500, data_dir=data,
                               auto_thresholds="validation", val_budget=2.0, val_fraction=0.2)
    report = pipeline.run(opts, tmp_path / "run", progress=False)
    assert seen == {"n": 100, "budget": 2.0}
    assert report["train_examples"] == 400 and report["validation_examples"] == 100
    choice = report["threshold_choice"]
    assert set(choice) == {"fc1", "fc2", "fc3"} and all(c["method"] == "validation" for c in choice.values())
    assert report["thresholds"] == {n: c["value"] for n, c in choice.items()}
    assert json.loads((tmp_path / "run" / "report.json").read_text())["threshold_choice"] == choice

    hist = pipeline.run(pipeline.RunOptions(model="lenet300", epochs=1, train_subset=300, data_dir=data,
                                            auto_thresholds="histogram"), tmp_path / "hist", progress=False)
    assert all(c["method"] == "otsu" for c in hist["threshold_choice"].values())
    assert hist["train_examples"] == 300 and "validation_examples" not in hist
    with pytest.raises(pipeline.RunError, match="exclude"):
        pipeline.run(pipeline.RunOptions(auto_thresholds="histogram", thresholds=-3.0, data_dir=data), tmp_path / "x")
    with pytest.raises(pipeline.RunError, match="fraction"):
        pipeline.run(pipeline.RunOptions(auto_thresholds="validation", val_fraction=1.5, data_dir=data), tmp_path / "y")


def test_two_modes_below_the_noise_floor_are_not_split():
    torch.manual_seed(0)
    low, high = torch.randn(40) * 0.2 - 8.0, torch.randn(20) * 0.2 - 5.0  # both "signal" for GNJ (floor −3)
    scores = torch.cat([low, high])
    assert split_modes(scores).kept == 40  # without a floor: a clean split
    kept_all = split_modes(scores, noise_floor=-3.0)
    assert kept_all.kept == 60 and "noise floor" in kept_all.reason
    above = torch.cat([low, torch.randn(20) * 0.2 + 1.0])  # upper mode noise-dominated: split
    assert split_modes(above, noise_floor=-3.0).kept == 40


def test_histogram_thresholds_use_each_prior_default_as_noise_floor():
    from bayescomp.nn import LinearGroupNJ

    layer = LinearGroupNJ(60, 4)
    with torch.no_grad():  # log α = z_logvar − log z_mu² with z_mu = 1
        layer.z_mu.fill_(1.0)
        layer.z_logvar.copy_(torch.cat([torch.full((40,), -8.0), torch.full((20,), -5.0)]) + torch.randn(60) * 0.1)
    model = torch.nn.Sequential(layer)
    assert histogram_thresholds(model)["0"].kept == 60
    assert histogram_thresholds(model, use_noise_floor=False)["0"].kept == 40
    with torch.no_grad():
        layer.z_logvar[40:] = 1.0
    assert histogram_thresholds(model)["0"].kept == 40


def test_named_layers_keep_their_given_threshold_beside_the_histogram_rule(tmp_path):
    """--auto-thresholds histogram --thresholds fc1=X: fc1 at X, the other layers at the rule's split; a single
    number, the validation rule or an unknown layer is refused before any training or folder."""
    import os
    from pathlib import Path

    import bayescomp.pipeline as pipeline

    data = os.environ.get("BAYESCOMP_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    base = dict(model="lenet300", prior="ghs", epochs=1, train_subset=300, data_dir=data)
    auto = pipeline.run(pipeline.RunOptions(**base, auto_thresholds="histogram"), tmp_path / "auto", progress=False)
    both = pipeline.run(pipeline.RunOptions(**base, auto_thresholds="histogram", thresholds={"fc1": 1.25}),
                        tmp_path / "both", progress=False)
    assert both["thresholds"]["fc1"] == 1.25
    assert {k: v for k, v in both["thresholds"].items() if k != "fc1"} == \
        {k: v for k, v in auto["thresholds"].items() if k != "fc1"}
    choice = both["threshold_choice"]
    assert choice["fc1"]["method"] == "given" and choice["fc2"] == auto["threshold_choice"]["fc2"]
    posterior = pipeline.load_posterior(tmp_path / "both" / "posterior.pt")
    assert choice["fc1"]["kept"] == int((posterior.fc1.log_alpha() < 1.25).sum())
    for bad, match in ((dict(auto_thresholds="histogram", thresholds=1.0), "named layers"),
                       (dict(auto_thresholds="validation", thresholds={"fc1": 1.0}), "validation rule"),
                       (dict(auto_thresholds="histogram", thresholds={"fc9": 1.0}), "fc9")):
        with pytest.raises(pipeline.RunError, match=match):
            pipeline.run(pipeline.RunOptions(**base, **bad), tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_no_split_floor_cuts_a_unimodal_layer_at_the_noise_floor(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2000, generator=g) * 0.8 + 2.4  # one mode across the GHS floor 2.0, as an origin run's fc1
    keep = split_modes(scores, noise_floor=2.0)
    floor = split_modes(scores, noise_floor=2.0, no_split="floor")
    assert keep.kept == 2000 and "every group kept" in keep.reason
    assert floor.value == 2.0 and floor.kept == int((scores < 2.0).sum()) and 0 < floor.kept < 2000
    assert floor.details == {"degenerate": True, "no_split": "floor"} and "noise floor 2" in floor.reason
    # a layer that splits is cut where it splits, whatever no_split says
    split = _bimodal(25, 15, seed=4)
    assert split_modes(split, noise_floor=-3.0, no_split="floor") == split_modes(split, noise_floor=-3.0)


def test_no_split_floor_in_every_case_without_a_split():
    equal = split_modes([2.5] * 4, noise_floor=3.0, no_split="floor")  # all equal, below the floor
    assert equal.value == 3.0 and equal.kept == 4
    below = torch.cat([torch.full((30,), -8.0), torch.full((30,), -5.0), torch.tensor([1.0])])
    both = split_modes(below, noise_floor=-3.0, no_split="floor")  # two modes under the floor: cut at it
    assert "both below" in both.reason and both.value == -3.0 and both.kept == 60
    # a floor under every score would empty the layer: every group is kept, and the reason says why
    above = split_modes(torch.linspace(4.0, 6.0, 50), noise_floor=2.0, no_split="floor")
    assert above.kept == 50 and above.value == 7.0 and "at or above the noise floor" in above.reason


def test_no_split_is_checked():
    with pytest.raises(ValueError, match="no_split"):
        split_modes([1.0, 2.0], no_split="drop")
    with pytest.raises(ValueError, match="give noise_floor"):
        split_modes([1.0, 2.0], no_split="floor")
    bm = bayesianize(nn.Sequential(nn.Linear(4, 3)), "gnj", keep_weights=False)
    with pytest.raises(ValueError, match="use_noise_floor"):
        histogram_thresholds(bm, no_split="floor", use_noise_floor=False)


def test_histogram_thresholds_cut_a_layer_without_split_at_its_prior_s_floor():
    torch.manual_seed(0)
    bm = bayesianize(nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3)), "gnj", keep_weights=False)
    with torch.no_grad():
        for layer in (bm[0], bm[2]):
            layer.z_mu.fill_(1.0)
        bm[0].z_logvar.copy_(_bimodal(25, 15, seed=4))
        bm[2].z_logvar.copy_(torch.linspace(-5.0, -1.0, 16))  # one even spread across GNJ's floor −3
    out = histogram_thresholds(bm, no_split="floor")
    assert out["0"] == histogram_thresholds(bm)["0"]  # the split layer as before
    assert out["2"].value == -3.0 and out["2"].kept == int((bm[2].log_alpha() < -3.0).sum()) == 8


def _scored_model() -> nn.Module:
    """A fresh GNJ LeNet-300-100 (its scores spread around the initial log α)."""
    from bayescomp.models import build_model

    torch.manual_seed(0)
    return bayesianize(build_model("lenet300"), "gnj")


def test_threshold_rules_choose_every_layer_once():
    """Every way of choosing thresholds is a rule with one `choose`; `choose_thresholds` resolves what a user
    passes into {layer: float}, the same as the masks' resolver, and a rule's record says what it keeps."""
    from bayescomp.compress.masks import resolve_thresholds

    model = _scored_model()
    layers = ["fc1", "fc2", "fc3"]
    for given in (None, -2.0, {"fc2": 1.5}, {"fc1": -1.0, "fc2": 0.0, "fc3": 4.0}):
        assert thr.choose_thresholds(model, given) == resolve_thresholds(model, given)
    defaults = thr.PriorDefault().choose(model)
    assert list(defaults) == layers and all(c.method == "default" for c in defaults.values())
    every = thr.EveryLayer(0.5).choose(model)
    for name, c in every.items():
        la = model.get_submodule(name).log_alpha().detach()
        assert c.value == 0.5 and c.kept == int((la < 0.5).sum()) and c.total == la.numel()
    floor = thr.NoiseFloor().choose(model)
    assert {n: c.value for n, c in floor.items()} == {n: float(model.get_submodule(n).noise_floor) for n in layers}
    hist = thr.HistogramSplit().choose(model)
    over = thr.PerLayer({"fc1": 7.0}, others=thr.HistogramSplit()).choose(model)
    assert over["fc1"].value == 7.0 and over["fc1"].method == "given"
    assert {n: over[n].to_dict() for n in ("fc2", "fc3")} == {n: hist[n].to_dict() for n in ("fc2", "fc3")}
    assert isinstance(thr.rule_for({"fc1": 1.0}), thr.PerLayer) and isinstance(thr.rule_for(1), thr.EveryLayer)
    assert isinstance(thr.rule_for(None), thr.PriorDefault) and thr.rule_for(thr.NoiseFloor()) == thr.NoiseFloor()
    with pytest.raises(PruneError, match="unknown layers"):
        thr.PerLayer({"fc9": 1.0}).choose(model)
    with pytest.raises(PruneError, match="NaN"):
        thr.EveryLayer(math.nan).choose(model)
