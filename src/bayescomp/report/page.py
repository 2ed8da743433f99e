"""write_report(): a self-contained Markdown page (report.md) for a run folder or a sweep folder.

A run folder (report.json, metrics.jsonl, and the figure data the run wrote: scores.json, weights.pt)
gets: the headline figures, the per-layer table, the thresholds used beside what the log α histogram
suggests (`split_modes` of the recorded scores), the figures (log α histograms, weights before/after
pruning, training curves; PNG files beside the page) and, when present, the run's threshold sweep
(threshold_sweep.json) and precision sensitivity (sensitivity.json). The page draws what the folder
holds and never compresses anything again.
A sweep folder (sweep.json) gets the Pareto plot of its runs and their table.

The page links its figures by relative path, so the folder can be moved or archived as it is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..base import atomic_write
from ..compress.modes import ThresholdChoice, split_modes
from ..train.checkpoint import CheckpointError, load_checkpoint

PAGE = "report.md"
REPORT_FILE = "report.json"
#: the figure data a run writes beside its report (`runfigures`): log α scores per layer, posterior means and masks
SCORES_FILE = "scores.json"
WEIGHTS_FILE = "weights.pt"
#: the precision sensitivity, written on request (`bayescomp report --sensitivity`)
SENSITIVITY_FILE = "sensitivity.json"
FIG_LOG_ALPHA = "log_alpha.png"
FIG_WEIGHTS = "weights.png"
FIG_CURVES = "training.png"
FIG_PARETO = "pareto.png"
FIG_THRESHOLD_PARETO = "threshold_pareto.png"


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 10 ** -digits):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return "-".join("32" if x is None else _fmt(x) for x in v)
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v).replace("|", "\\|")


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else _fmt(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _read_history(run_dir: Path, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        rows = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line: the rest still plots
                if isinstance(row, dict):
                    rows.append(row)
        if rows:
            return rows
    return list(report.get("history") or [])


def _headline(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("model", f"{report.get('model')} ({report.get('prior')})"),
        ("epochs", report.get("epochs")),
        ("training examples", report.get("train_examples")),
        ("test error, compressed (%)", report.get("test_error")),
        ("test error, uncompressed (%)", report.get("test_error_uncompressed")),
        ("architecture", report.get("architecture")),
        ("weights kept", f"{report.get('weights_kept')} of {report.get('weights_total')} "
                         f"({_fmt(report.get('weights_kept_pct'))}%)"),
        ("bits per layer (mantissa)", report.get("bits")),
        ("exponent bits", report.get("exponent_bits")),
        ("CR architecture", report.get("cr_architecture")),
        ("CR fast prediction", report.get("cr_fast")),
    ]
    for key, label in (("cr_max", "CR maximum"), ("cr_file", "CR file"), ("train_seconds", "training time (s)")):
        if report.get(key) is not None:
            rows.append((label, report[key]))
    tuned = report.get("finetune")
    if tuned:
        rows.append(("fine-tuned after pruning", f"{tuned.get('epochs')} epochs; test error before: "
                                                 f"{_fmt(tuned.get('test_error_before'))}% compressed, "
                                                 f"{_fmt(tuned.get('test_error_uncompressed_before'))}% uncompressed"))
    config = report.get("config") or {}
    if config.get("tau0") is not None:
        rows.append(("τ0", _g(config["tau0"])))
    return rows


def _layer_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for lay in report.get("layers") or []:
        groups = None if lay.get("groups_total") is None else f"{lay.get('groups_kept')}/{lay.get('groups_total')}"
        rows.append([lay.get("name"), lay.get("kind"), groups, f"{lay.get('inputs_kept')}/{lay.get('inputs_total')}",
                     f"{lay.get('outputs_kept')}/{lay.get('outputs_total')}",
                     f"{lay.get('weights_kept')}/{lay.get('weights_total')}", lay.get("threshold"), lay.get("bits")])
    return rows


def _read_json(path: Path) -> Any:
    """A JSON file of the run folder; a damaged one is named in a one-line error."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable as JSON ({exc})") from None


def _suggestions(scores: Mapping[str, Mapping[str, Any]], method: str, no_split: str) -> dict[str, ThresholdChoice]:
    """What each layer's log α histogram suggests (`split_modes`, above its prior's noise floor)."""
    out = {}
    for name, layer in scores.items():
        la = torch.tensor(layer["log_alpha"], dtype=torch.float64)
        c = split_modes(la, method, noise_floor=float(layer["noise_floor"]), no_split=no_split)
        out[name] = ThresholdChoice(c.value, c.method, c.reason, int((la < c.value).sum()), la.numel(), c.details)
    return out


