"""A run still training (or stopped) in its working folder ``DIR.partial``: its options and newest checkpoint
(`unfinished_run`), how far it has got (`run_progress`), and how it would be compressed if it ended now
(`unfinished_decision`). Everything here only reads the folder: the run goes on untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .decision import choose_thresholds, named_over
from .factories import build_bayesian, example_input, hold_out, load_data
from .nn import GroupSparseLayer
from .rundir import (
    CHECKPOINT,
    FINETUNE_CHECKPOINT,
    FINETUNE_METRICS,
    MEAN_CHECKPOINT,
    MEAN_METRICS,
    METRICS,
    OPTIONS,
    POSTERIOR_FILE,
    REPORT,
    RunError,
    work_dir,
)
from .runoptions import RunOptions, read_options
from .runreport import read_json, read_metrics, validate_options
from .train.checkpoint import CheckpointError
from .train.rotation import load_newest_checkpoint, previous_checkpoint


def unfinished_run(run_dir: str | os.PathLike) -> tuple[RunOptions, torch.nn.Module, int, Path]:
    """The run still training (or stopped) in RUN_DIR.partial: (its options, the Bayesian model at its newest
    checkpoint, the epochs trained, the folder).

    `run_dir` may name the run (``DIR``) or its working folder (``DIR.partial``). The checkpoint is read as
    it stands (checkpoints are written atomically, so a run may go on training meanwhile); if the newest
    cannot be read, the previous one is used, with a warning.
    """
    run_dir = Path(run_dir)
    work = work_dir(run_dir)
    if not (work / OPTIONS).is_file():
        raise RunError(f"no trained posterior at {run_dir / POSTERIOR_FILE}, and no unfinished run at {work} "
                       f"(it needs {OPTIONS} and {CHECKPOINT})")
    opts = read_options(read_json(work / OPTIONS), work / OPTIONS)
    try:
        state, _ = load_newest_checkpoint(work / CHECKPOINT, repair=False, purpose="compressing")
    except CheckpointError as exc:
        raise RunError(f"unfinished run {work}: {exc}") from exc
    try:
        bmodel = build_bayesian(opts.model, opts.prior, tau0=opts.tau0, global_kl=opts.global_kl)
        bmodel.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise RunError(f"the checkpoint in {work} does not fit a {opts.prior} {opts.model}: {exc}") from exc
    return opts, bmodel.eval(), int(state.get("epoch", 0)), work


def run_progress(run_dir: str | os.PathLike) -> dict[str, Any]:
    """How far the unfinished run of RUN_DIR (or RUN_DIR.partial) has got, from its metrics.jsonl (and
    finetune_metrics.jsonl, finetune_mean_metrics.jsonl) and options.json alone (no checkpoint is read): epochs
    done and planned (training, then fine-tuning, then the mean fine-tuning), the last epoch's figures, the time
    spent and, from the mean of the last five epochs, the time left."""
    run_dir = Path(run_dir)
    work = work_dir(run_dir)
    metrics = work / METRICS
    if not metrics.is_file():
        raise RunError(f"no finished run at {run_dir} (no {REPORT}) and no unfinished one at {work} (no {METRICS})")
    rows = read_metrics(metrics)
    options: dict[str, Any] = {}
    if (work / OPTIONS).is_file():
        options = validate_options(read_json(work / OPTIONS), work / OPTIONS, RunOptions, required=())
        for key in ("epochs", "finetune_epochs", "mean_epochs"):
            if (options.get(key) or 0) < 0:
                raise RunError(f"{work / OPTIONS}: field {key!r} must be ≥ 0, got {options[key]}")
    out: dict[str, Any] = {"folder": str(work), "model": options.get("model"), "prior": options.get("prior"),
                           "epochs_done": len(rows), "epochs": options.get("epochs")}
    tuning = work / FINETUNE_METRICS
    planned_ft = int(options.get("finetune_epochs") or 0)
    ft_rows = read_metrics(tuning) if tuning.is_file() else []
    if planned_ft:
        out.update(finetune_epochs=planned_ft, finetune_epochs_done=len(ft_rows))
    planned_mean = int(options.get("mean_epochs") or 0)  # then the mean fine-tuning (finetune_mean_metrics.jsonl)
    mean_rows = read_metrics(work / MEAN_METRICS) if (work / MEAN_METRICS).is_file() else []
    if planned_mean:
        out.update(mean_epochs=planned_mean, mean_epochs_done=len(mean_rows))
    if rows:
        seconds = [float(r.get("seconds") or 0.0) for r in rows + ft_rows + mean_rows]
        recent = seconds[-5:]  # (fine-tuning epochs, once they run: they take about as long as training ones)
        out.update(last=(mean_rows or ft_rows or rows)[-1], seconds_spent=sum(seconds),
                   epoch_seconds=sum(recent) / len(recent))
        if out["epochs"] is not None:
            left = (max(0, out["epochs"] - len(rows)) + max(0, planned_ft - len(ft_rows))
                    + max(0, planned_mean - len(mean_rows)))
            out["seconds_left"] = left * out["epoch_seconds"]
    return out


def unfinished_thresholds(opts: RunOptions, bmodel: torch.nn.Module, data_dir: str | None, verify: bool):
    """The thresholds the unfinished run would use if it ended now (`choose_thresholds`, as `run` does)."""
    val = None
    if opts.auto_thresholds == "validation":
        _, val = hold_out(opts, load_data(opts.model, data_dir, opts.train_subset, opts.seed, verify)[0])
    return choose_thresholds(opts, bmodel, val, example_input(opts.model))[0]


def unfinished_decision(opts: RunOptions, bmodel: torch.nn.Module, work: str | os.PathLike,
                        thresholds: float | Mapping[str, float] | None, data_dir: str | None,
                        verify: bool) -> tuple[Any, dict[str, torch.Tensor] | None, int, int]:
    """How the unfinished run in `work`, whose training checkpoint `bmodel` holds, would be compressed if it
    ended now: (thresholds, keeps, fine-tuning epochs done, mean fine-tuning epochs done).

    `thresholds=None`: the ones the run chooses (`unfinished_thresholds`, from the trained posterior, as
    `run` does). A run already being fine-tuned took its decision then: its newest fine-tuning checkpoint
    is loaded into `bmodel`, and with the run's own thresholds, `keeps` are the groups it fine-tunes (the
    layers' `group_mask`), as `run` will compress them; other thresholds can only prune more. A run already in
    its mean fine-tuning: its newest checkpoint of that phase, the same decision.
    """
    own = thresholds is None
    if own:
        thresholds = unfinished_thresholds(opts, bmodel, data_dir, verify)
    elif isinstance(thresholds, Mapping):  # layers not named keep the ones the run would choose
        thresholds = named_over(unfinished_thresholds(opts, bmodel, data_dir, verify), thresholds)
    done = []
    for name in (FINETUNE_CHECKPOINT, MEAN_CHECKPOINT):  # the mean fine-tuning goes on from the fine-tuning
        checkpoint = Path(work) / name
        if not (checkpoint.is_file() or previous_checkpoint(checkpoint).is_file()):
            break
        try:
            state, _ = load_newest_checkpoint(checkpoint, repair=False, purpose="compressing")
            bmodel.load_state_dict(state["model"])
        except (CheckpointError, KeyError, RuntimeError) as exc:
            raise RunError(f"unfinished fine-tuning in {work}: {exc}") from exc
        done.append(int(state.get("epoch", 0)))
    if not done:
        return thresholds, None, 0, 0
    bmodel.eval()
    keeps = {name: m.group_mask.clone() for name, m in bmodel.named_modules() if isinstance(m, GroupSparseLayer)}
    return thresholds, keeps if own else None, done[0], done[1] if len(done) > 1 else 0
