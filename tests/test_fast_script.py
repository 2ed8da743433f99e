"""benchmarks/fast.py: one smoke run end to end (the real command in a subprocess), and its option errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayescomp.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fast.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_smoke_run_records_the_command_figures_and_their_mean(tmp_path):
    try:
        load_mnist("test")
    except Exception as exc:  # pragma: no cover - only without the data set
        pytest.skip(f"MNIST not available: {exc}")
    out = tmp_path / "fast.json"
    proc = _run("--smoke", "--models", "lenet300", "--priors", "gnj", "--seeds", "0,1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["command"].startswith("python benchmarks/fast.py --smoke")
    assert data["recipe"]["name"] == "fast" and data["recipe"]["evidence"]
    (row,) = data["rows"]
    assert (row["model"], row["prior"], row["recipe"], row["smoke"]) == ("lenet300", "gnj", "fast", True)
    assert row["selection"]["settings"] == "validation" and row["selection"]["thresholds"] == "rule"
    seeds = row["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    for s in seeds:
        assert 0 <= s["test_error"] <= 100 and 0 < s["weights_kept_pct"] <= 100
        assert s["file_bytes"] > 0 and s["wall_seconds"] > s["train_seconds"] > 0
        widths = [int(w) for w in s["architecture"].split("-")]  # kept inputs of fc1, fc2, fc3
        assert len(widths) == 3 and 0 < widths[0] <= 784 and 0 < widths[1] <= 300 and 0 < widths[2] <= 100
        assert "--recipe fast" in s["command"] and f"--seed {s['seed']}" in s["command"]
    mean = sum(s["test_error"] for s in seeds) / 2
    assert row["mean"]["test_error"] == pytest.approx(mean) == row["test_error"]
    assert row["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in seeds) / 2)
    # a second run of another prior keeps the first row
    proc = _run("--smoke", "--models", "lenet300", "--priors", "ghs", "--seeds", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["prior"]) for r in rows] == [("lenet300", "gnj"), ("lenet300", "ghs")]
    # each row keeps the call that made it; the top level is the last call's
    assert "--priors gnj" in rows[0]["benchmark_command"] and "--priors ghs" in rows[1]["benchmark_command"]
    assert all(r["machine"]["threads_per_run"] == 1 and len(r["machine"]["load_average_at_start"]) == 3 for r in rows)
    assert "--priors ghs" in json.loads(out.read_text())["command"]
    # a size target: its own row beside the recipe's (same model and prior), the cut at or under it
    proc = _run("--smoke", "--models", "lenet300", "--priors", "gnj", "--seeds", "0", "--target-kept", "5",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prior"], r["target_kept"]) for r in rows] == [("gnj", None), ("gnj", 5.0), ("ghs", None)]
    (run,) = rows[1]["seeds"]
    assert "--target-kept 0.05" in run["command"] and run["weights_kept_pct"] <= 5.0
    assert "size-target rule" in rows[1]["selection"]["how"] and rows[0]["seeds"] == seeds


@pytest.mark.parametrize(("args", "message"), [(["--models", "vgg16"], "unknown model"),
                                               (["--priors", "laplace"], "unknown prior"),
                                               (["--seeds", "a"], "--seeds must be integers"),
                                               (["--seeds", ","], "names no seed"),
                                               (["--target-kept", "0"], "--target-kept must be a percentage"),
                                               (["--target-kept", "150"], "--target-kept must be a percentage")])
def test_bad_options_are_refused_before_any_run(tmp_path, args, message):
    out = tmp_path / "fast.json"
    proc = _run(*args, "--out", str(out), timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and not out.exists()