def _decision_figures(run_dir: Path, report: Mapping[str, Any], method: str) -> list[str]:
    """The log α and weights figures, from the figure data the run wrote (scores.json, weights.pt)."""
    from .plots import plot_score_histograms, plot_weight_data

    scores_path = run_dir / SCORES_FILE
    if not scores_path.is_file():
        return [f"_No log α or weights figures: this folder has no {SCORES_FILE} (a run made by an earlier version; "
                f"`bayescomp report` writes it from the run's posterior)._", ""]
    doc = _read_json(scores_path)
    scores = doc.get("layers") if isinstance(doc, Mapping) else None
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{scores_path}: field 'layers' must be a non-empty object of layer: scores")
    suggested = _suggestions(scores, method, (report.get("config") or {}).get("no_split", "keep"))
    used = {lay["name"]: lay.get("threshold") for lay in report.get("layers") or []}
    lines = ["## log α: thresholds used and what the histogram says", "",
             f"The suggestion is the {'Otsu' if method == 'otsu' else 'Gaussian-mixture'} split between the "
             "two modes of each layer's log α (`bayescomp.compress.thresholds.split_modes`); a group is kept "
             "while its log α is below the threshold.", ""]
    lines += _table(["layer", "threshold used", "suggested", "groups kept at suggestion", "why"],
                    [[n, used.get(n), c.value, f"{c.kept}/{c.total}", c.reason] for n, c in suggested.items()])
    plot_score_histograms(scores, run_dir / FIG_LOG_ALPHA, suggested=suggested)
    lines += [f"![log α histograms per layer]({FIG_LOG_ALPHA})", "", "## Weights before and after pruning", ""]
    try:
        weights = load_checkpoint(run_dir / WEIGHTS_FILE) if (run_dir / WEIGHTS_FILE).is_file() else None
    except CheckpointError as exc:
        raise ValueError(f"{run_dir / WEIGHTS_FILE}: {exc}") from None
    if weights is None:
        return lines + [f"_No weights figure: no {WEIGHTS_FILE} (the run's thresholds cannot be applied to this "
                        "posterior)._", ""]
    plot_weight_data(weights, run_dir / FIG_WEIGHTS)
    return lines + ["Per layer, the magnitudes |E[w]| of the posterior means (dark = large); on the right, pruned "
                    "rows and columns are blank.", "", f"![weights before and after pruning]({FIG_WEIGHTS})", ""]


def _sensitivity(run_dir: Path) -> list[str]:
    """The precision sensitivity the run layer measured (sensitivity.json: `bayescomp report --sensitivity`)."""
    path = run_dir / SENSITIVITY_FILE
    if not path.is_file():
        return []
    sens = _read_json(path)
    lines = ["## Precision sensitivity (test set)", "",
             f"Error with every layer at its inferred bits: {_fmt(sens['error_inferred'])}% "
             f"(unrounded {_fmt(sens['error_unrounded'])}%). Each row moves one layer's bits; "
             "the others stay at their inferred bits.", ""]
    ks = sens["ks"]
    header = ["layer", "bits"] + [f"−{k}" for k in reversed(ks)] + ["inferred"] + [f"+{k}" for k in ks] + ["verdict"]
    rows = []
    for n, e in sens["layers"].items():
        minus = [f"{r['bits']}b: {_fmt(r['error'])}" for r in reversed(e["minus"])]
        plus = [f"{r['bits']}b: {_fmt(r['error'])}" for r in e["plus"]]
        rows.append([n, e["inferred_bits"], *minus, _fmt(sens["error_inferred"]), *plus, e["verdict"]])
    lines += _table(header, rows)
    return lines + [f"- **{n}**: {e['verdict']} — {e['reason']}" for n, e in sens["layers"].items()] + [""]


