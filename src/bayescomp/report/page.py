"""write_report(): a self-contained Markdown page (report.md) for a run folder or a sweep folder.

A run folder (report.json, posterior.pt, metrics.jsonl) gets: the headline figures, the per-layer
table, the thresholds used beside what the log α histogram suggests (`histogram_thresholds`), the
figures (log α histograms, weights before/after pruning, training curves; PNG files beside the page)
and, when present, the run's threshold sweep (threshold_sweep.json) and precision sensitivity.
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

from .. import __version__
from ..base import atomic_write

PAGE = "report.md"
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


def _run_page(run_dir: Path, *, data_dir: str | None, sensitivity: bool, method: str, verify: bool) -> list[str]:
    from ..compress import PruneError, compress
    from ..compress.thresholds import histogram_thresholds
    from ..pipeline import POSTERIOR_FILE, example_input, load_data, load_posterior
    from ..runreport import read_run
    from .plots import plot_log_alpha_histograms, plot_pareto, plot_training_curves, plot_weights

    report = read_run(run_dir)
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

    posterior = run_dir / POSTERIOR_FILE
    thresholds = report.get("thresholds") or None
    if posterior.is_file():
        bmodel = load_posterior(posterior)
        test = load_data(report["model"], data_dir, 1, verify=verify)[1] if sensitivity else None  # fail early
        suggested = histogram_thresholds(bmodel, method, no_split=(report.get("config") or {}).get("no_split", "keep"))
        used = {lay["name"]: lay.get("threshold") for lay in report.get("layers") or []}
        lines += ["## log α: thresholds used and what the histogram says", "",
                  f"The suggestion is the {'Otsu' if method == 'otsu' else 'Gaussian-mixture'} split between the "
                  "two modes of each layer's log α (`bayescomp.compress.thresholds.split_modes`); a group is kept "
                  "while its log α is below the threshold.", ""]
        lines += _table(["layer", "threshold used", "suggested", "groups kept at suggestion", "why"],
                        [[n, used.get(n), c.value, f"{c.kept}/{c.total}", c.reason] for n, c in suggested.items()])
        plot_log_alpha_histograms(bmodel, thresholds, run_dir / FIG_LOG_ALPHA, suggested=suggested)
        lines += [f"![log α histograms per layer]({FIG_LOG_ALPHA})", ""]
        # the run's decision, made as the run made it (a graph model through its torch.fx graph)
        example = example_input(report["model"])
        lines += ["## Weights before and after pruning", ""]
        try:
            masks = compress(bmodel, thresholds, round_weights=False, example_input=example).masks
        except PruneError as exc:
            lines += [f"_No weights figure: the run's thresholds cannot be applied to this posterior ({exc})._", ""]
        else:
            plot_weights(bmodel, masks, run_dir / FIG_WEIGHTS)
            lines += ["Per layer, the magnitudes |E[w]| of the posterior means (dark = large); on the right, pruned "
                      "rows and columns are blank.", "",
                      f"![weights before and after pruning]({FIG_WEIGHTS})", ""]
        if sensitivity:
            from ..compress.sensitivity import precision_sensitivity

            sens = precision_sensitivity(bmodel, *test, thresholds, example_input=example)
            lines += ["## Precision sensitivity (test set)", "",
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
            lines += [f"- **{n}**: {e['verdict']} — {e['reason']}" for n, e in sens["layers"].items()] + [""]
    else:
        lines += ["_No posterior.pt in this folder: no histograms or weight figures._", ""]

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


def write_report(run_dir: str | os.PathLike, *, data_dir: str | None = None, sensitivity: bool = False,
                 method: str = "otsu", verify: bool = True) -> Path:
    """Write run_dir/report.md and its PNG figures; return the page's path.

    `run_dir`: a run folder (report.json) or a sweep folder (sweep.json). `sensitivity`: also measure
    the precision sensitivity on the test set (loads the data from `data_dir`; a few dozen test-set
    passes; `verify=False` skips the data files' checksum check). `method`: how the histogram suggestion
    is made ("otsu" or "gmm"). Chain and graph runs (residual, concatenating models) get the same page.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if (run_dir / "report.json").is_file():
        lines = _run_page(run_dir, data_dir=data_dir, sensitivity=sensitivity, method=method, verify=verify)
    elif (run_dir / "sweep.json").is_file():
        lines = _sweep_page(run_dir)
    else:
        raise FileNotFoundError(f"{run_dir} holds neither report.json (a run) nor sweep.json (a sweep)")
    page = run_dir / PAGE
    atomic_write(page, ("\n".join(lines).rstrip() + "\n").encode())
    return page


__all__ = ["PAGE", "write_report"]
