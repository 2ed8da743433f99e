"""The terminal summary of a report (`bayescomp compress`, `prune`, `show`): what a user must not miss."""

from __future__ import annotations

from bayescomp.report.table import format_table, summary_rows

REPORT = {"model": "lenet300", "prior": "ghs", "epochs": 200, "test_error": 1.79, "test_error_uncompressed": 1.75,
          "architecture": "784-61-56", "weights_kept": 51800, "weights_total": 266200, "weights_kept_pct": 19.46,
          "bits": [6, 4, 9], "cr_architecture": 5.1, "cr_fast": 16.6,
          "thresholds": {"fc1": 6.64, "fc2": 2.2387, "fc3": 2.58}}


def test_a_layer_the_histogram_rule_could_not_split_is_named():
    report = dict(REPORT, threshold_choice={
        "fc1": {"value": 6.64, "method": "otsu", "details": {"degenerate": True}},
        "fc2": {"value": 2.2387, "method": "otsu", "details": {"separability": 0.94}},
        "fc3": {"value": 2.58, "method": "otsu", "details": {"separability": 0.84}}})
    rows = dict(summary_rows(report))
    assert rows["thresholds (log α)"] == "fc1 6.64 (no split found: every group kept), fc2 2.24, fc3 2.58"
    # explicit thresholds carry no choice: plain values
    assert dict(summary_rows(REPORT))["thresholds (log α)"] == "fc1 6.64, fc2 2.24, fc3 2.58"
    assert "thresholds (log α)" in format_table(summary_rows(report))
    floor = dict(report, thresholds=dict(REPORT["thresholds"], fc1=2.0), threshold_choice={
        "fc1": {"value": 2.0, "method": "otsu", "details": {"degenerate": True, "no_split": "floor"}}})
    assert dict(summary_rows(floor))["thresholds (log α)"] == \
        "fc1 2.00 (no split found: cut at the noise floor), fc2 2.24, fc3 2.58"


def test_an_unfinished_fine_tuning_says_how_far_it_got():
    report = dict(REPORT, unfinished={"from": "r.partial", "epochs_trained": 200, "epochs": 200,
                                      "finetune_epochs_done": 3, "finetune_epochs": 10})
    rows = dict(summary_rows(report))
    assert rows["epochs"] == "200 of 200 (unfinished run)"
    assert rows["fine-tuning epochs"] == "3 of 10 (unfinished)"
    assert "fine-tuning epochs" not in dict(summary_rows(REPORT))
