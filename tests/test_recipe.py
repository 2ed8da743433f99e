"""Training recipes: per-kind learning rates, the recipe record and its options, fit on a DataLoader, and
compress_pretrained on a tiny loader (synthetic data: only the mechanics are tested here)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayescomp
from bayescomp.compress import PruneError
from bayescomp.convert import bayesianize
from bayescomp.nn import parameter_kind
from bayescomp.recipes import PAPER, RECIPE_OPTIONS, TRAINING_RECIPES, recipe_options, training_recipe
from bayescomp.train import TrainConfig, fit
from bayescomp.train.config import lr_at
from bayescomp.train.loop import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes told apart by the first four of twenty features (the other sixteen are noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 20, generator=g) * 0.3
    x[torch.arange(n), y] += 2.0
    return x, y


# ---- parameter kinds and groups -----------------------------------------------------------------------------

@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_every_parameter_has_its_kind(prior):
    bmodel = bayesianize(_mlp(), prior)
    kinds = {name: parameter_kind(name, bmodel) for name, _ in bmodel.named_parameters()}
    assert kinds["1.weight_mu"] == kinds["1.bias_mu"] == "mean"
    assert kinds["1.weight_logvar"] == kinds["4.bias_logvar"] == "variance"
    assert kinds["2.weight"] == kinds["2.bias"] == "mean"  # batch norm: outside the group-sparse layers
    scale = {n for n, k in kinds.items() if k == "scale"}
    expected = {"z_mu", "z_logvar"} if prior == "gnj" else {n.split(".")[-1] for n in scale}
    assert {n.split(".")[-1] for n in scale} == expected and len(scale) >= 4
    # every layer's own parameters that are neither means nor log-variances are scale parameters
    assert all(n.split(".")[-1] not in ("weight_mu", "bias_mu", "weight_logvar", "bias_logvar") for n in scale)


def test_param_groups_carry_each_kind_at_its_rate():
    bmodel = bayesianize(_mlp(), "gnj")
    groups = param_groups(bmodel, 1e-3, {"scale": 10.0, "variance": 3.0})
    assert [g.get("kind") for g in groups] == [None, "variance", "scale"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 3e-3, 1e-2])
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert set().union(*ids) == {id(p) for p in bmodel.parameters()} and sum(map(len, ids)) == len(list(bmodel.parameters()))
    assert {id(bmodel[1].z_mu), id(bmodel[1].z_logvar)} <= ids[2]
    assert len(param_groups(bmodel, 1e-3)) == 1  # no factors: one group, as before recipes existed


def test_lr_scale_moves_each_kind_at_its_own_rate():
    """One Adam step moves a parameter by about its group's rate: a near-zero factor freezes that kind alone."""
    x, y = _data()
    bmodel = bayesianize(_mlp(), "gnj")
    before = copy.deepcopy(bmodel)
    fit(bmodel, (x, y), TrainConfig(epochs=1, batch_size=96, lr=1e-2, lr_scale={"scale": 1e-8}), progress=False)
    old = dict(before.named_parameters())
    moved = {name: float((p - old[name]).detach().abs().max()) for name, p in bmodel.named_parameters()}
    assert moved["1.z_mu"] < 1e-8 and moved["1.z_logvar"] < 1e-8
    assert moved["1.weight_mu"] > 1e-3 and moved["1.weight_logvar"] > 1e-3


def test_cosine_schedule_keeps_the_factors(monkeypatch):
    x, y = _data()
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, lr_schedule="cosine", lr_scale={"scale": 5.0})
    fit(bayesianize(_mlp(), "ghs"), (x, y), cfg, progress=False)
    assert [s[1] for s in seen] == pytest.approx([5 * lr_at(k, 6, 1e-2, "cosine") for k in range(6)])
    assert [s[0] for s in seen] == pytest.approx([lr_at(k, 6, 1e-2, "cosine") for k in range(6)])


