"""How a benchmark's settings were chosen: the `selection` and `selection_note` every results file records.

`selection` is one of `fixed` (set before any run), `rule` (computed from the posterior or the training set
alone), `validation` (chosen on a split held out of the training set), `test` (chosen by reading test errors: a
diagnostic) or `none` (a timing or a sweep that chooses nothing); the note says in one sentence what it rests on.
The scripts in this folder import it (they run with this folder on sys.path).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

#: from the least to the most data-dependent: a result is as data-dependent as its most data-dependent choice
ORDER = ("none", "fixed", "rule", "validation", "test")
SELECTIONS = frozenset(ORDER)
TIMING = ("none", "a timing: nothing chosen")
#: the verdict of a row chosen on test errors (as benchmarks/table1.py writes it): it cannot say "meets paper"
DIAGNOSTIC = "diagnostic (settings chosen on test errors)"


def stamp(record: Mapping[str, Any], selection: str, note: str) -> dict[str, Any]:
    """`record` with `selection` and `selection_note` added as its last two keys (replacing any it had)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(ORDER)}, got {selection!r}")
    if not note.strip():
        raise ValueError("a selection needs a note saying what it rests on")
    out = {k: v for k, v in record.items() if k not in ("selection", "selection_note")}
    out["selection"], out["selection_note"] = selection, note
    return out


def combine(*selections: str) -> str:
    """The most data-dependent of several choices' selections (e.g. settings "fixed", thresholds "rule": "rule")."""
    return max(selections, key=ORDER.index)


def auto_threshold_selection(auto: str | None) -> tuple[str, str]:
    """The selection of a run's thresholds from its `auto_thresholds` option (None: the model's defaults)."""
    if auto is None:
        return "fixed", "thresholds the model's defaults, set before any run"
    if auto == "validation":
        return "validation", "thresholds chosen on a split held out of the training set"
    return "rule", f"thresholds by the {auto} rule on the posterior"


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    """--selection and --selection-note: how settings given on the command line were chosen."""
    parser.add_argument("--selection", choices=[s for s in ORDER if s != "none"], default=None,
                        help="how the settings given on the command line were chosen: fixed (before any run), rule, "
                             "validation, or test (read off test errors: the result is a diagnostic)")
    parser.add_argument("--selection-note", default=None,
                        help="one sentence on what --selection rests on (required with it)")


def explicit_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """The options among `names` (argparse dests) that the command line set to other than their default."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != parser.get_default(n)]


def user_selection(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   explicit: list[str]) -> tuple[str, str] | None:
    """The user's --selection and --selection-note; an argparse error (exit 2, nothing written) when settings were
    given explicitly without them, or when one comes without the other. None when neither is needed nor given."""
    if args.selection is not None and not (args.selection_note or "").strip():
        parser.error("--selection needs --selection-note: one sentence on how the settings were chosen")
    if args.selection_note and args.selection is None:
        parser.error("--selection-note needs --selection (fixed, rule, validation or test)")
    if explicit and args.selection is None:
        parser.error(f"{', '.join(explicit)} given on the command line: say how they were chosen with --selection "
                     "fixed|rule|validation|test and --selection-note")
    if args.selection is None:
        return None
    return args.selection, args.selection_note.strip()
