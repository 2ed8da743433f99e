"""Tests of the training loop and checkpoints on a small real MNIST subset (LeNet-300-100, GNJ)."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch

from bayescomp.convert import bayesianize
from bayescomp.data import load_mnist
from bayescomp.models import lenet300_100
from bayescomp.train import (
    CheckpointError,
    TrainConfig,
    TrainingDivergedError,
    fit,
    kl_beta,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)

N_TRAIN = 2000
HISTORY_KEYS = {"epoch", "loss", "nll", "kl", "beta", "train_error", "seconds", "test_error", "groups_kept"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    try:
        x, y = load_mnist("train")
        xt, yt = load_mnist("test")
    except Exception as exc:  # pragma: no cover - only without the data set
        pytest.skip(f"MNIST not available: {exc}")
    return (x[:N_TRAIN].clone(), y[:N_TRAIN].clone()), (xt[:1000].clone(), yt[:1000].clone())


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return bayesianize(lenet300_100(), keep_weights=False)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------------------
# learning


def test_fit_learns_mnist_subset(mnist, tmp_path):
    train, test = mnist
    model = _model()
    metrics = tmp_path / "metrics.jsonl"
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.0, seed=0)
    result = fit(model, train, cfg, test=test, metrics=metrics, progress=False)
    hist = result.history
    assert [row["epoch"] for row in hist] == [1, 2, 3]
    for row in hist:
        assert set(row) == HISTORY_KEYS
        assert set(row["groups_kept"]) == {"fc1", "fc2", "fc3"}
        assert all(isinstance(v, int) for v in row["groups_kept"].values())
        assert row["nll"] >= 0 and row["kl"] >= 0
        assert row["loss"] >= row["nll"]
        assert 0 <= row["train_error"] <= 100
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["nll"] < hist[0]["nll"]
    assert hist[-1]["test_error"] < 20.0
    assert [row["beta"] for row in hist] == [1.0, 1.0, 1.0]  # no warm-up
    assert result.seconds > 0
    assert not model.training
    lines = metrics.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(hist))


def test_kl_beta_schedule():
    assert kl_beta(0, 10, 0.0) == 1.0
    assert kl_beta(123, 10, 0.0) == 1.0
    assert kl_beta(0, 10, 2.0) == pytest.approx(1 / 20)
    assert kl_beta(9, 10, 2.0) == pytest.approx(10 / 20)
    assert kl_beta(14, 10, 2.0) == pytest.approx(15 / 20)
    assert kl_beta(19, 10, 2.0) == pytest.approx(1.0)
    assert kl_beta(25, 10, 2.0) == 1.0
    assert kl_beta(4, 16, 0.5) == pytest.approx(5 / 8)
    betas = [kl_beta(s, 7, 3.0) for s in range(40)]
    assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:], strict=False))
    assert 0 < betas[0] < 0.1 and betas[-1] == 1.0
    # a KL weight below or above 1 is the end of the ramp, and β throughout without a warm-up
    assert kl_beta(0, 10, 0.0, 0.3) == 0.3 and kl_beta(500, 10, 0.0, 2.0) == 2.0
    assert kl_beta(9, 10, 2.0, 0.5) == pytest.approx(0.25)
    assert kl_beta(19, 10, 2.0, 0.5) == pytest.approx(0.5) and kl_beta(40, 10, 2.0, 0.5) == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": -1},
        {"epochs": 2.5},
        {"batch_size": 0},
        {"lr": -1e-3},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"warmup_epochs": -1.0},
        {"kl_weight": 0.0},
        {"kl_weight": -0.5},
        {"kl_weight": float("nan")},
        {"kl_weight": float("inf")},
        {"grad_clip": 0.0},
        {"grad_clip": -1.0},
        {"lr_schedule": "step"},
        {"lr_schedule": "Cosine"},
        {"lr_decay_epochs": 5.0},  # a decay length without a decaying schedule
        {"epochs": 4, "lr_schedule": "cosine", "lr_decay_epochs": 5.0},
        {"epochs": 4, "lr_schedule": "cosine", "lr_decay_epochs": 0.0},
        {"epochs": 4, "lr_schedule": "cosine", "lr_decay_epochs": float("nan")},
        {"z_draw": "step"},
    ],
)
def test_train_config_validate_rejects(kwargs, mnist):
    cfg = TrainConfig(**kwargs)
    with pytest.raises(ValueError):
        cfg.validate()
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        fit(model, mnist[0], cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kl_weight_scales_the_kl_in_the_loss(mnist):
    """β = kl_weight enters the loss: the recorded β is it, and a smaller β leaves a larger KL (weaker pull)."""
    train, _ = mnist
    init = _model(seed=1)
    full, tempered = copy.deepcopy(init), copy.deepcopy(init)
    h_full = fit(full, train, TrainConfig(epochs=1, batch_size=64, seed=0), progress=False).history[0]
    h_temp = fit(tempered, train, TrainConfig(epochs=1, batch_size=64, seed=0, kl_weight=0.1), progress=False).history[0]
    assert h_full["beta"] == 1.0 and h_temp["beta"] == 0.1
    from bayescomp import kl_divergence

    with torch.no_grad():
        assert float(kl_divergence(tempered)) > float(kl_divergence(full))
    # the loss counts the KL at β: loss − nll is about β·KL/N in both runs
    n = len(train[1])
    for h, beta in ((h_full, 1.0), (h_temp, 0.1)):
        assert h["loss"] - h["nll"] == pytest.approx(beta * h["kl"] / n, rel=0.2)


def test_lr_at_schedules():
    """Constant is lr; cosine starts at lr, halves at mid-run, falls monotonically to just above 0."""
    assert lr_at(0, 100, 1e-3) == 1e-3 and lr_at(99, 100, 1e-3, "constant") == 1e-3
    assert lr_at(0, 100, 1e-3, "cosine") == pytest.approx(1e-3)
    assert lr_at(50, 100, 1e-3, "cosine") == pytest.approx(0.5e-3)
    assert lr_at(25, 100, 2.0, "cosine") == pytest.approx(1.0 + 2 ** -0.5)  # ½·2·(1 + cos π/4)
    last = lr_at(99, 100, 1e-3, "cosine")
    assert 0 < last < 1e-6 and last == pytest.approx(1e-3 * 0.5 * (1 - math.cos(math.pi / 100)))
    rates = [lr_at(s, 37, 1.0, "cosine") for s in range(37)]
    assert all(b < a for a, b in zip(rates, rates[1:], strict=False))
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1e-3, "linear")
    # a fall over the last 4 of 10 steps: lr until it starts, then the same half cosine squeezed into 4 steps
    tail = [lr_at(s, 10, 1.0, "cosine", 4) for s in range(10)]
    assert tail[:7] == [1.0] * 7
    assert tail[6:] == pytest.approx([lr_at(k, 4, 1.0, "cosine") for k in range(4)])
    assert lr_at(3, 10, 1.0, "cosine", 10) == lr_at(3, 10, 1.0, "cosine")  # the whole run: the default


def test_cosine_schedule_sets_the_optimiser_rate(mnist, monkeypatch):
    """fit hands Adam lr_at(step) at every step, records each epoch's last rate, and a constant run keeps lr."""
    train, _ = mnist
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = TrainConfig(epochs=2, batch_size=500, lr=1e-2, seed=0, lr_schedule="cosine")
    hist = fit(_model(), train, cfg, progress=False).history
    total = 2 * math.ceil(N_TRAIN / 500)
    assert seen == pytest.approx([lr_at(s, total, 1e-2, "cosine") for s in range(total)])
    assert [row["lr"] for row in hist] == pytest.approx([seen[total // 2 - 1], seen[-1]])
    seen.clear()  # 12 steps, the fall over the last 1.5 epochs: 6 steps at lr, then 6 on the cosine
    fit(_model(), train, TrainConfig(epochs=3, batch_size=500, lr=1e-2, seed=0, lr_schedule="cosine",
                                     lr_decay_epochs=1.5), progress=False)
    assert seen == pytest.approx([1e-2] * 6 + [lr_at(k, 6, 1e-2, "cosine") for k in range(6)])
    seen.clear()
    hist = fit(_model(), train, TrainConfig(epochs=1, batch_size=500, lr=1e-2, seed=0), progress=False).history
    assert seen == [1e-2] * (total // 2) and "lr" not in hist[0]


def test_train_config_validate_accepts_defaults():
    TrainConfig().validate()
    TrainConfig(epochs=1, batch_size=1, lr=1e-5, warmup_epochs=0.0, grad_clip=1.0).validate()


def test_fit_input_errors(mnist):
    x, y = mnist[0]
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ValueError):
        fit(_model(), (x[:10], y[:9]), cfg, progress=False)
    with pytest.raises(ValueError):
        fit(_model(), (x[:10], y[:10]), cfg, resume=True, progress=False)  # resume without checkpoint


# ---------------------------------------------------------------------------------------------------------------
# determinism and resume


def test_same_seed_same_result(mnist):
    train, _ = mnist
    init = _model(seed=3)
    a, b, c = copy.deepcopy(init), copy.deepcopy(init), copy.deepcopy(init)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=1e-3, seed=7)
    ha = fit(a, train, cfg, progress=False).history
    torch.manual_seed(999)  # the global RNG state before fit must not matter
    hb = fit(b, train, cfg, progress=False).history
    _assert_same_state(a, b)
    assert ha[0]["loss"] == hb[0]["loss"]
    fit(c, train, TrainConfig(epochs=1, batch_size=128, lr=1e-3, seed=8), progress=False)
    assert not torch.equal(a.fc1.weight_mu, c.fc1.weight_mu)


def test_resume_equals_uninterrupted(mnist, tmp_path):
    train, test = mnist
    init = _model(seed=4)
    cfg2 = TrainConfig(epochs=2, batch_size=128, lr=1e-3, warmup_epochs=1.5, seed=5)
    cfg1 = TrainConfig(epochs=1, batch_size=128, lr=1e-3, warmup_epochs=1.5, seed=5)

    full = copy.deepcopy(init)
    ck_full = tmp_path / "full.pt"
    h_full = fit(full, train, cfg2, test=test, checkpoint=ck_full, progress=False).history

    first = copy.deepcopy(init)
    ck = tmp_path / "part.pt"
    metrics = tmp_path / "part.jsonl"
    fit(first, train, cfg1, test=test, checkpoint=ck, metrics=metrics, progress=False)
    state = load_checkpoint(ck)
    assert state["epoch"] == 1

    resumed = _model(seed=123)  # a different initialisation: everything must come from the checkpoint
    res = fit(resumed, train, cfg2, test=test, checkpoint=ck, resume=True, metrics=metrics, progress=False)
    _assert_same_state(resumed, full)
    assert [r["epoch"] for r in res.history] == [1, 2]
    # β ramps over 1.5 epochs and is reported at each epoch's last step
    assert [r["beta"] for r in h_full] == pytest.approx([2 / 3, 1.0])
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in res.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in h_full]
    assert len(metrics.read_text().splitlines()) == 2
    # the checkpoints of both runs agree too
    s_full, s_res = load_checkpoint(ck_full), load_checkpoint(ck)
    assert s_full["epoch"] == s_res["epoch"] == 2
    for k in s_full["model"]:
        assert torch.equal(s_full["model"][k], s_res["model"][k]), k


def test_cosine_resume_equals_uninterrupted_and_cannot_be_extended(mnist, tmp_path):
    """The rate is a function of the global step: a resumed cosine run is bit-identical; more epochs are refused."""
    train, _ = mnist
    init = _model(seed=6)
    cfg = TrainConfig(epochs=2, batch_size=256, seed=2, lr_schedule="cosine")
    full = copy.deepcopy(init)
    h_full = fit(full, train, cfg, progress=False).history

    class Killed(Exception):
        pass

    def kill_in_epoch_2(row):  # on_epoch runs before the epoch's checkpoint: epoch 1's is the newest
        if row["epoch"] == 2:
            raise Killed

    ck = tmp_path / "cos.pt"
    with pytest.raises(Killed):
        fit(copy.deepcopy(init), train, cfg, checkpoint=ck, progress=False, on_epoch=kill_in_epoch_2)
    assert load_checkpoint(ck)["epoch"] == 1
    resumed = _model(seed=99)
    h_res = fit(resumed, train, cfg, checkpoint=ck, resume=True, progress=False).history
    _assert_same_state(resumed, full)
    assert h_res[1]["lr"] == h_full[1]["lr"] and h_res[1]["loss"] == h_full[1]["loss"]
    # the curve is laid out over 2 epochs: a 3-epoch resume would jump back up the cosine
    ck2 = tmp_path / "cos2.pt"
    with pytest.raises(Killed):
        fit(copy.deepcopy(init), train, cfg, checkpoint=ck2, progress=False, on_epoch=kill_in_epoch_2)
    longer = TrainConfig(epochs=3, batch_size=256, seed=2, lr_schedule="cosine")
    with pytest.raises(CheckpointError, match="cannot be extended"):
        fit(_model(), train, longer, checkpoint=ck2, resume=True, progress=False)
    # ... as would switching the schedule
    with pytest.raises(CheckpointError, match=r"lr_schedule='cosine' \(now 'constant'\)"):
        fit(_model(), train, TrainConfig(epochs=2, batch_size=256, seed=2), checkpoint=ck2, resume=True, progress=False)


def test_resume_rejects_checkpoint_of_another_model(mnist, tmp_path):
    train, _ = mnist
    ck = tmp_path / "other.pt"
    save_checkpoint(ck, {"model": {"w": torch.zeros(2)}, "epoch": 1})
    with pytest.raises(CheckpointError):
        fit(_model(), train, TrainConfig(epochs=2), checkpoint=ck, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ck.pt"
    state = {"a": torch.arange(5), "b": {"c": 1.5, "d": [1, 2]}, "e": "text"}
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["a"], state["a"]) and back["b"] == state["b"] and back["e"] == "text"
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_corrupt_checkpoint(tmp_path, mnist):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": _model().state_dict(), "epoch": 1})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        fit(_model(), mnist[0], TrainConfig(epochs=2), checkpoint=path, resume=True, progress=False)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2, 3], path)  # readable but not a dict
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_checkpoint_with_code_payload_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload(str(target))}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not target.exists()
    # control: the payload is real — an unsafe load does run it
    control = tmp_path / "control"
    path2 = tmp_path / "evil2.pt"
    torch.save({"x": _Payload(str(control))}, path2)
    torch.load(path2, weights_only=False)
    assert control.exists()


# ---------------------------------------------------------------------------------------------------------------
# divergence


@pytest.mark.parametrize("param", ["fc1.weight_mu", "fc2.weight_logvar", "fc3.z_mu"])
def test_nan_parameter_is_named(param, mnist):
    model = _model()
    with torch.no_grad():
        model.get_parameter(param).view(-1)[3] = float("nan")
    with pytest.raises(TrainingDivergedError) as info:
        fit(model, mnist[0], TrainConfig(epochs=1, batch_size=128), progress=False)
    msg = str(info.value)
    assert param in msg
    assert re.search(r"step 1\b", msg), msg
    assert isinstance(info.value, FloatingPointError)


def test_nan_data_is_reported(mnist):
    x, y = mnist[0]
    x = x[:256].clone()
    x[200] = float("nan")  # in the second batch of 128
    with pytest.raises(TrainingDivergedError) as info:
        fit(_model(), (x, y[:256]), TrainConfig(epochs=1, batch_size=128, seed=0), progress=False)
    assert "the input batch holds NaN/inf values; the data are damaged" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"batch_size": 2.5}, {"eval_every": 0}])
def test_train_config_validate_rejects_bad_batch_size_and_eval_every(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs).validate()