@pytest.mark.parametrize("bad", [{"weights": 2.0}, {"scale": 0.0}, {"scale": float("nan")}, {"scale": -1.0}])
def test_bad_lr_scale_is_refused(bad):
    with pytest.raises(ValueError, match="lr_scale"):
        TrainConfig(lr_scale=bad).validate()


def test_resume_refuses_another_lr_scale(tmp_path):
    x, y = _data()
    ck = tmp_path / "ck.pt"
    fit(bayesianize(_mlp(), "gnj"), (x, y), TrainConfig(epochs=1, batch_size=32), checkpoint=ck, progress=False)
    with pytest.raises(Exception, match="lr_scale"):
        fit(bayesianize(_mlp(), "gnj"), (x, y), TrainConfig(epochs=2, batch_size=32, lr_scale={"scale": 10.0}),
            checkpoint=ck, resume=True, progress=False)


# ---- fit on a DataLoader ------------------------------------------------------------------------------------

def test_fit_on_a_loader_equals_fit_on_tensors_in_the_same_order():
    """A loader yielding the batches the tensor path would draw gives the same model, bit for bit."""
    x, y = _data(n=100)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2, seed=5, lr_scale={"scale": 10.0})
    a, b = bayesianize(_mlp(), "gnj"), bayesianize(_mlp(), "gnj")
    ha = fit(a, (x, y), cfg, progress=False).history
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5))  # what fit draws for epoch 1
    # (its own generator: a loader draws its workers' base seed from the global stream otherwise, which would
    # shift the sampling noise)
    loader = DataLoader(TensorDataset(x[order], y[order]), batch_size=32, shuffle=False, generator=torch.Generator())
    hb = fit(b, loader, cfg, progress=False).history
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert ha[0]["loss"] == pytest.approx(hb[0]["loss"]) and ha[0]["train_error"] == hb[0]["train_error"]


def test_fit_on_a_loader_scales_the_kl_by_n_train():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=48)
    torch.manual_seed(0)
    small = fit(bayesianize(_mlp(), "gnj"), loader, TrainConfig(epochs=1), progress=False).history[0]
    torch.manual_seed(0)
    large = fit(bayesianize(_mlp(), "gnj"), loader, TrainConfig(epochs=1), progress=False, n_train=96_000).history[0]
    # the same first forward, so the same KL value; its weight in the loss is 1/N
    assert small["loss"] - small["nll"] == pytest.approx(small["kl"] / 96, rel=0.2)
    assert large["loss"] - large["nll"] < (small["loss"] - small["nll"]) / 100