def _run_page(run_dir: Path, *, method: str) -> list[str]:
    from .plots import plot_pareto, plot_training_curves

    report = _read_json(run_dir / REPORT_FILE)
    if not isinstance(report, Mapping):
        raise ValueError(f"{run_dir / REPORT_FILE}: must be a JSON object (a run's report), got {type(report).__name__}")
    lines = [f"# bayescomp run: {report.get('model')} ({report.get('prior')})", "",
             f"Folder `{run_dir.name}`; page written by bayescomp {__version__}.", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines += ["## Headline figures", ""] + _table(["figure", "value"], _headline(report))
    layer_rows = _layer_rows(report)
    if layer_rows:
        lines += ["## Layers", ""]
        lines += _table(["layer", "kind", "groups kept", "inputs kept", "outputs kept", "weights kept",
                         "threshold", "bits"], layer_rows)

    choice = report.get("threshold_choice")
    if isinstance(choice, Mapping) and choice:
        lines += ["## How the thresholds were chosen", ""]
        lines += _table(["layer", "method", "threshold", "groups kept", "reason"],
                        [[n, c.get("method"), c.get("value"),
                          None if c.get("kept") is None else f"{c.get('kept')}/{c.get('total')}", c.get("reason")]
                         for n, c in choice.items()])

    lines += _decision_figures(run_dir, report, method) + _sensitivity(run_dir)

    history = _read_history(run_dir, report)
    if history:
        plot_training_curves(history, run_dir / FIG_CURVES)
        last = history[-1]
        lines += ["## Training", "", f"![training curves]({FIG_CURVES})", ""]
        lines += _table(["epoch", "loss", "NLL", "KL", "train error (%)", "test error (%)"],
                        [[r.get("epoch"), r.get("loss"), r.get("nll"), r.get("kl"), r.get("train_error"),
                          r.get("test_error")] for r in (history if len(history) <= 20 else history[-10:])])
        if last.get("groups_kept"):
            lines += [f"Groups kept at the default thresholds after the last epoch: {_fmt(last['groups_kept'])}.", ""]
    tuned = (report.get("finetune") or {}).get("history")
    if tuned:
        lines += ["## Fine-tuning after pruning", "",
                  "The pruned groups switched off, the kept ones trained on (test error: the pruned posterior, unrounded).", ""]
        lines += _table(["epoch", "loss", "NLL", "KL", "train error (%)", "test error (%)", "learning rate"],
                        [[r.get("epoch"), r.get("loss"), r.get("nll"), r.get("kl"), r.get("train_error"),
                          r.get("test_error"), _g(r.get("lr"))] for r in tuned])

    ts = run_dir / "threshold_sweep.json"
    if ts.is_file():
        doc = json.loads(ts.read_text())
        points = doc.get("points") or []
        if any(p.get("test_error") is not None for p in points):
            plot_pareto(points, run_dir / FIG_THRESHOLD_PARETO, label="threshold")
            lines += ["## Threshold sweep (same posterior, test set)", "", f"![threshold sweep]({FIG_THRESHOLD_PARETO})", ""]
            lines += _table(["threshold", "test error (%)", "weights kept (%)", "CR fast", "architecture", "Pareto"],
                            [[p.get("threshold"), p.get("test_error"), p.get("weights_kept_pct"), p.get("cr_fast"),
                              p.get("architecture") or p.get("skipped"), p.get("pareto")] for p in points])
    return lines


def _sweep_page(sweep_dir: Path) -> list[str]:
    from .plots import plot_pareto

    doc = json.loads((sweep_dir / "sweep.json").read_text())
    points = doc.get("points") or []
    lines = [f"# bayescomp τ0 sweep ({doc.get('prior', 'ghs')})", "",
             f"Folder `{sweep_dir.name}`; page written by bayescomp {__version__}.", "",
             f"The ELBO prefers **τ0 = {_g(doc.get('elbo_choice'))}** (`{doc.get('elbo_choice_dir')}`). "
             f"{doc.get('elbo_note', '')}", ""]
    if points:
        plot_pareto(points, sweep_dir / FIG_PARETO)
        lines += [f"![test error against weights kept]({FIG_PARETO})", ""]
        rows = []
        for p in points:
            page = sweep_dir / str(p.get("run_dir")) / PAGE
            link = f"[{p.get('run_dir')}]({p.get('run_dir')}/{PAGE})" if page.is_file() else p.get("run_dir")
            rows.append([_g(p.get("tau0")), p.get("test_error"), p.get("weights_kept_pct"), p.get("cr_fast"),
                         p.get("cr_file"), p.get("elbo"), p.get("pareto"), link])
        lines += _table(["τ0", "test error (%)", "weights kept (%)", "CR fast", "CR file", "ELBO", "Pareto", "run"], rows)
    return lines


def write_report(run_dir: str | os.PathLike, *, method: str = "otsu") -> Path:
    """Write run_dir/report.md and its PNG figures; return the page's path.

    `run_dir`: a run folder (report.json) or a sweep folder (sweep.json). Only what the folder holds is
    drawn: report.json, metrics.jsonl, the figure data the run wrote (scores.json, weights.pt), and where
    present threshold_sweep.json and sensitivity.json (`bayescomp report --sensitivity`). `method`: how the
    histogram suggestion is made ("otsu" or "gmm"). Chain and graph runs (residual, concatenating models)
    get the same page.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if (run_dir / REPORT_FILE).is_file():
        lines = _run_page(run_dir, method=method)
    elif (run_dir / "sweep.json").is_file():
        lines = _sweep_page(run_dir)
    else:
        raise FileNotFoundError(f"{run_dir} holds neither report.json (a run) nor sweep.json (a sweep)")
    page = run_dir / PAGE
    atomic_write(page, ("\n".join(lines).rstrip() + "\n").encode())
    return page


__all__ = ["PAGE", "SCORES_FILE", "SENSITIVITY_FILE", "WEIGHTS_FILE", "write_report"]
