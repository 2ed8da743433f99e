"""Surviving faults: SIGKILLed training resumes bit for bit, damaged checkpoints fall back to the previous one,
non-finite gradients are named. A tiny Bayesian MLP on synthetic data keeps every run short."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bayescomp
from bayescomp.train import CheckpointError, TrainConfig, TrainingDivergedError, fit, load_checkpoint, save_checkpoint
from bayescomp.train.rotation import discard_checkpoint, previous_checkpoint

N = 384
CFG = {"batch_size": 16, "lr": 3e-3, "warmup_epochs": 3.0, "seed": 4, "grad_clip": 50.0}

# The child trains and, when done, stores its final state; argv: checkpoint, final state, resume (0/1), epochs,
# then the training set size and the config (JSON).
_CHILD = r"""
import json
import sys

import torch
from torch import nn

import bayescomp
from bayescomp.train import TrainConfig, fit

torch.set_num_threads(1)
ck, out, resume, epochs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
n, cfg = int(sys.argv[5]), json.loads(sys.argv[6])
g = torch.Generator().manual_seed(0)
x = torch.randn(n + 64, 1, 8, 8, generator=g)
y = (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1)
torch.manual_seed(1)
model = bayescomp.bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), max_var=0.05)
fit(model, (x[:n], y[:n]), TrainConfig(epochs=epochs, **cfg), test=(x[n:], y[n:]), checkpoint=ck,
    metrics=ck + ".jsonl", resume=resume, progress=False)
