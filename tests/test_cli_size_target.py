"""--target-kept and --max-multiply-adds on the command line: compress and prune meet the budget, and the report
says which rule chose the thresholds; bad combinations fail before any folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from bayescomp.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets"))
SMALL = ["--model", "lenet300", "--prior", "gnj", "--epochs", "1", "--train-subset", "2000", "--data-dir", str(DATA),
         "--quiet"]


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("target") / "run"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--target-kept", "0.05", *SMALL])
    assert result.exit_code == 0, result.output
    return out


def test_compress_meets_target_kept(target_run):
    report = json.loads((target_run / "report.json").read_text())
    budget = math.floor(0.05 * 266_200)
    assert report["weights_kept"] <= budget
    st = report["size_target"]
    assert st["rule"] == "size-target" and st["target_kept"] == 0.05 and st["budget"] == budget
    assert st["reached"] == report["weights_kept"]
    assert {c["method"] for c in report["threshold_choice"].values()} == {"size-target"}
    assert report["config"]["target_kept"] == 0.05
    assert report["multiply_adds_total"] == 266_200
    assert report["multiply_adds_kept"] == report["weights_kept"]  # a chain of Linear layers: one each


@pytest.mark.filterwarnings("ignore::bayescomp.convert.CompressionWarning")  # -3 keeps all: 1 epoch
def test_prune_to_a_multiply_add_budget(target_run, tmp_path):
    out = tmp_path / "pruned"
    result = CliRunner().invoke(main, ["prune", str(target_run), "--out", str(out), "--max-multiply-adds", "5000",
                                       "--data-dir", str(DATA)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["multiply_adds_kept"] <= 5000
    assert report["size_target"]["max_multiply_adds"] == 5000 and report["size_target"]["target_kept"] is None
    # pruned again at given thresholds: no size target any more
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["prune", str(target_run), "--out", str(again), "--thresholds", "-3",
                                       "--data-dir", str(DATA)])
    assert result.exit_code == 0, result.output
    assert "size_target" not in json.loads((again / "report.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--target-kept", "0.1", "--thresholds", "-3"], "not with --thresholds"),
    (["--target-kept", "0.1", "--auto-thresholds", "histogram"], "not with --thresholds or --auto-thresholds"),
    (["--target-kept", "1.5"], "--target-kept is the share of the weights kept"),
    (["--target-kept", "0"], "--target-kept is the share of the weights kept"),
    (["--max-multiply-adds", "0"], "--max-multiply-adds must be a positive integer"),
    (["--target-kept", "0.1", "--max-multiply-adds", "100"], "give one size target"),
])
def test_bad_size_targets_fail_before_any_folder(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), *SMALL, *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_prune_refuses_target_with_thresholds(target_run, tmp_path):
    out = tmp_path / "p"
    result = CliRunner().invoke(main, ["prune", str(target_run), "--out", str(out), "--target-kept", "0.1",
                                       "--thresholds", "-3", "--data-dir", str(DATA)])
    assert result.exit_code != 0 and "not with --thresholds" in result.output
    assert not out.exists()


def test_a_target_below_the_floor_fails_cleanly(target_run, tmp_path):
    out = tmp_path / "p"
    result = CliRunner().invoke(main, ["prune", str(target_run), "--out", str(out), "--max-multiply-adds", "3",
                                       "--data-dir", str(DATA)])
    assert result.exit_code != 0 and "below the floor" in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()