def test_fit_on_a_loader_refuses_what_needs_tensors(tmp_path):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ValueError, match="DataLoader"):
        fit(bayesianize(_mlp(), "gnj"), loader, TrainConfig(epochs=1), checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(TypeError, match="length"):
        fit(bayesianize(_mlp(), "gnj"), (b for b in loader), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="n_train"):
        fit(bayesianize(_mlp(), "gnj"), [(x[:32], y[:32])], TrainConfig(epochs=1), progress=False)
    with pytest.raises(TypeError, match=r"\(inputs, labels\)"):
        fit(bayesianize(_mlp(), "gnj"), [x[:32]], TrainConfig(epochs=1), progress=False, n_train=32)


# ---- the recipe records -------------------------------------------------------------------------------------

def test_recipes_are_complete_records_with_evidence():
    assert {"fast", "paper"} <= set(TRAINING_RECIPES)
    for name, rec in TRAINING_RECIPES.items():
        assert rec.name == name
        TrainConfig(rec.epochs, rec.batch_size, rec.lr, rec.warmup_epochs, kl_weight=rec.kl_weight,
                    lr_schedule=rec.lr_schedule, lr_decay_epochs=rec.decay_epochs(rec.epochs),
                    lr_scale=dict(rec.lr_scale)).validate()
        assert rec.evidence, name
    fast = training_recipe("fast")
    # every setting in which fast differs from the paper says why
    differing = [k for k in RECIPE_OPTIONS if getattr(fast, k) != getattr(PAPER, k)]
    assert differing and all(k in fast.evidence for k in differing), set(differing) - set(fast.evidence)
    with pytest.raises(ValueError, match="unknown recipe"):
        training_recipe("quick")


def test_recipe_options_lay_the_given_over_the_recipe():
    fast = training_recipe("fast")
    plain = recipe_options("fast", {})
    assert plain["epochs"] == fast.epochs and plain["lr_scale"] == dict(fast.lr_scale)
    given = recipe_options("fast", {"epochs": 3, "lr": 0.5, "kl_weight": None})
    assert (given["epochs"], given["lr"], given["kl_weight"]) == (3, 0.5, fast.kl_weight)
    assert given["lr_decay_epochs"] is None or given["lr_decay_epochs"] <= 3  # never longer than the run
    assert recipe_options("fast", {"init_from": "net.pt"})["pretrain_epochs"] == 0
    assert recipe_options("fast", {"init_from": "net.pt", "pretrain_epochs": 2})["pretrain_epochs"] == 2
    every = recipe_options("fast", {"thresholds": -3.0})
    assert every["auto_thresholds"] is None and every["no_split"] == "keep"
    named = recipe_options("fast", {"thresholds": {"fc1": -3.0}})
    assert named["auto_thresholds"] == fast.auto_thresholds
    assert recipe_options("fast", {"auto_thresholds": "validation"})["no_split"] == "keep"
    assert recipe_options("fast", {"lr_schedule": "constant"})["lr_decay_epochs"] is None
    paper = recipe_options("paper", {})
    assert (paper["epochs"], paper["lr"], paper["lr_scale"], paper["finetune_epochs"]) == (200, 1e-3, {}, 0)


# ---- compress_pretrained ------------------------------------------------------------------------------------

def test_compress_pretrained_on_a_tiny_loader(capsys):
    x, y = _data(n=256)
    net = _mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):  # the user's own training
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    state = copy.deepcopy(net.state_dict())
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    result = bayescomp.compress_pretrained(net, loader, epochs=3, finetune_epochs=1, progress=True)
    for k, v in net.state_dict().items():  # the input model is left as it was
        assert torch.equal(v, state[k]), k
    assert not any(isinstance(m, bayescomp.nn.GroupSparseLayer) for m in result.model.modules())
    report = result.report
    assert report["recipe"] == "fast" and len(report["history"]) == 4
    assert report["seconds"] >= report["train_seconds"] + report["finetune_seconds"] > 0
    assert 0 < report["weights_kept_pct"] <= 100
    out = result.model.eval()(x)
    assert out.shape == (256, 4) and torch.isfinite(out).all()
    # the signal sits in the first four inputs: the result still classifies
    assert float((out.argmax(1) == y).float().mean()) > 0.9
    printed = capsys.readouterr()
    assert "left in all" in printed.out + printed.err


def test_compress_pretrained_thresholds_and_errors():
    x, y = _data(n=128)
    net = _mlp().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with pytest.raises(PruneError, match="every group"):
        bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=0, thresholds=-math.inf, progress=False)
    with pytest.raises(ValueError, match="fine-tuning epochs"):
        bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=-1, progress=False)
    with pytest.raises(ValueError, match="unknown recipe"):
        bayescomp.compress_pretrained(net, loader, recipe="quick", progress=False)
    kept_all = bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=0, thresholds=math.inf,
                                             progress=False)
    assert kept_all.report["weights_kept_pct"] == pytest.approx(100.0)
    assert kept_all.report["thresholds_rule"] == "given"


