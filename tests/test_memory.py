"""The process-wide malloc tuning is opt-in: a library user importing bayescomp or calling fit never gets it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from bayescomp.train import memory

_FIT_ON_CPU = textwrap.dedent("""
    import torch
    import bayescomp
    from bayescomp.train import TrainConfig, fit, memory
    bmodel = bayescomp.bayesianize(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
    x, y = torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,))
    fit(bmodel, (x, y), TrainConfig(epochs=1, batch_size=8), progress=False)
    print(memory._done)
""")


def _fit_in_a_fresh_process(setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != memory.ENV_VAR}
    if setting is not None:
        env[memory.ENV_VAR] = setting
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", _FIT_ON_CPU], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("setting", "default", "wanted"), [
    (None, False, False), (None, True, True), ("1", False, True), ("0", True, False), ("0", False, False),
    ("yes", False, False),
])
def test_tuning_is_wanted_only_when_asked(monkeypatch, setting, default, wanted):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    if setting is not None:
        monkeypatch.setenv(memory.ENV_VAR, setting)
    assert memory.tuning_wanted(default) is wanted


def test_not_asked_means_not_done(monkeypatch):
    monkeypatch.setattr(memory, "_done", False)
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    assert memory.keep_freed_memory() is False
    assert memory._done is False
    monkeypatch.setenv(memory.ENV_VAR, "0")
    assert memory.keep_freed_memory(default=True) is False
    assert memory._done is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_fit_leaves_the_allocator_alone_unless_the_environment_asks():
    assert _fit_in_a_fresh_process(None) == "False"
    assert _fit_in_a_fresh_process("1") == "True"
