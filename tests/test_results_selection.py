"""Every results file says how its settings were chosen, and nothing chosen on the test set claims the paper.

`selection` is one of: `fixed` (set before any run: the paper's or tutorial's values, a default), `rule`
(computed from the posterior alone, e.g. the Otsu split), `validation` (chosen on a split held out of the
training set), `test` (chosen by reading test errors: a diagnostic) or `none` (a sweep or a timing that
chooses nothing). Files with rows record it per row; each selection comes with a one-sentence note.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SELECTIONS = {"fixed", "rule", "validation", "test", "none"}
#: the verdict table1.py writes for a row chosen on test errors
DIAGNOSTIC = "diagnostic (settings chosen on test errors)"


def entries(data) -> list[dict]:
    """The records of a results file that must each carry a selection: its rows, or the file itself."""
    if isinstance(data, list):
        return data
    if isinstance(data.get("rows"), list):
        return data["rows"]
    return [data]


def selection_values(entry: dict) -> list:
    """The selection(s) an entry records: one value, or, as fast.json does, one per kind of setting."""
    sel = entry.get("selection")
    if isinstance(sel, dict):
        return [v for k, v in sel.items() if k != "how"]
    return [sel]


def claims_paper(verdict) -> bool:
    """Whether a verdict says the paper's figure is met: "yes", True, or a count of seeds that meet it."""
    if isinstance(verdict, str):
        return verdict.strip().lower().startswith("yes")
    if isinstance(verdict, bool):
        return verdict
    return isinstance(verdict, int) and verdict > 0


def problems(name: str, data) -> list[str]:
    """What is wrong with one results file's selection records (empty: nothing)."""
    found = []
    for i, entry in enumerate(entries(data)):
        where = f"{name}[{i}]" if entry is not data else name
        values = selection_values(entry)
        if not values or any(v not in SELECTIONS for v in values):
            found.append(f"{where}: selection {entry.get('selection')!r} not one of {sorted(SELECTIONS)}")
            continue
        sel = entry["selection"]
        note = sel.get("how") if isinstance(sel, dict) else entry.get("selection_note") or entry.get("selection_how")
        if not isinstance(note, str) or not note.strip():
            found.append(f"{where}: no selection_note saying what the selection rests on")
        for key, verdict in entry.items():
            if "meets" not in key:
                continue
            if "test" in values and verdict != DIAGNOSTIC and verdict is not None and verdict is not False:
                found.append(f"{where}: chosen on the test set but {key} = {verdict!r}, not {DIAGNOSTIC!r}")
            if claims_paper(verdict) and ("test" in values or "none" in values):
                found.append(f"{where}: {key} = {verdict!r} with selection {values}")
    return found


def load(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


RESULT_FILES = sorted([*RESULTS.glob("*.json"), *RESULTS.glob("*.jsonl")])


def test_the_folder_holds_the_results_files():
    names = {p.name for p in RESULT_FILES}
    assert {"table1.json", "fast.json", "peers.json", "recipe_search.jsonl", "tau0_sweep.json"} <= names
    assert len(RESULT_FILES) > 60


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_every_results_file_records_its_selection(path):
    assert problems(path.name, load(path)) == []


def test_the_check_catches_a_missing_selection_and_a_test_chosen_claim():
    """The folder test is not vacuous: a new file without `selection`, a value outside the set, a missing note
    and a test-chosen row that says it meets the paper are each reported."""
    assert problems("new.json", {"test_error": 1.7}) != []
    assert problems("new.json", {"test_error": 1.7, "selection": "tuned", "selection_note": "x"}) != []
    assert problems("new.json", {"test_error": 1.7, "selection": "fixed"}) != []
    chosen_on_test = {"selection": "test", "selection_note": "cut read off the test errors"}
    assert problems("t.json", [{**chosen_on_test, "meets_paper": "yes"}]) != []
    assert problems("t.json", {"rows": [{**chosen_on_test, "meets_paper": 2}]}) != []
    assert problems("t.json", [{**chosen_on_test, "meets_paper": DIAGNOSTIC}]) == []
    assert problems("s.json", {"selection": "none", "selection_note": "a sweep", "meets_paper": True}) != []
    assert problems("f.json", {"selection": "validation", "selection_note": "held-out split", "meets_paper": "yes"}) == []


def test_table1_rows_chosen_on_test_errors_are_diagnostics():
    table = load(RESULTS / "table1.json")
    recipe_rows = {"lenet300_gnj_ft", "lenet300_ghs_tempered", "lenet300_ghs_tempered_ft", "lenet300_ghs_origin_ft"}
    for r in table:
        if r["row"] in recipe_rows:  # settings adopted after comparing test errors (issue 24)
            assert (r["selection"], r["meets_paper"]) == ("test", DIAGNOSTIC), r["row"]
        if claims_paper(r.get("meets_paper")):
            assert r["selection"] in {"fixed", "rule", "validation"}, r["row"]


def test_table1_rows_say_what_their_results_files_say():
    """table1.py takes a row's selection from the file it reads: the table cannot call a row fixed that its
    file records as chosen on test errors."""
    spec = importlib.util.spec_from_file_location("table1_for_selection", ROOT / "benchmarks" / "table1.py")
    table1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table1)
    checked = 0
    for r in load(RESULTS / "table1.json"):
        if r["status"] != "run":
            continue
        source = load(table1._result_path(r["row"], r["seed"], RESULTS))
        assert (r["selection"], r["selection_note"]) == (source["selection"], source["selection_note"]), r["row"]
        checked += 1
    assert checked >= 20


def test_fast_and_peers_rows_were_not_chosen_on_the_test_set():
    for row in load(RESULTS / "fast.json")["rows"]:  # the recipe on validation, thresholds by its rule
        assert (row["selection"]["settings"], row["selection"]["thresholds"]) == ("validation", "rule")
    for row in load(RESULTS / "peers.json")["rows"]:  # the peers' documented usage, fixed beforehand
        assert row["selection"] == "fixed" and "no validation or test data chosen on" in row["selection_how"]


def test_sweeps_and_timings_choose_nothing():
    for path in RESULTS.glob("*threshold_sweep*.json"):
        data = load(path)
        assert data["selection"] == "none" and "every threshold" in data["selection_note"], path.name
    for name in ("speed.json", "speed_rerun.json", "vgg16_epoch_time.json", "lenet300_gnj_coders.json"):
        assert load(RESULTS / name)["selection"] == "none", name


def test_the_recipe_search_reads_validation_data_only():
    for line in load(RESULTS / "recipe_search.jsonl"):
        assert line["selection"] == "validation"
        assert "val" in line and not any("test" in key for key in line)  # its figures are validation figures


def test_table1_stamps_the_selection_of_each_row_it_trains():
    """A results file table1.py writes records its selection, so a rerun row passes the folder test."""
    spec = importlib.util.spec_from_file_location("table1_for_stamp", ROOT / "benchmarks" / "table1.py")
    table1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table1)
    stamped = {row: table1.run_selection(row, table1.row_options(row, 0, True, None))
               for row in ("lenet300_gnj", "lenet300_ghs", "lenet300_gnj_ft", "lenet300_ghs_origin_ft")}
    assert [stamped[r][0] for r in stamped] == ["fixed", "rule", "test", "test"]
    assert all(problems(row, {"selection": sel, "selection_note": note}) == [] for row, (sel, note) in stamped.items())