# ---- the command line ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "code", "message"), [
    (["--lr-scale", "weights=3"], 1, "--lr-scale: lr_scale names an unknown parameter kind 'weights'"),
    (["--lr-scale", "scale=0"], 1, "--lr-scale"),
    (["--lr-scale", "3"], 2, "kind=factor pairs"),
    (["--recipe", "quick"], 2, "'quick' is not one of"),
    (["--pretrain-lr", "-1"], 1, "--pretrain-lr must be a positive finite number"),
])
def test_bad_recipe_options_are_refused_before_any_data(tmp_path, monkeypatch, args, code, message):
    from click.testing import CliRunner

    from bayescomp import pipeline
    from bayescomp.cli import main

    def no_data(*a, **k):  # pragma: no cover - reached only if validation came too late
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr(pipeline, "load_data", no_data)
    result = CliRunner().invoke(main, ["compress", "--out", str(tmp_path / "o"), "--recipe", "fast", *args])
    assert result.exit_code == code and message in result.output, result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_cli_recipe_fills_what_is_not_given(tmp_path, monkeypatch):
    """--recipe fast sets the recipe's values; a given option wins; the report's config records both."""
    from click.testing import CliRunner

    from bayescomp import pipeline
    from bayescomp.cli import main

    seen = {}

    def stop(opts, *a, **k):
        seen["opts"] = opts
        raise RuntimeError("stop before training")

    monkeypatch.setattr(pipeline, "run", stop)
    result = CliRunner().invoke(main, ["compress", "--out", str(tmp_path / "o"), "--recipe", "fast", "--epochs", "7",
                                       "--lr-scale", "scale=4"])
    assert result.exit_code == 1 and "stop before training" in result.output
    opts, fast = seen["opts"], training_recipe("fast").for_run("lenet300", "gnj")  # the default model and prior's own
    assert (opts.recipe, opts.epochs, opts.lr, opts.lr_scale) == ("fast", 7, fast.lr, {"scale": 4.0})
    assert opts.finetune_epochs == fast.finetune_epochs
    assert (opts.pretrain_epochs, opts.pretrain_lr, opts.lr_schedule) == (fast.pretrain_epochs, fast.pretrain_lr,
                                                                          fast.lr_schedule)
    result = CliRunner().invoke(main, ["compress", "--out", str(tmp_path / "o"), "--epochs", "2"])
    assert seen["opts"].recipe == "paper" and seen["opts"].lr == PAPER.lr and seen["opts"].pretrain_epochs == 0


def test_prior_settings_apply_to_their_prior_only(monkeypatch):
    import dataclasses

    from bayescomp import recipes

    rec = dataclasses.replace(training_recipe("fast"), prior_settings={"ghs": {"kl_weight": 0.25, "finetune_epochs": 2}})
    assert rec.for_prior("ghs").kl_weight == 0.25 and rec.for_prior("gnj") is rec and rec.for_prior(None) is rec
    monkeypatch.setitem(recipes.TRAINING_RECIPES, "fast", rec)
    assert recipe_options("fast", {}, prior="ghs")["kl_weight"] == 0.25
    assert recipe_options("fast", {"kl_weight": 1.0}, prior="ghs")["kl_weight"] == 1.0  # what is given wins
    assert recipe_options("fast", {}, prior="gnj")["kl_weight"] == rec.kl_weight


def test_shipped_prior_settings_say_why():
    for shipped in TRAINING_RECIPES.values():
        for who, own in (*shipped.prior_settings.items(), *shipped.model_settings.items()):
            assert all(f"{who}: {k}" in shipped.evidence for k in own), (shipped.name, who)
            assert set(own) <= set(RECIPE_OPTIONS), (shipped.name, who)


def test_model_settings_apply_to_their_model_under_the_priors(monkeypatch):
    import dataclasses

    from bayescomp import recipes

    rec = dataclasses.replace(training_recipe("fast"), model_settings={"lenet5": {"epochs": 7, "kl_weight": 0.9}},
                              prior_settings={"ghs": {"kl_weight": 0.25}})
    assert rec.for_model("lenet5").epochs == 7 and rec.for_model("lenet300") is rec and rec.for_model(None) is rec
    monkeypatch.setitem(recipes.TRAINING_RECIPES, "fast", rec)
    assert recipe_options("fast", {}, prior="gnj", model="lenet5")["epochs"] == 7
    assert recipe_options("fast", {}, prior="gnj", model="lenet300")["epochs"] == rec.epochs
    assert recipe_options("fast", {}, prior="ghs", model="lenet5")["kl_weight"] == 0.25  # the prior's over the model's
    assert recipe_options("fast", {"epochs": 2}, prior="gnj", model="lenet5")["epochs"] == 2  # what is given wins


