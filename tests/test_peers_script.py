"""benchmarks/peers.py: its smoke mode prunes each peer to the target, within the budget, and writes every field;
bad options are refused in one line before any data is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
DATA = os.environ.get("BAYESCOMP_DATA", str(ROOT.parent / "shared" / "datasets"))
#: weights of LeNet-300-100 and LeNet-5-Caffe (Linear/Conv2d weights, biases excluded)
TOTAL = {"lenet300": 266_200, "lenet5": 430_500}
#: the fields of every results row
FIELDS = {"model", "method", "setting", "seed", "test_error", "weights_kept_pct", "target_weights_kept_pct",
          "weights_kept", "weights_total", "zeros_fraction", "architecture", "file_bytes", "wall_seconds",
          "budget_seconds", "pretrain_seconds", "ratio_search_seconds", "prune_finetune_seconds", "last_step_started_seconds", "finetune_epochs",
          "finetune_steps", "prune_steps", "prune_steps_trained", "channel_ratio", "pretrained_from", "selection",
          "selection_how", "bayescomp"}
#: a Torch-Pruning model is within this many points of the target kept % (one neuron of fc1 is 0.3 point of
#: LeNet-300-100, one conv2 channel about 0.4 point of LeNet-5 at these widths)
TP_TOLERANCE = 0.5
BUDGET = 3.0


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, BAYESCOMP_DATA=DATA, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _dense_weights(model: str, arch: str) -> int:
    """Weights of the dense network with these widths (bayescomp's notation: Linear inputs, Conv2d outputs)."""
    a = [int(v) for v in arch.split("-")]
    if model == "lenet300":
        return a[0] * a[1] + a[1] * a[2] + a[2] * 10
    c1, c2, f1, f2 = a
    assert f1 == 16 * c2  # fc1 reads the 4×4 maps of conv2's kept channels
    return c1 * 25 + c2 * c1 * 25 + f1 * f2 + f2 * 10


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peers")
    fast = tmp / "fast.json"  # lenet300's targets from a fast.json: the mean over seeds of its GNJ row
    fast.write_text(json.dumps({"rows": [
        {"model": "lenet300", "prior": "gnj", "weights_kept_pct": 20.0, "wall_seconds": BUDGET, "test_error": 2.0,
         "seeds": [{"seed": 0, "weights_kept_pct": 18.0, "wall_seconds": BUDGET - 1, "test_error": 1.9},
                   {"seed": 1, "weights_kept_pct": 22.0, "wall_seconds": BUDGET + 1, "test_error": 2.1}]},
        {"model": "lenet300", "prior": "gnj", "target_kept": 10.8, "weights_kept_pct": 10.8, "wall_seconds": 90.0,
         "seeds": [{"seed": 5, "weights_kept_pct": 10.8, "wall_seconds": 90.0, "test_error": 1.5}]},
        {"model": "lenet300", "prior": "ghs", "weights_kept_pct": 60.0, "wall_seconds": 100.0}]}))
    out = tmp / "peers.json"
    proc = _run("--smoke", "--fast", str(fast), "--kept", "lenet5=5", "--budget", f"lenet5={BUDGET}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_smoke_writes_every_row_and_field(smoke):
    rows = smoke["rows"]
    assert {(r["model"], r["method"], r["setting"]) for r in rows} == {
        (m, method, s) for m in TOTAL for method in ("torch_pruning", "torch_pruning_global", "magnitude")
        for s in ("equal_kept", "equal_time")}
    assert smoke["command"].startswith("python ") and "--smoke" in smoke["command"]
    assert {"cpu", "threads", "torch", "torch_pruning", "load_average_at_start", "load_average_at_end"} <= set(smoke["machine"])
    for r in rows:
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert 0.0 <= r["test_error"] <= 100.0
        assert r["weights_total"] == TOTAL[r["model"]]
        assert r["weights_kept_pct"] == pytest.approx(100.0 * r["weights_kept"] / r["weights_total"])
        assert r["selection"] == "fixed" and r["selection_how"]
        assert r["wall_seconds"] == pytest.approx(r["pretrain_seconds"] + (r["ratio_search_seconds"] or 0.0)
                                                  + r["prune_finetune_seconds"])
        assert r["prune_steps_trained"] <= r["prune_steps"] == 5


def test_targets_come_from_fast_json_means_or_the_options(smoke):
    for r in smoke["rows"]:
        if r["model"] == "lenet300":  # the mean of seeds 0 and 1 of the GNJ row: not the GHS row, not the cut one
            assert r["target_weights_kept_pct"] == pytest.approx(20.0)
            assert r["bayescomp"]["seeds"] == [0, 1] and r["bayescomp"]["test_error"] == pytest.approx(2.0)
            assert r["bayescomp"]["wall_seconds"] == pytest.approx(BUDGET)
        else:
            assert r["target_weights_kept_pct"] == 5.0 and r["bayescomp"] is None
        assert r["budget_seconds"] == (BUDGET if r["setting"] == "equal_time" else None)


def test_torch_pruning_gives_a_smaller_dense_model_at_the_target(smoke):
    for r in smoke["rows"]:
        if not r["method"].startswith("torch_pruning"):
            continue
        assert abs(r["weights_kept_pct"] - r["target_weights_kept_pct"]) <= TP_TOLERANCE, r
        assert r["weights_kept"] == _dense_weights(r["model"], r["architecture"])  # counts match the widths
        widths = [int(v) for v in r["architecture"].split("-")]
        original = [784, 300, 100] if r["model"] == "lenet300" else [20, 50, 800, 500]
        assert all(w <= o for w, o in zip(widths, original, strict=True)) and sum(widths) < sum(original)
        if r["model"] == "lenet300":
            assert widths[0] == 784  # Torch-Pruning never removes input pixels
        assert r["zeros_fraction"] < 0.01  # dense: no zeros to speak of
        # its state_dict holds the kept weights in float32, far fewer than the original's
        assert 4 * r["weights_kept"] < r["file_bytes"] < 4 * r["weights_total"] * r["target_weights_kept_pct"] / 50
        assert 0.0 < r["channel_ratio"] < 1.0


def test_magnitude_pruning_zeros_the_stated_share(smoke):
    for r in smoke["rows"]:
        if r["method"] != "magnitude":
            continue
        target_zeros = round(r["weights_total"] * (1 - r["target_weights_kept_pct"] / 100))
        assert r["weights_total"] - r["weights_kept"] == target_zeros  # to the weight
        assert r["zeros_fraction"] == pytest.approx(target_zeros / r["weights_total"])
        widths = [int(v) for v in r["architecture"].split("-")]
        assert widths[-1] <= (100 if r["model"] == "lenet300" else 500)
        # the CSR file: at least the float32 values and int16 indices of the nonzeros, well under dense float32
        assert 6 * r["weights_kept"] < r["file_bytes"] < 4 * r["weights_total"]
        assert r["channel_ratio"] is None and r["ratio_search_seconds"] is None


def test_equal_kept_fine_tunes_the_epochs_and_equal_time_stops_at_the_budget(smoke):
    for r in smoke["rows"]:
        if r["setting"] == "equal_kept":
            assert r["finetune_epochs"] == pytest.approx(1.0)  # --smoke: one epoch of fine-tuning in all
            assert r["prune_steps_trained"] == 5
            continue
        spent_before = r["pretrain_seconds"] + (r["ratio_search_seconds"] or 0.0)
        if spent_before < BUDGET:
            # it trains until the budget is spent, and begins no fine-tuning step after it (what comes after
            # the budget is the untrained pruning steps and the evaluation, whose time depends on the load)
            assert r["wall_seconds"] >= BUDGET - 0.05
            if r["finetune_steps"] or spent_before < BUDGET / 2:  # with half the budget left, steps must have run
                assert r["finetune_steps"] > 0
                assert spent_before <= r["last_step_started_seconds"] <= BUDGET
        else:
            assert r["finetune_steps"] == 0 and r["last_step_started_seconds"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "vgg16", "--kept", "lenet300=10", "--budget", "lenet300=60"], "unknown model 'vgg16'"),
    (["--models", "lenet300"], "no target weights kept / budget"),
    (["--models", "lenet300", "--kept", "lenet300=0", "--budget", "lenet300=60"], "must be in (0, 100]"),
    (["--models", "lenet300", "--kept", "lenet300=150", "--budget", "lenet300=60"], "must be in (0, 100]"),
    (["--models", "lenet300", "--kept", "lenet300=10", "--budget", "lenet300=-1"], "must be positive"),
    (["--models", "lenet300", "--kept", "nope=10"], "unknown model 'nope'"),
])
def test_bad_options_exit_non_zero_with_one_line(tmp_path, args, message):
    out = tmp_path / "peers.json"
    proc = _run(*args, "--fast", str(tmp_path / "no_fast.json"), "--out", str(out), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peers.py: error: ") and message in lines[0]
    assert not out.exists() and "pretrained" not in proc.stderr


def test_init_from_another_models_weights_is_refused(tmp_path):
    import torch

    from bayescomp.models import build_model

    state = tmp_path / "lenet5.pt"
    torch.save(build_model("lenet5").state_dict(), state)
    out = tmp_path / "peers.json"
    proc = _run("--models", "lenet300", "--kept", "lenet300=10", "--budget", "lenet300=60", "--init-from",
                f"lenet300={state}", "--out", str(out), timeout=60)
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a state_dict of lenet300" in lines[0]


def test_fast_figures_fall_back_to_rows_cut_to_a_target_only_when_no_other_exists(tmp_path):
    peers = _import_peers()
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps([{"model": "lenet5", "prior": "gnj", "target_kept": 0.9, "seed": s,
                                 "weights_kept_pct": kept, "wall_seconds": 100.0 * (s + 1), "test_error": 1.0}
                                for s, kept in ((0, 0.8), (1, 1.0))]))
    got = peers.fast_figures(fast, "lenet5")
    assert got["seeds"] == [0, 1] and got["weights_kept_pct"] == pytest.approx(0.9)
    assert got["wall_seconds"] == pytest.approx(150.0) and peers.fast_figures(fast, "lenet300") is None


