"""Sweeps over τ0 and over thresholds, the Pareto front, and the ELBO of a trained run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayescomp.sweep as sweep_mod
from bayescomp.convert import bayesianize, kl_divergence
from bayescomp.pipeline import RunError, RunOptions, load_posterior
from bayescomp.sweep import pareto_front, sweep, threshold_sweep, training_elbo

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- Pareto front ---------------------------------------------------------------------------------

def test_pareto_front_hand_made():
    pts = [
        {"test_error": 1.0, "weights_kept_pct": 10.0},  # 0 front (lowest error)
        {"test_error": 2.0, "weights_kept_pct": 5.0},   # 1 front
        {"test_error": 3.0, "weights_kept_pct": 5.0},   # 2 dominated by 1 (equal size, more error)
        {"test_error": 0.5, "weights_kept_pct": 20.0},  # 3 front
        {"test_error": 2.0, "weights_kept_pct": 5.0},   # 4 equal to 1: neither dominates, both front
        {"test_error": 1.5, "weights_kept_pct": 12.0},  # 5 dominated by 0
        {"test_error": None, "weights_kept_pct": 1.0},  # 6 incomplete: off the front, dominates nothing
        {"test_error": 5.0, "weights_kept_pct": 1.0},   # 7 front (smallest)
        {"weights_kept_pct": 0.1},                      # 8 missing key
        {"test_error": float("nan"), "weights_kept_pct": 0.1},  # 9 NaN
    ]
    assert pareto_front(pts) == [True, True, False, True, True, False, False, True, False, False]
    assert pareto_front([]) == []
    assert pareto_front([{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 4}, {"a": 0, "b": 5, "c": 9}],
                        ("a", "b", "c")) == [True, False, True]
    # keys in another order or with one key only
    assert pareto_front(pts[:4], ("weights_kept_pct",)) == [False, True, True, False]


# ---- ELBO ------------------------------------------------------------------------------------------

def test_training_elbo_is_minus_nll_sum_plus_kl():
    torch.manual_seed(0)
    bm = bayesianize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "gnj", keep_weights=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    bm.eval()
    state = torch.get_rng_state()
    out = training_elbo(bm, x, y, batch_size=16, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # the global random state is untouched
    assert not any(m.training for m in bm.modules())  # modes restored
    # by hand: the same seed, the same sampled forward passes
    with torch.no_grad():
        torch.manual_seed(7)
        bm.train()
        nll = sum(float(F.cross_entropy(bm(x[i:i + 16]), y[i:i + 16], reduction="sum")) for i in range(0, 50, 16))
        kl = float(kl_divergence(bm))
        bm.eval()
    assert out["nll_sum"] == pytest.approx(nll, rel=1e-6)
    assert out["kl"] == pytest.approx(kl, rel=1e-6)
    assert out["elbo"] == pytest.approx(-(nll + kl), rel=1e-6) and out["n"] == 50
    two = training_elbo(bm, x, y, samples=2)
    assert math.isfinite(two["elbo"]) and two["samples"] == 2
    with pytest.raises(ValueError):
        training_elbo(nn.Sequential(nn.Linear(2, 2)), x[:, :2], y)


def test_elbo_from_history():
    rows = [{"loss": 2.0, "beta": 0.5}, {"loss": 1.5, "beta": 1.0}]
    assert sweep_mod._elbo_from_history(rows, 100) == pytest.approx(-150.0)
    assert sweep_mod._elbo_from_history(rows[:1], 100) is None
    assert sweep_mod._elbo_from_history([], 100) is None


# ---- τ0 sweep and threshold sweep on tiny real runs -------------------------------------------------

BASE = RunOptions(model="lenet300", epochs=1, train_subset=300, data_dir=str(DATA), seed=0)
TAU0S = [1e-5, 1e-2]


@pytest.fixture(scope="module")
def tau_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tau"
    return out, sweep(BASE, TAU0S, out)


def test_sweep_points_and_file(tau_sweep):
    out, result = tau_sweep
    assert [p["tau0"] for p in result["points"]] == TAU0S
    for p in result["points"]:
        run_dir = out / p["run_dir"]
        assert run_dir.name == f"tau0_{p['tau0']:g}" and (run_dir / "report.json").is_file()
        report = json.loads((run_dir / "report.json").read_text())
        assert report["prior"] == "ghs" and report["config"]["tau0"] == p["tau0"]
        assert p["test_error"] == report["test_error"] and p["weights_kept_pct"] == report["weights_kept_pct"]
        assert p["cr_fast"] == report["cr_fast"] and p["cr_file"] == report.get("cr_file")
        assert math.isfinite(p["elbo"]) and p["elbo"] < 0 and p["elbo"] == pytest.approx(-(p["nll_sum"] + p["kl"]))
        assert p["elbo_from_loss"] is not None and p["elbo_from_loss"] < 0
        assert isinstance(p["pareto"], bool)
    assert [p["pareto"] for p in result["points"]] == pareto_front(result["points"])
    assert any(p["pareto"] for p in result["points"])
    best = max(result["points"], key=lambda p: p["elbo"])
    assert result["elbo_choice"] == best["tau0"]
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tmp*"))


def test_sweep_reuses_finished_runs(tau_sweep, monkeypatch):
    out, result = tau_sweep

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run with the same settings must be reused")

    monkeypatch.setattr(sweep_mod, "run", no_training)
    again = sweep(BASE, TAU0S, out)
    assert [p["test_error"] for p in again["points"]] == [p["test_error"] for p in result["points"]]
    assert [p["elbo"] for p in again["points"]] == pytest.approx([p["elbo"] for p in result["points"]])
    from dataclasses import replace

    with pytest.raises(RunError, match="other settings"):
        sweep(replace(BASE, lr=5e-3), TAU0S[:1], out)


def test_sweep_rejects_bad_tau0(tmp_path):
    for bad in ([], [0.0], [-1e-5], [float("inf")], [1e-5, 1e-5]):
        with pytest.raises(RunError):
            sweep(BASE, bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_threshold_sweep_monotone(tau_sweep, tmp_path):
    out, result = tau_sweep
    run_dir = out / result["points"][0]["run_dir"]
    bm = load_posterior(run_dir / "posterior.pt")
    scores = {n: m.log_alpha().detach() for n, m in bm.named_modules() if hasattr(m, "log_alpha")}
    values = [{n: float(torch.quantile(s, q)) + 1e-6 for n, s in scores.items()} for q in (0.25, 0.6, 1.0)]
    points = threshold_sweep(run_dir, values, data_dir=str(DATA), out=tmp_path / "ts.json")
    assert len(points) == 3
    kept = [p["weights_kept"] for p in points]
    assert kept == sorted(kept) and kept[0] < kept[-1]
    assert points[-1]["weights_kept_pct"] == pytest.approx(100.0)
    assert all(0.0 <= p["test_error"] <= 100.0 and isinstance(p["pareto"], bool) for p in points)
    assert points[-1]["pareto"]  # the lowest error of a full model or on the front by size
    doc = json.loads((tmp_path / "ts.json").read_text())
    assert doc["kind"] == "threshold" and len(doc["points"]) == 3
    # a results-style file: it chooses nothing, and says so in its last two keys (tests/test_results_selection.py)
    assert list(doc)[-2:] == ["selection", "selection_note"]
    assert doc["selection"] == "none" and "every threshold" in doc["selection_note"]
    # a setting that empties a layer is a skipped point, not an error; relative offsets work
    pts = threshold_sweep(run_dir, [-1e9, 0.0], data_dir=str(DATA), relative=True)
    assert pts[0]["skipped"] and pts[0]["test_error"] is None and pts[0]["pareto"] is False
    assert pts[1]["thresholds"] == json.loads((run_dir / "report.json").read_text())["thresholds"]



def test_threshold_sweep_one_layer(tau_sweep, tmp_path):
    """--layer moves one layer's threshold (set or offset); the others stay at the run's own."""
    out, result = tau_sweep
    run_dir = out / result["points"][0]["run_dir"]
    base = json.loads((run_dir / "report.json").read_text())["thresholds"]
    bm = load_posterior(run_dir / "posterior.pt")
    score = dict(bm.named_modules())["fc2"].log_alpha().detach()
    cut = float(torch.quantile(score, 0.5))
    points = threshold_sweep(run_dir, [cut, 1e9], data_dir=str(DATA), layer="fc2", out=tmp_path / "one.json")
    for p, value in zip(points, (cut, 1e9), strict=True):
        assert p["thresholds"]["fc2"] == pytest.approx(value)
        assert {n: v for n, v in p["thresholds"].items() if n != "fc2"} == pytest.approx(
            {n: v for n, v in base.items() if n != "fc2"})
    assert points[0]["weights_kept"] < points[1]["weights_kept"]
    # fc2's input groups kept at the cut: those scoring below it (fc1's rows follow them)
    assert points[0]["architecture"].split("-")[1] == str(int((score < cut).sum()))
    assert json.loads((tmp_path / "one.json").read_text())["layer"] == "fc2"
    shifted = threshold_sweep(run_dir, [0.5], data_dir=str(DATA), layer="fc3", relative=True)
    assert shifted[0]["thresholds"]["fc3"] == pytest.approx(base["fc3"] + 0.5)
    assert shifted[0]["thresholds"]["fc1"] == pytest.approx(base["fc1"])
    with pytest.raises(RunError, match="fc1, fc2, fc3"):
        threshold_sweep(run_dir, [0.0], data_dir=str(DATA), layer="conv9")
    with pytest.raises(RunError, match="plain numbers"):
        threshold_sweep(run_dir, [{"fc2": 0.0}], data_dir=str(DATA), layer="fc2")

def test_sweep_and_threshold_sweep_commands(tau_sweep, tmp_path):
    from click.testing import CliRunner

    from bayescomp.cli import main

    if "sweep" not in main.commands or "threshold-sweep" not in main.commands:
        pytest.skip("the CLI has no `sweep` / `threshold-sweep` command yet")
    out, result = tau_sweep
    args = ["sweep", "--out", str(out), "--epochs", "1", "--train-subset", "300", "--data-dir", str(DATA), "--quiet"]
    for t in TAU0S:
        args += ["--tau0", str(t)]
    res = CliRunner().invoke(main, args)  # reuses the finished runs
    assert res.exit_code == 0, res.output
    assert "ELBO prefers" in res.output and (out / "sweep.json").is_file()
    doc = json.loads((out / "sweep.json").read_text())  # its one choice, the ELBO's τ0, reads the training set only
    assert (doc["selection"], list(doc)[-1]) == ("rule", "selection_note")
    assert "training-set ELBO" in doc["selection_note"] and "thresholds the prior's defaults" in doc["selection_note"]
    run_dir = out / result["points"][0]["run_dir"]
    res = CliRunner().invoke(main, ["threshold-sweep", str(run_dir), "--values", "-1e9,0,100", "--relative",
                                    "--data-dir", str(DATA)])
    assert res.exit_code == 0, res.output
    doc = json.loads((run_dir / "threshold_sweep.json").read_text())
    assert len(doc["points"]) == 3 and doc["points"][0]["skipped"] and "skipped" in res.output
    assert doc["selection"] == "none"
    res = CliRunner().invoke(main, ["threshold-sweep", str(run_dir), "--values", "0", "--layer", "fc9",
                                    "--data-dir", str(DATA)])
    assert res.exit_code == 1 and "fc9" in res.output and "fc1, fc2, fc3" in res.output
    bad = CliRunner().invoke(main, ["sweep", "--out", str(tmp_path / "s"), "--tau0", "-1"])
    assert bad.exit_code == 1 and "positive" in bad.output


def test_sweep_command_trains_each_point_with_the_recipe_options(tmp_path):
    """--kl-weight, --pretrain-epochs and --finetune-epochs reach every run of the sweep (as in `compress`)."""
    from click.testing import CliRunner

    from bayescomp.cli import main

    out = tmp_path / "s"
    args = ["sweep", "--out", str(out), "--tau0", "1e-3", "--epochs", "1", "--train-subset", "300", "--kl-weight",
            "0.3", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--data-dir", str(DATA), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "tau0_0.001" / "report.json").read_text())
    assert (report["config"]["kl_weight"], report["config"]["pretrain_epochs"], report["config"]["finetune_epochs"]) \
        == (0.3, 1, 1)
    assert len(report["finetune"]["history"]) == 1 and report["history"][0]["beta"] == 0.3
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["base_options"]["finetune_epochs"] == 1
    # the finished point is reused only with the same recipe
    res = CliRunner().invoke(main, [a if a != "0.3" else "0.5" for a in args])
    assert res.exit_code == 1 and "kl_weight=0.3 (now 0.5)" in res.output


def test_sweep_selection_says_where_the_thresholds_came_from():
    """sweep.json's one choice is a rule either way; its note follows the options the runs were thresholded by."""
    from dataclasses import replace

    from bayescomp.sweep import sweep_selection

    notes = {name: sweep_selection(replace(BASE, **kw)) for name, kw in (
        ("default", {}), ("given", {"thresholds": 2.0}), ("otsu", {"auto_thresholds": "histogram"}),
        ("held_out", {"auto_thresholds": "validation"}))}
    assert {sel for sel, _ in notes.values()} == {"rule"}
    assert "prior's defaults" in notes["default"][1] and "as given" in notes["given"][1]
    assert "histogram rule" in notes["otsu"][1] and "held out of the training set" in notes["held_out"][1]
