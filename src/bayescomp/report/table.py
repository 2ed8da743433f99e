"""Short plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[tuple[str, Any]]) -> str:
    """Two aligned columns: label, value."""
    width = max((len(str(k)) for k, _ in rows), default=0)
    return "\n".join(f"{str(k):<{width}}  {v}" for k, v in rows)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The headline figures of a report.json, formatted."""
    bits = "-".join("32" if b is None else str(b) for b in report.get("bits", []))
    rows: list[tuple[str, Any]] = [
        ("model", f"{report.get('model')} ({report.get('prior')})"),
        ("epochs", report.get("epochs") if "unfinished" not in report else
         f"{report['unfinished']['epochs_trained']} of {report['unfinished']['epochs']} (unfinished run)"),
        ("test error (%)", f"{report['test_error']:.2f}  (uncompressed {report['test_error_uncompressed']:.2f})"),
    ]
    unfinished = report.get("unfinished") or {}
    if "finetune_epochs_done" in unfinished:
        rows.append(("fine-tuning epochs", f"{unfinished['finetune_epochs_done']} of {unfinished['finetune_epochs']} "
                                           "(unfinished)"))
    if "finetune" in report:
        ft = report["finetune"]
        rows.append(("fine-tuned", f"{ft['epochs']} epochs; before: {ft['test_error_before']:.2f}%  "
                                   f"(uncompressed {ft['test_error_uncompressed_before']:.2f})"))
    if report.get("thresholds"):
        rows.append(("thresholds (log α)", _thresholds(report)))
    rows += [
        ("architecture", report.get("architecture")),
        ("weights kept", f"{report['weights_kept']} of {report['weights_total']} ({report['weights_kept_pct']:.2f}%)"),
        ("bits per layer", bits),
        ("CR architecture", f"{report['cr_architecture']:.1f}x"),
        ("CR fast prediction", f"{report['cr_fast']:.1f}x"),
    ]
    for key, label in (("cr_max", "CR maximum (paper accounting)"), ("cr_file", "CR file")):
        if key in report:
            rows.append((label, f"{report[key]:.1f}x"))
    if "train_seconds" in report:
        rows.append(("training time (s)", f"{report['train_seconds']:.1f}"))
    return rows


def _thresholds(report: dict[str, Any]) -> str:
    """'fc1 -2.80, fc2 -3.00': each layer's threshold, and where an automatic rule found no split in a layer's
    histogram, that it kept every group of it or cut at the prior's noise floor (a user should know that the
    layer was not cut where its histogram parts)."""
    choice = report.get("threshold_choice") or {}
    parts = []
    for name, value in report["thresholds"].items():
        text = f"{name} {value:.2f}" if value is not None else f"{name} –"
        details = (choice.get(name) or {}).get("details") or {}
        if details.get("degenerate"):
            floor = details.get("no_split") == "floor"
            text += f" (no split found: {'cut at the noise floor' if floor else 'every group kept'})"
        parts.append(text)
    return ", ".join(parts)


def progress_rows(progress: dict[str, Any]) -> list[tuple[str, Any]]:
    """The state of an unfinished run (`pipeline.run_progress`), formatted."""
    from ..train.loop import format_duration  # (lazily: the command line starts without torch)

    planned = progress.get("epochs")
    rows: list[tuple[str, Any]] = [
        ("unfinished run", progress["folder"]),
        ("model", f"{progress.get('model')} ({progress.get('prior')})"),
        ("epochs", f"{progress['epochs_done']} of {planned if planned is not None else '?'}"),
    ]
    if "finetune_epochs" in progress:
        rows.append(("fine-tuning epochs", f"{progress['finetune_epochs_done']} of {progress['finetune_epochs']}"))
    if "mean_epochs" in progress:
        rows.append(("mean fine-tuning epochs", f"{progress['mean_epochs_done']} of {progress['mean_epochs']}"))
    last = progress.get("last")
    if last:
        if last.get("loss") is not None:
            rows.append(("last epoch loss", f"{last['loss']:.4f}"))
        if last.get("train_error") is not None:
            rows.append(("train error (%, sampled)", f"{last['train_error']:.2f}"))
        if last.get("test_error") is not None:
            rows.append(("test error (%, unpruned)", f"{last['test_error']:.2f}"))
        if last.get("groups_kept"):
            rows.append(("groups kept (default thresholds)", "-".join(str(v) for v in last["groups_kept"].values())))
        rows.append(("time so far", format_duration(progress["seconds_spent"])))
        rows.append(("epoch time (last 5)", f"{progress['epoch_seconds']:.0f} s"))
        if "seconds_left" in progress:
            rows.append(("time left (estimate)", format_duration(progress["seconds_left"])))
    rows.append(("compress it now", f"bayescomp prune {progress['folder']} --out PEEK"))
    return rows
