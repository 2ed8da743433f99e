"""The data the report page draws, written into a run folder by the run layer (the page only reads it).

Every run writes, beside report.json, the per-layer log α scores with their thresholds (scores.json) and
the posterior means with the decision's kept-weight masks (weights.pt), at the moment it compresses.
`bayescomp report` adds what a page needs that the run did not write: the figure data of a folder made by
an earlier version (`ensure_figure_data`, from its posterior.pt) and, with --sensitivity, the precision
sensitivity on the test set (sensitivity.json, `write_sensitivity`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .base import atomic_write
from .compress import PruneError, compress
from .compress.sensitivity import precision_sensitivity
from .factories import example_input, load_data, load_posterior
from .report.page import SCORES_FILE, SENSITIVITY_FILE, WEIGHTS_FILE
from .report.plots import score_data, weight_data
from .rundir import POSTERIOR_FILE, REPORT
from .runreport import read_run
from .train.checkpoint import save_checkpoint


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


def write_figure_data(folder: str | os.PathLike, bmodel: torch.nn.Module, compressed,
                      thresholds: Any = None) -> None:
    """scores.json and weights.pt of the compression `compressed` of the posterior `bmodel` (None: scores.json
    alone, at `thresholds`), into `folder`."""
    folder = Path(folder)
    was = bmodel.training
    bmodel.eval()
    try:
        scores = score_data(bmodel, compressed.report.get("thresholds") if compressed is not None else thresholds)
        weights = weight_data(bmodel, compressed.masks) if compressed is not None else None
    finally:
        bmodel.train(was)
    atomic_write(folder / SCORES_FILE, _json_bytes({"layers": scores}))
    if weights is not None:
        save_checkpoint(folder / WEIGHTS_FILE, weights)


def ensure_figure_data(run_dir: str | os.PathLike) -> bool:
    """Write the figure data of a finished run that has a posterior but no scores.json (a folder from an earlier
    version), by compressing its posterior as the run did; True if it was written."""
    run_dir = Path(run_dir)
    if (run_dir / SCORES_FILE).is_file() or not (run_dir / POSTERIOR_FILE).is_file() \
            or not (run_dir / REPORT).is_file():
        return False
    report = read_run(run_dir)
    bmodel = load_posterior(run_dir / POSTERIOR_FILE)
    thresholds = report.get("thresholds") or None
    try:
        compressed = compress(bmodel, thresholds, round_weights=False, example_input=example_input(report["model"]))
    except PruneError:  # the page then says that the run's thresholds cannot be applied to this posterior
        compressed = None
    write_figure_data(run_dir, bmodel, compressed, thresholds)
    return True


def write_sensitivity(run_dir: str | os.PathLike, *, data_dir: str | None = None, verify: bool = True) -> Path:
    """Measure each layer's precision sensitivity of a finished run on the test set
    (`compress.sensitivity.precision_sensitivity`) into RUN_DIR/sensitivity.json."""
    run_dir = Path(run_dir)
    report = read_run(run_dir)
    posterior = run_dir / POSTERIOR_FILE
    if not posterior.is_file():
        raise FileNotFoundError(f"no trained posterior at {posterior}: the precision sensitivity needs it")
    x, y = load_data(report["model"], data_dir, 1, verify=verify)[1]
    bmodel = load_posterior(posterior)
    sens = precision_sensitivity(bmodel, x, y, report.get("thresholds") or None,
                                 example_input=example_input(report["model"]))
    atomic_write(run_dir / SENSITIVITY_FILE, _json_bytes(sens))
    return run_dir / SENSITIVITY_FILE


__all__ = ["ensure_figure_data", "write_figure_data", "write_sensitivity"]
