"""Every benchmark script that writes a results file stamps `selection` and `selection_note` from what it did, so
a rerun still passes tests/test_results_selection.py; settings given on the command line without saying how they
were chosen are refused before anything is run or written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_results_selection import DIAGNOSTIC, problems

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DATA = os.environ.get("BAYESCOMP_DATA", str(ROOT.parent / "shared" / "datasets"))


def _script(name: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, BAYESCOMP_DATA=DATA, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module (they import their siblings, so benchmarks/ goes on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def _last_two(record: dict) -> list[str]:
    return list(record)[-2:]


# ---- the shared helper -----------------------------------------------------------------------------------

def test_stamp_puts_the_two_keys_last_and_refuses_an_unknown_selection(bench):
    sel = bench("selection")
    out = sel.stamp({"selection": "fixed", "a": 1, "selection_note": "old", "b": 2}, "rule", "Otsu")
    assert list(out) == ["a", "b", "selection", "selection_note"] and out["selection"] == "rule"
    with pytest.raises(ValueError, match="one of"):
        sel.stamp({}, "tuned", "x")
    with pytest.raises(ValueError, match="note"):
        sel.stamp({}, "fixed", "  ")
    assert sel.combine("fixed", "rule") == "rule" and sel.combine("validation", "fixed", "rule") == "validation"
    assert sel.combine("rule", "test") == "test"
    assert [sel.auto_threshold_selection(a)[0] for a in (None, "histogram", "validation")] == \
        ["fixed", "rule", "validation"]


# ---- paper_setting.py and resnet_mnist.py: the options the run used ---------------------------------------

def _selection_of(module, argv: list[str], *previous) -> tuple[str, str]:
    """The selection a script's run_selection gives for the command line `argv` (nothing is run)."""
    parser = module.build_parser()
    return module.run_selection(parser, parser.parse_args(argv), *previous)


def test_paper_setting_at_its_defaults_is_fixed_and_explicit_settings_take_the_users_word(bench):
    ps = bench("paper_setting")
    assert _selection_of(ps, ["--model", "lenet300", "--prior", "gnj", "--seed", "3"]) == ("fixed", ps.DEFAULTS_NOTE)
    assert _selection_of(ps, ["--epochs", "200", "--selection", "fixed", "--selection-note", "the paper's 200"]) == \
        ("fixed", "the paper's 200")
    sel, note = _selection_of(ps, ["--thresholds", "fc1=-3.5", "--selection", "test", "--selection-note", "read off"])
    assert (sel, note) == ("test", "read off")
    assert problems("paper_setting.json", {"selection": sel, "selection_note": note}) == []


