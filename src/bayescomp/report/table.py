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