def test_the_cli_reads_the_models_own_recipe_settings(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from bayescomp import pipeline
    from bayescomp.cli import main

    seen = {}

    def stop(opts, *a, **k):
        seen["opts"] = opts
        raise RuntimeError("stop before training")

    monkeypatch.setattr(pipeline, "run", stop)
    result = CliRunner().invoke(main, ["compress", "--recipe", "fast", "--model", "lenet5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "stop before training" in result.output
    fast = training_recipe("fast")
    assert seen["opts"].epochs == fast.model_settings["lenet5"]["epochs"] != fast.epochs
    assert seen["opts"].finetune_epochs == fast.model_settings["lenet5"]["finetune_epochs"]


def test_recipes_command_lists_and_explains():
    from click.testing import CliRunner

    from bayescomp.cli import main

    listing = CliRunner().invoke(main, ["recipes"])
    assert listing.exit_code == 0 and listing.output.startswith("fast") and "\npaper " in listing.output
    fast = training_recipe("fast")
    shown = CliRunner().invoke(main, ["recipes", "fast"])
    assert shown.exit_code == 0
    lines = shown.output.splitlines()
    assert f"lr               {fast.lr}" in lines
    assert any(line.strip() == f"why: {fast.evidence['lr']}" for line in lines)
    for who, own in (*fast.prior_settings.items(), *fast.model_settings.items()):
        for key, value in own.items():
            assert any(line.startswith(f"{who}: {key}") and line.endswith(str(value)) for line in lines)
    assert CliRunner().invoke(main, ["recipes", "quick"]).exit_code == 2


def test_time_left_is_written_for_a_person():
    from bayescomp.train.loop import format_duration

    assert [format_duration(s) for s in (0, 41.6, 185, 3600 + 7 * 60 + 20)] == ["0 s", "42 s", "3 min 05 s",
                                                                                  "1 h 07 min"]


def test_compress_pretrained_refuses_a_rule_it_cannot_apply_before_training(monkeypatch):
    import dataclasses

    from bayescomp import pretrained

    def no_training(*a, **k):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("trained before the recipe was checked")

    monkeypatch.setattr(pretrained, "fit", no_training)
    rec = dataclasses.replace(training_recipe("fast"), auto_thresholds="validation")
    x, y = _data()
    with pytest.raises(ValueError, match="'validation' rule"):
        bayescomp.compress_pretrained(_mlp(), (x, y), recipe=rec, progress=False)


def test_compress_pretrained_meets_a_size_target():
    from bayescomp.compress import multiply_adds

    x, y = _data(n=128)
    net = _mlp().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    total = 20 * 16 + 16 * 4
    small = bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=1, target_kept=0.3, progress=False)
    assert small.report["weights_kept"] <= int(0.3 * total) and small.report["weights_kept_pct"] <= 30.0
    assert small.report["thresholds_rule"] == "size target (target_kept=0.3)"
    cheap = bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=0, max_multiply_adds=150,
                                          progress=False)
    assert multiply_adds(cheap.model.eval(), x[:8]) <= 150 < multiply_adds(net, x[:8])
    assert cheap.report["thresholds_rule"] == "size target (max_multiply_adds=150)"


class _Residual(nn.Module):  # not a chain: its multiply-adds need an example input
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(20, 20), nn.Linear(20, 4)

    def forward(self, x):
        return self.b(x + self.a(x))


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    (_mlp, {"target_kept": 0.5, "max_multiply_adds": 100}, "give one size target"),
    (_mlp, {"target_kept": 1.5}, "target_kept is the share"),
    (_mlp, {"max_multiply_adds": 0}, "max_multiply_adds must be a positive integer"),
    (_mlp, {"target_kept": 0.5, "thresholds": -3.0}, "not both"),
    (_Residual, {"max_multiply_adds": 100}, "needs example_input="),
])
def test_compress_pretrained_refuses_a_bad_size_target_before_training(monkeypatch, model, kwargs, message):
    from bayescomp import pretrained

    def no_training(*a, **k):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("trained before the size target was checked")

    monkeypatch.setattr(pretrained, "fit", no_training)
    x, y = _data()
    with pytest.raises(ValueError, match=message):
        bayescomp.compress_pretrained(model(), (x, y), progress=False, **kwargs)


