"""One run end to end — data, model, training, compression, evaluation — into an output folder.

The folder appears only when the run succeeds: work happens in ``DIR.partial`` (checkpoint, metrics),
which is renamed to ``DIR`` at the end. A failed or interrupted run leaves ``DIR.partial`` with its
last good checkpoint, from which ``resume=True`` continues.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .compress import compress
from .convert import PRIORS, bayesianize
from .data import load_mnist
from .io import save_plain
from .models import MODELS, build_model
from .recipes import recipe
from .train import TrainConfig, evaluate, fit, predict
from .train.checkpoint import atomic_write_bytes

REPORT = "report.json"
MODEL_FILE = "model.pt"
POSTERIOR_FILE = "posterior.pt"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class RunError(RuntimeError):
    """A run that cannot start or finish; the message says why in one line."""


@dataclass
class RunOptions:
    """Everything that defines a run (stored in report.json as `config`)."""

    model: str = "lenet300"
    prior: str = "gnj"
    epochs: int = 10
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 0.0
    thresholds: float | dict[str, float] | None = None
    max_var: float | dict[str, float] | None = None  # None: the recipe's clamp
    train_subset: int | None = None
    data_dir: str | None = None
    bit_accounting: str = "code"
    grad_clip: float | None = None
    tau0: float | None = None  # group horseshoe: global scale of the prior (None: the layer default, 1e-5)
    global_kl: str | None = None  # group horseshoe: "derived" (default) or "paper"
    extra: dict[str, Any] = field(default_factory=dict)


def validate(opts: RunOptions) -> None:
    """Refuse bad options before any work or file is made."""
    if opts.model not in MODELS:
        raise RunError(f"unknown model {opts.model!r}; choose one of: {', '.join(sorted(MODELS))}")
    if opts.prior not in PRIORS:
        raise RunError(f"unknown prior {opts.prior!r}; choose one of: {', '.join(sorted(PRIORS))}")
    if not isinstance(opts.epochs, int) or opts.epochs < 1:
        raise RunError(f"epochs must be a positive integer, got {opts.epochs}")
    if opts.prior != "ghs" and (opts.tau0 is not None or opts.global_kl is not None):
        raise RunError("--tau0 and --global-kl apply to the group horseshoe prior (--prior ghs) only")
    if opts.tau0 is not None and not (opts.tau0 > 0 and opts.tau0 < float("inf")):
        raise RunError(f"tau0 must be a positive finite number, got {opts.tau0}")
    if opts.train_subset is not None and opts.train_subset < 1:
        raise RunError(f"train subset must be ≥ 1, got {opts.train_subset}")
    try:
        TrainConfig(opts.epochs, opts.batch_size, opts.lr, opts.warmup_epochs, opts.seed, opts.grad_clip).validate()
    except ValueError as exc:
        raise RunError(str(exc)) from exc


def _load_data(opts: RunOptions):
    dataset = recipe(opts.model).dataset
    if dataset != "mnist":
        raise RunError(f"dataset {dataset!r} is not wired into the pipeline yet")
    x, y = load_mnist("train", opts.data_dir)
    xt, yt = load_mnist("test", opts.data_dir)
    if opts.train_subset is not None and opts.train_subset < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts.seed))[: opts.train_subset]
        x, y = x[idx], y[idx]
    return (x, y), (xt, yt)


def prepare_out(out: str | os.PathLike, resume: bool, force: bool) -> tuple[Path, Path]:
    """Check the output folder can be written; return (final DIR, working DIR.partial)."""
    final = Path(out)
    work = final.with_name(final.name + ".partial")
    if final.exists() and not force:
        raise RunError(f"output directory {final} already exists; choose another or pass --force")
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise RunError(f"cannot write output directory {final}: parent {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RunError(f"cannot write output directory {final}: parent {parent} is not writable")
    if resume:
        if not (work / CHECKPOINT).is_file():
            raise RunError(f"nothing to resume: no checkpoint at {work / CHECKPOINT}")
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    return final, work


def run(opts: RunOptions, out: str | os.PathLike, *, resume: bool = False, force: bool = False,
        progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train, compress and evaluate one model; write DIR/report.json, model.pt, posterior.pt, metrics."""
    validate(opts)
    rec = recipe(opts.model)
    thresholds: float | Mapping[str, float] | None = opts.thresholds
    if thresholds is None:
        thresholds = rec.thresholds.get(opts.prior)
    max_var = rec.max_var if opts.max_var is None else opts.max_var
    train, test = _load_data(opts)  # data errors surface before any folder is made
    final, work = prepare_out(out, resume, force)

    torch.manual_seed(opts.seed)
    prior_options = {k: v for k, v in (("tau0", opts.tau0), ("global_kl", opts.global_kl)) if v is not None}
    bmodel = bayesianize(build_model(opts.model), opts.prior, keep_weights=False, max_var=max_var or None,
                         **prior_options)
    config = TrainConfig(opts.epochs, opts.batch_size, opts.lr, opts.warmup_epochs, opts.seed, opts.grad_clip)
    result = fit(bmodel, train, config, test=test, checkpoint=work / CHECKPOINT, resume=resume,
                 metrics=work / METRICS, progress=progress)
    t0 = time.perf_counter()
    err_uncompressed = evaluate(bmodel, *test)
    compressed = compress(bmodel, thresholds, bit_accounting=opts.bit_accounting)
    preds = predict(compressed.model, test[0])
    err = 100.0 * float((preds != test[1]).float().mean())
    report: dict[str, Any] = {
        "model": opts.model,
        "prior": opts.prior,
        "epochs": opts.epochs,
        "seed": opts.seed,
        "test_error": err,
        "test_error_uncompressed": err_uncompressed,
        "train_seconds": result.seconds,
        "compress_seconds": time.perf_counter() - t0,
        "train_examples": len(train[0]),
        **{k: v for k, v in compressed.report.items() if k not in ("prior",)},
        "config": {k: v for k, v in asdict(opts).items() if k != "extra"} | opts.extra,
        "history": result.history,
        "environment": {
            "bayescomp": __version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    if command:
        report["command"] = command
    save_plain(work / MODEL_FILE, compressed.model, {k: report[k] for k in ("model", "prior", "architecture", "bits", "test_error")})
    torch.save({"model": opts.model, "prior": opts.prior, "state_dict": bmodel.state_dict()}, work / POSTERIOR_FILE)
    atomic_write_bytes(work / REPORT, (json.dumps(report, indent=2) + "\n").encode())
    (work / CHECKPOINT).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
    return report