def test_paper_setting_refuses_explicit_thresholds_without_selection(tmp_path):
    out = tmp_path / "r.json"
    for extra, message in ((["--thresholds", "-3"], "--thresholds given on the command line"),
                           (["--epochs", "200", "--tau0", "1e-3"], "--epochs, --tau0 given"),
                           (["--thresholds", "-3", "--selection", "fixed"], "--selection needs --selection-note"),
                           (["--selection-note", "why"], "--selection-note needs --selection")):
        proc = _script("paper_setting.py", "--out", str(out), *extra, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
        assert "step time" not in proc.stdout and not out.exists()


def test_paper_setting_from_run_keeps_the_files_selection_unless_thresholds_change(bench):
    ps = bench("paper_setting")
    old = {"selection": "rule", "selection_note": "Otsu splits"}

    def of(argv, previous):
        return _selection_of(ps, argv, previous)

    assert of(["--from-run", "r"], old) == ("rule", "Otsu splits")
    with pytest.raises(SystemExit):  # new thresholds on an old run: the user says how they were chosen
        of(["--from-run", "r", "--thresholds", "-3"], old)
    with pytest.raises(SystemExit):  # a file with no selection to keep
        of(["--from-run", "r"], {})


def test_paper_setting_from_run_writes_a_stamped_file(tmp_path):
    """The refresh path end to end on a one-epoch run: the file keeps its selection, or takes the user's with new
    thresholds, as its last two keys."""
    from bayescomp.pipeline import RunOptions, run

    run_dir = tmp_path / "run"
    run(RunOptions(model="lenet300", epochs=1, train_subset=300, data_dir=DATA), run_dir)
    out = tmp_path / "lenet300_gnj.json"
    out.write_text(json.dumps({"command": "x", "selection": "fixed", "selection_note": "the paper's settings"}))
    proc = _script("paper_setting.py", "--from-run", str(run_dir), "--out", str(out), "--data-dir", DATA)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert (doc["selection"], doc["selection_note"]) == ("fixed", "the paper's settings") and doc["command"] == "x"
    assert _last_two(doc) == ["selection", "selection_note"] and "test_error" in doc
    proc = _script("paper_setting.py", "--from-run", str(run_dir), "--out", str(out), "--data-dir", DATA,
                   "--thresholds", "-2", "--selection", "test", "--selection-note", "cut read off the test errors")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["selection"] == "test" and problems(out.name, doc) == [] and not list(tmp_path.glob("*.tmp"))


def test_resnet_mnist_joins_the_settings_with_the_threshold_rule(bench):
    rm = bench("resnet_mnist")
    assert _selection_of(rm, [])[0] == "rule"  # the defaults, thresholds by the Otsu split
    assert _selection_of(rm, ["--auto-thresholds", "validation"])[0] == "validation"
    sel, note = _selection_of(rm, ["--epochs", "40", "--selection", "fixed", "--selection-note", "the time budget"])
    assert sel == "rule" and note.startswith("the time budget;") and "histogram rule" in note
    with pytest.raises(SystemExit):
        _selection_of(rm, ["--epochs", "40"])


# ---- scripts with a smoke path: the file they write passes the folder test --------------------------------

def test_vgg_epoch_time_writes_a_timing_that_chooses_nothing(tmp_path):
    out = tmp_path / "vgg.json"
    proc = _script("vgg_epoch_time.py", "--steps", "1", "--batch-size", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["selection"] == "none" and _last_two(doc) == ["selection", "selection_note"]
    assert problems(out.name, doc) == [] and not list(tmp_path.glob("*.tmp"))


def test_speed_writes_a_timing_that_chooses_nothing(tmp_path):
    out = tmp_path / "speed.json"
    proc = _script("speed.py", "--models", "lenet300", "--priors", "gnj", "--rounds", "1", "--reps", "1",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["selection"] == "none" and _last_two(doc) == ["selection", "selection_note"]
    assert "lenet300" in doc and problems(out.name, doc) == []


def test_recipe_search_appends_a_validation_line(tmp_path):
    out = tmp_path / "rs.jsonl"
    proc = _script("recipe_search.py", "--pre", "0", "--epochs", "1", "--bs", "1024", "--tag", "t", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(v) for v in out.read_text().splitlines()]
    assert line["selection"] == "validation" and _last_two(line) == ["selection", "selection_note"]
    assert "val" in line and not any("test" in k for k in line) and problems(out.name, [line]) == []


def test_recipe_search_prunes_in_stages_and_a_switched_off_group_stays_off(tmp_path):
    out = tmp_path / "rs.jsonl"
    proc = _script("recipe_search.py", "--pre", "0", "--epochs", "3", "--bs", "1024", "--lr", "1e-2", "--stage-from", "2",
                   "--tag", "t", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(v) for v in out.read_text().splitlines()]
    stages = line["stages"]
    assert [epoch for epoch, _ in stages] == [2, 3]
    (_, first), (_, last) = stages
    assert set(first) == {"fc1", "fc2", "fc3"} and all(0 < last[k] <= first[k] for k in first)
    assert first["fc1"] <= 784 and first["fc2"] <= 300 and first["fc3"] <= 100
    # on: below the threshold now and never switched off, so at most the groups below it now (the curve's count)
    assert all(last[k] <= line["curve"][-1][2][k] for k in last)
    assert problems(out.name, [line]) == []


# ---- scripts without one: the function that builds the record ---------------------------------------------

def test_tau0_sweep_stamps_the_elbo_choice_as_a_rule(bench):
    ts = bench("tau0_sweep")
    sel = bench("selection")
    doc = sel.stamp({"points": [], "elbo_choice": 1e-5}, *ts.SELECTION)
    assert doc["selection"] == "rule" and "ELBO" in doc["selection_note"] and problems("t.json", doc) == []


def _report(err: float, kept: float, **extra) -> dict:
    return {"test_error": err, "test_error_uncompressed": err - 0.2, "architecture": "300-90-20",
            "weights_kept_pct": kept, "bits": [5, 5, 11], "cr_fast": 30.0, "epochs": 100, **extra}


def test_ghs_clamp_study_rows_carry_their_selection_and_a_test_chosen_row_is_a_diagnostic(bench):
    study = bench("ghs_clamp_study")
    trained = study._row("all_0.2", "all ≤ 0.2", _report(1.7, 10.0), "runs/x", study.TRAINED, None)
    chosen = _report(1.7, 10.0, selection="test", selection_note="cut read off the test errors")
    from_file = study._row("fc1_0.04", "fc1 ≤ 0.04", chosen, "f.json", study.row_selection(chosen, False), None)
    bare = study.row_selection(_report(2.0, 20.0), False)
    assert (trained["selection"], trained["meets_paper"]) == ("rule", True)
    assert (from_file["selection"], from_file["meets_paper"]) == ("test", DIAGNOSTIC)
    assert bare == study.TRAINED
    assert all(_last_two(r) == ["selection", "selection_note"] for r in (trained, from_file))
    assert problems("ghs_clamp_study.json", {"rows": [trained, from_file]}) == []
    lines = study.table_lines([trained, from_file])
    assert lines[-2].endswith("| yes | rule | (posterior not given) |")
    assert f"| {DIAGNOSTIC} | test |" in lines[-1]