def test_a_model_prior_pair_has_its_own_settings_over_both(monkeypatch):
    import dataclasses

    from bayescomp import recipes

    rec = dataclasses.replace(training_recipe("fast"), prior_settings={"ghs": {"kl_weight": 0.25, "lr_scale": {}}},
                              model_settings={"lenet5": {"epochs": 7, "lr_scale": {"mean": 0.5}},
                                              "lenet5/ghs": {"kl_weight": 0.75}})
    assert rec.for_run("lenet5", "ghs").kl_weight == 0.75  # the pair's over the prior's
    assert rec.for_run("lenet5", "ghs").lr_scale == {} and rec.for_run("lenet5", "gnj").lr_scale == {"mean": 0.5}
    assert rec.for_run("lenet300", "ghs").kl_weight == 0.25 and rec.for_run("lenet5", "gnj").kl_weight == rec.kl_weight
    assert rec.for_run(None, "ghs") == rec.for_prior("ghs") and rec.for_run("lenet5", None) == rec.for_model("lenet5")
    monkeypatch.setitem(recipes.TRAINING_RECIPES, "fast", rec)
    assert recipe_options("fast", {}, prior="ghs", model="lenet5")["kl_weight"] == 0.75
    assert recipe_options("fast", {"kl_weight": 0.5}, prior="ghs", model="lenet5")["kl_weight"] == 0.5  # the user's wins


@pytest.mark.parametrize(("given", "drawn"), [(None, 32), ("batch", 1)])
def test_compress_pretrained_draws_z_as_the_recipe_or_the_caller_says(monkeypatch, given, drawn):
    """A model of the user's gets the fast recipe's draw for it (one z per example) unless `z_draw=` says otherwise;
    a bad value is refused before any training."""
    x, y = _data(n=64)
    net = _mlp().eval()
    seen: list[int] = []
    original = bayescomp.nn.LinearGroupNJ._z_draw

    def spy(self, params, n):
        seen.append(n)
        return original(self, params, n)

    monkeypatch.setattr(bayescomp.nn.LinearGroupNJ, "_z_draw", spy)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=1, z_draw=given, progress=False)
    assert seen and set(seen) == {drawn}
    seen.clear()
    with pytest.raises(ValueError, match="z_draw"):
        bayescomp.compress_pretrained(net, loader, epochs=1, z_draw="step", progress=False)
    assert not seen


def test_a_recipes_kl_warm_up_never_outlasts_the_run():
    """LeNet-5-Caffe with GNJ warms the KL up over 10 of its 30 epochs; a shorter run ends its warm-up with the run (so it
    still reaches the full KL weight), on the command line and in compress_pretrained; a warm-up the user gives wins."""
    from bayescomp.pretrained import _config

    rec = training_recipe("fast").for_run("lenet5", "gnj")
    assert 0 < rec.warmup_epochs < rec.epochs
    assert recipe_options("fast", {}, prior="gnj", model="lenet5")["warmup_epochs"] == rec.warmup_epochs
    assert recipe_options("fast", {"epochs": 4}, prior="gnj", model="lenet5")["warmup_epochs"] == 4.0
    assert recipe_options("fast", {"epochs": 4, "warmup_epochs": 7.0}, prior="gnj", model="lenet5")["warmup_epochs"] == 7.0
    assert recipe_options("fast", {}, prior="gnj", model="lenet300")["warmup_epochs"] == 0.0
    assert _config(rec, 3, seed=0).warmup_epochs == 3.0 and _config(rec, 30, seed=0).warmup_epochs == rec.warmup_epochs