def _import_peers():
    import importlib

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module("peers")
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_default_pretraining_and_finetuning_are_the_fast_recipes_for_each_model():
    import argparse

    from bayescomp.recipes import training_recipe

    peers = _import_peers()
    fast = training_recipe("fast")
    unset = argparse.Namespace(pretrain_epochs=None, finetune_epochs=None)
    for model in ("lenet300", "lenet5"):
        assert peers.pretrain_epochs(unset, model) == fast.for_run(model, "gnj").pretrain_epochs
        assert peers.finetune_epochs(unset, model) == max(5, fast.for_run(model, "gnj").finetune_epochs)
    assert peers.finetune_epochs(unset, "lenet300") == 10  # the GNJ run's own 10 epochs, not the model's 5
    given = argparse.Namespace(pretrain_epochs=3, finetune_epochs=2.5)
    assert (peers.pretrain_epochs(given, "lenet5"), peers.finetune_epochs(given, "lenet5")) == (3, 2.5)


def test_fast_figures_name_the_shipped_results_file_from_the_repository(tmp_path):
    """The source written beside every peer row is the repository's own path, not this checkout's."""
    peers = _import_peers()
    shipped = peers.fast_figures(peers.FAST, "lenet300")
    assert shipped is not None and shipped["source"] == "benchmarks/results/fast.json"
    elsewhere = tmp_path / "fast.json"
    elsewhere.write_text(json.dumps([{"model": "lenet300", "prior": "gnj", "seed": 0, "weights_kept_pct": 9.0,
                                      "wall_seconds": 100.0, "test_error": 1.9}]))
    assert peers.fast_figures(elsewhere, "lenet300")["source"] == str(elsewhere)


def test_help_lists_every_option():
    """`--help` prints (argparse formats each help string with `%`: a bare one broke it) and names each option."""
    done = _run("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--models", "--kept", "--budget", "--seeds", "--init-from", "--smoke", "--out"):
        assert flag in done.stdout
    assert "% of the" in done.stdout
