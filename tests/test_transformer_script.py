"""benchmarks/transformer.py: a smoke run end to end (the real command in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayescomp.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "transformer.py"


def run_smoke(tmp_path: Path, *extra: str) -> dict:
    """The script's --smoke run in a subprocess (skipped without MNIST); its results file."""
    try:
        load_mnist("test")
    except Exception as exc:  # pragma: no cover - only without the data set
        pytest.skip(f"MNIST not available: {exc}")
    out = tmp_path / "t.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_smoke_run_records_errors_sizes_heads_and_selection(tmp_path):
    data = run_smoke(tmp_path)
    out = tmp_path / "t.json"
    assert data["command"] == f"python benchmarks/transformer.py --smoke --out {out}"
    assert data["smoke"] is True and data["selection"] == "validation" and data["selection_note"]
    assert set(data["test_error"]) == {"plain", "plain_stage1", "bayesian_posterior_mean", "compressed"}
    assert data["max_abs_diff_compressed_vs_masked"] <= 1e-5
    # the uncompressed network counted by hand (bayescomp.multiply_adds: Linear calls only, attention scores not
    # counted): embedding 16·49·64, per block q/k/v/out 4·16·64·64, MLP 2·16·64·128; classifier 64·10
    per_block = 4 * 16 * 64 * 64 + 2 * 16 * 64 * 128
    assert data["multiply_adds_per_image"]["before"] == 16 * 49 * 64 + 2 * per_block + 64 * 10
    assert data["multiply_adds_per_image"]["after"] <= data["multiply_adds_per_image"]["before"]
    assert data["weights"]["after"] <= data["weights"]["before"]
    for block in data["blocks"]:
        assert block["heads_total"] == 8 and block["mlp_neurons_total"] == 128
        assert len(block["heads_kept_index"]) == block["heads_kept"] and len(block["head_log_alpha"]) == 8


def test_smoke_head_search_and_finetune_record_their_choices(tmp_path):
    data = run_smoke(tmp_path, "--head-search", "--finetune-epochs", "1", "--selection", "test",
                     "--selection-note", "smoke")
    assert data["settings"]["finetune_epochs"] == 1 and data["settings"]["head_search"] is True
    assert "compressed_before_finetune" in data["test_error"]
    sweep = data["validation"]["head_sweep"]
    # every head threshold tried lies below the shared one, and the chosen one is the lowest within the slack
    assert sweep and all(s["head_threshold"] < data["threshold"] for s in sweep)
    within = [s["head_threshold"] for s in sweep
              if s["validation_error"] <= data["validation"]["unpruned_error"] + data["validation"]["slack_points"]]
    assert data["head_threshold"] == (within[0] if within else None)


def test_smoke_finetune_length_chosen_on_validation(tmp_path):
    data = run_smoke(tmp_path, "--finetune-epochs", "2", "--finetune-select", "validation", "--selection", "fixed",
                     "--selection-note", "smoke")
    assert data["settings"]["finetune_select"] == "validation" and data["selection"] == "validation"
    assert "fine-tuning length" in data["selection_note"]
    for key in ("finetune_plain", "finetune_compressed"):
        ft = data["validation"][key]
        curve = ft["validation_error_by_epoch"]
        assert ft["max_epochs"] == 2 and len(curve) == 3  # before fine-tuning, then after each epoch
        # the fewest epochs reaching the lowest validation error
        assert ft["chosen_epochs"] == curve.index(min(curve))