def test_a_recipe_size_target_yields_to_any_other_cut():
    """The fast recipe cuts LeNet-300-100 to its size target (both priors) and LeNet-5-Caffe with GNJ to the paper's
    0.9%; thresholds, a threshold rule or another size target given by the user replace it, and no other run gets it."""
    own = training_recipe("fast").for_run("lenet300", "gnj").target_kept
    assert own is not None and 0 < own <= 0.108  # at most the paper's 10.8% (GNJ), 10.6% (GHS)
    assert recipe_options("fast", {}, prior="gnj", model="lenet300")["target_kept"] == own
    ghs = recipe_options("fast", {}, prior="ghs", model="lenet300")
    assert 0 < ghs["target_kept"] <= 0.106 and ghs["auto_thresholds"] is None  # the target, not the prior's histogram
    assert recipe_options("fast", {}, prior="ghs", model="lenet5")["auto_thresholds"] == "histogram"
    assert 0 < recipe_options("fast", {}, prior="gnj", model="lenet5")["target_kept"] <= 0.009  # the paper's 0.9%
    assert recipe_options("fast", {"thresholds": -3.0}, prior="gnj", model="lenet5")["target_kept"] is None
    assert recipe_options("fast", {}, prior="ghs", model="lenet5")["target_kept"] is None
    assert recipe_options("fast", {}, prior="gnj", model="resnet_mnist")["target_kept"] is None
    assert recipe_options("paper", {}, prior="gnj", model="lenet300")["target_kept"] is None
    for given in ({"thresholds": -3.0}, {"thresholds": {"fc1": -2.0}}, {"auto_thresholds": "histogram"},
                  {"max_multiply_adds": 1000}):
        assert recipe_options("fast", given, prior="gnj", model="lenet300")["target_kept"] is None, given
    assert recipe_options("fast", {"target_kept": 0.05}, prior="gnj", model="lenet300")["target_kept"] == 0.05


def test_the_cli_cuts_to_the_recipes_size_target_unless_told_otherwise(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from bayescomp import pipeline
    from bayescomp.cli import main

    seen = []

    def stop(opts, *a, **k):
        seen.append(opts)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(pipeline, "run", stop)
    base = ["compress", "--recipe", "fast", "--model", "lenet300", "--prior", "gnj", "--out", str(tmp_path / "o")]
    for extra, kept, thresholds in (([], training_recipe("fast").for_run("lenet300", "gnj").target_kept, None),
                                    (["--thresholds", "-3"], None, -3.0), (["--target-kept", "0.2"], 0.2, None)):
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 1 and "stop before training" in result.output, result.output
        assert (seen[-1].target_kept, seen[-1].thresholds) == (kept, thresholds), extra


def test_compress_pretrained_takes_the_recipes_size_target():
    import dataclasses

    x, y = _data(n=128)
    net = _mlp().eval()
    rec = dataclasses.replace(training_recipe("fast"), target_kept=0.3)
    small = bayescomp.compress_pretrained(net, (x, y), recipe=rec, epochs=1, finetune_epochs=0, progress=False)
    assert small.report["thresholds_rule"] == "size target (target_kept=0.3)"
    assert small.report["weights_kept_pct"] <= 30.0
    given = bayescomp.compress_pretrained(net, (x, y), recipe=rec, epochs=1, finetune_epochs=0, thresholds=-3.0,
                                          progress=False)
    assert given.report["thresholds_rule"] != small.report["thresholds_rule"]