torch.save(model.state_dict(), out)
"""


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 64, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1)
    return (x[:N], y[:N]), (x[N:], y[N:])


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return bayescomp.bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                                 max_var=0.05)


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


# ---------------------------------------------------------------------------------------------------------------
# real kills


def _signature(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def test_sigkilled_training_resumes_bit_for_bit(tmp_path):
    # enough epochs that five kills fit even when an epoch is much shorter than the random kill delay (≤ 0.25 s):
    # with 20, a CI run whose epochs took ~50 ms reached the end after four kills (epochs 5, 10, 14, 20)
    epochs, kills_wanted = 40, 5
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    ck, final = tmp_path / "ck.pt", tmp_path / "final.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    rng = random.Random(20240607)
    kills, lives, epochs_at_kill = 0, 0, []
    t0 = time.perf_counter()
    while True:
        lives += 1
        assert lives <= 3 * kills_wanted, "training never finished"
        before = _signature(ck)
        proc = subprocess.Popen([sys.executable, str(script), str(ck), str(final), "1" if before else "0", str(epochs),
                                 str(N), json.dumps(CFG)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if kills < kills_wanted:
                # wait for a checkpoint newer than the one this life started from, then kill at a random moment
                while _signature(ck) in (before, None) and proc.poll() is None:
                    time.sleep(0.002)
                if proc.poll() is None:
                    time.sleep(rng.uniform(0.0, 0.25))
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    if proc.returncode == -signal.SIGKILL:
                        kills += 1
                        epochs_at_kill.append(load_checkpoint(ck)["epoch"])
                        continue
            err = proc.communicate(timeout=120)[1].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        if final.exists():
            break
    seconds = time.perf_counter() - t0
    assert kills >= 5, (kills, epochs_at_kill)
    assert epochs_at_kill == sorted(set(epochs_at_kill)), epochs_at_kill  # each life got further

    # the uninterrupted run, here
    (train, test), model = _data(), _model()
    ref = fit(model, train, TrainConfig(epochs=epochs, **CFG), test=test, progress=False).history
    _equal_states(torch.load(final, weights_only=True), model.state_dict())
    # the metrics file holds each epoch once, as the uninterrupted run reported it
    rows = [json.loads(line) for line in Path(str(ck) + ".jsonl").read_text().splitlines()]
    assert _strip(rows) == _strip(ref)
    assert load_checkpoint(ck)["epoch"] == epochs and load_checkpoint(previous_checkpoint(ck))["epoch"] == epochs - 1
    assert not list(tmp_path.glob(".*.tmp")), "temp files of killed writes are cleaned up on resume"
    print(f"{kills} kills at epochs {epochs_at_kill}, {lives} lives, {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# damaged checkpoints


@pytest.fixture(scope="module")
def uninterrupted():
    (train, test), model = _data(), _model()
    history = fit(model, train, TrainConfig(epochs=4, **CFG), test=test, progress=False).history
    return model.state_dict(), history


def _three_epochs(tmp_path: Path) -> Path:
    ck = tmp_path / "ck.pt"
    train, test = _data()
    fit(_model(), train, TrainConfig(epochs=3, **CFG), test=test, checkpoint=ck, metrics=tmp_path / "m.jsonl",
        progress=False)
    assert load_checkpoint(ck)["epoch"] == 3
    assert load_checkpoint(previous_checkpoint(ck))["epoch"] == 2
    return ck


def _resume_to_four(ck: Path):
    train, test = _data()
    model = _model(seed=77)
    history = fit(model, train, TrainConfig(epochs=4, **CFG), test=test, checkpoint=ck, metrics=ck.parent / "m.jsonl",
                  resume=True, progress=False).history
    return model, history


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, uninterrupted):
    ck = _three_epochs(tmp_path)
    raw = ck.read_bytes()
    ck.write_bytes(raw[: len(raw) // 2])
    stale = tmp_path / ".ck.pt.k1ll3d.tmp"  # what a killed atomic write leaves
    stale.write_bytes(b"half")
    with pytest.warns(RuntimeWarning, match=r"ck\.pt\.prev"):
        model, history = _resume_to_four(ck)
    _equal_states(model.state_dict(), uninterrupted[0])
    assert _strip(history) == _strip(uninterrupted[1])
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # epoch 3 redone, reported once
    assert load_checkpoint(ck)["epoch"] == 4 and load_checkpoint(previous_checkpoint(ck))["epoch"] == 3
    assert not stale.exists()
    discard_checkpoint(ck)
    assert not ck.exists() and not previous_checkpoint(ck).exists()


def test_both_checkpoints_damaged_is_an_error_naming_them(tmp_path):
    ck = _three_epochs(tmp_path)
    ck.write_bytes(b"")
    prev = previous_checkpoint(ck)
    prev.write_bytes(prev.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        _resume_to_four(ck)
    assert str(ck) in str(info.value) and str(prev) in str(info.value)
    ck.unlink()
    with pytest.raises(CheckpointError, match=r"ck\.pt\.prev"):  # newest gone, previous damaged
        _resume_to_four(ck)


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_checkpoint_with_code_payload_is_skipped_not_run(tmp_path, uninterrupted):
    """A newest checkpoint carrying a pickled payload is refused (weights_only) like a damaged one."""
    ck = _three_epochs(tmp_path)
    target = tmp_path / "pwned"
    torch.save({"model": {}, "epoch": 3, "x": _Payload(str(target))}, ck)
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        model, _ = _resume_to_four(ck)
    assert not target.exists()
    _equal_states(model.state_dict(), uninterrupted[0])


def test_resume_with_other_settings_is_refused(tmp_path):
    ck = _three_epochs(tmp_path)
    train, _ = _data()
    with pytest.raises(CheckpointError, match=r"lr=0\.003 \(now 0\.01\)"):
        fit(_model(), train, TrainConfig(epochs=4, **{**CFG, "lr": 1e-2}), checkpoint=ck, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="training examples"):
        fit(_model(), (train[0][:100], train[1][:100]), TrainConfig(epochs=4, **CFG), checkpoint=ck, resume=True,
            progress=False)


def test_resume_with_another_number_of_processes_warns(tmp_path):
    ck = _three_epochs(tmp_path)
    state = load_checkpoint(ck)
    state["world_size"] = 2
    state["torch_rng_ranks"] = torch.stack([state["torch_rng"], state["torch_rng"]])
    save_checkpoint(ck, state)
    with pytest.warns(RuntimeWarning, match="2 process"):
        _, history = _resume_to_four(ck)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# numerical guards


def _nan_grad(model: nn.Module, name: str) -> None:
    model.get_parameter(name).register_hook(lambda g: torch.full_like(g, float("nan")))


def test_check_grads_names_the_parameter_at_once():
    train, _ = _data()
    model = _model()
    _nan_grad(model, "3.weight_mu")
    cfg = TrainConfig(epochs=1, **{**CFG, "grad_clip": None, "check_grads": True})
    with pytest.raises(TrainingDivergedError, match=r"gradient of 3\.weight_mu became non-finite at epoch 1, step 1\b"):
        fit(model, train, cfg, progress=False)
    # without the check (and without clipping) the NaN shows one step later, in the loss, still named
    model = _model()
    _nan_grad(model, "3.weight_mu")
    with pytest.raises(TrainingDivergedError, match=r"step 2\b.*3\.weight_mu"):
        fit(model, train, TrainConfig(epochs=1, **{**CFG, "grad_clip": None}), progress=False)
    # with clipping, the non-finite norm is caught at once
    model = _model()
    _nan_grad(model, "1.z_mu")
    with pytest.raises(TrainingDivergedError, match=r"gradient of 1\.z_mu .*step 1\b"):
        fit(model, train, TrainConfig(epochs=1, **CFG), progress=False)


def test_check_grads_must_be_a_bool():
    with pytest.raises(ValueError, match="check_grads"):
        TrainConfig(check_grads=1).validate()
    TrainConfig(check_grads=True).validate()
