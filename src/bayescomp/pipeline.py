"""One run end to end — data, model, training, compression, evaluation — into an output folder.

The folder appears only when the run succeeds: work happens in ``DIR.partial`` (checkpoint, metrics),
which is renamed to ``DIR`` at the end. A failed or interrupted run leaves ``DIR.partial`` with its
last good checkpoint and the options it was started with (``options.json``), from which ``resume=True``
continues (with the same options: others are refused) and which `recompress` can compress while the run
is still training. The folder's life cycle (the lock on ``DIR.partial``, what may be deleted, the atomic move
into place) is `rundir`'s.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .base import atomic_write
from .compress import PruneError, apply_masks, compress, group_masks
from .compress.masks import resolve_thresholds
from .compress.thresholds import (
    NO_SPLIT,
    ThresholdChoice,
    histogram_thresholds,
    validation_split,
    validation_thresholds,
)
from .convert import PRIORS, bayesianize
from .data import cifar10_augment, input_shape, load_cifar10, load_mnist
from .io import packed_report, save_plain
from .io import save as save_packed
from .models import MODELS, build_model
from .nn import GroupSparseLayer
from .optioncheck import check_number, check_seed, check_thresholds, train_error
from .recipes import recipe
from .rundir import (
    CHECKPOINT,
    FINETUNE_CHECKPOINT,
    FINETUNE_METRICS,
    METRICS,
    MODEL_FILE,
    OPTIONS,
    PACKED_FILE,
    POSTERIOR_FILE,
    REPORT,
    RunError,
    RunFolder,
    check_out,
    commit,
    final_dir,
    prepare,
    refuse_in_use,
    same_folder,
    work_dir,
)
from .runreport import read_json, read_metrics, read_run, validate_options
from .train import TrainConfig, distributed, evaluate, finetune_config, fit, predict
from .train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .train.loop import (
    flush_denormals,
    length_change_refused,
    load_newest_checkpoint,
    previous_checkpoint,
)

#: options that shape the training trajectory or the trained model: a resumed run must have the same ones
#: (`epochs` may grow; thresholds, bits, device, data location may change). `val_fraction` counts only
#: where a validation split is held out.
RESUME_FIXED = ("model", "prior", "seed", "batch_size", "lr", "lr_scale", "lr_schedule", "lr_decay_epochs", "warmup_epochs",
                "kl_weight", "max_var", "train_subset", "grad_clip", "init_from", "pretrain_epochs", "pretrain_lr", "augment", "tau0", "global_kl",
                "input_origin")


def build_bayesian(model: str, prior: str, *, plain: torch.nn.Module | None = None, keep_weights: bool = False,
                   max_var: float | Mapping[str, float] | None = None, tau0: float | None = None,
                   global_kl: str | None = None, input_origin: float | None = None) -> torch.nn.Module:
    """The Bayesian twin of a zoo model (a fresh one unless `plain` is given); `input_origin`: that of its
    first layer, which reads the data (`bayesianize`)."""
    options = {k: v for k, v in (("tau0", tau0), ("global_kl", global_kl)) if v is not None}
    plain = plain if plain is not None else build_model(model)
    origin = {first_layer(plain): input_origin} if input_origin else None
    return bayesianize(plain, prior, keep_weights=keep_weights, max_var=max_var, input_origin=origin, **options)


def first_layer(model: torch.nn.Module) -> str:
    """The name of the first nn.Linear/nn.Conv2d of a plain model (in registration order: the zoo's order)."""
    return next(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def load_posterior(path: str | os.PathLike) -> torch.nn.Module:
    """The trained Bayesian model stored in a run's posterior.pt (or a training checkpoint)."""
    state = load_checkpoint(path)
    try:
        bmodel = build_bayesian(state["model"], state["prior"], tau0=state.get("tau0"), global_kl=state.get("global_kl"))
        bmodel.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise RunError(f"{path} is not a bayescomp posterior: {exc}") from exc
    return bmodel.eval()


def example_input(model: str, batch: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
    """The example input for compressing a zoo model's posterior: zeros shaped like a batch of its dataset.

    A model that is not an `nn.Sequential` chain is compressed through its torch.fx graph, which needs
    a batch the model accepts; only the shapes matter (the values are never read). `model` is the zoo
    name a run records (report.json, posterior.pt). Every command that compresses a run's posterior
    takes its example input from here.
    """
    return torch.zeros(batch, *input_shape(recipe(model).dataset), device=device)


def evaluate_compression(bmodel: torch.nn.Module, test, thresholds, bit_accounting: str = "code",
                         variance_scale: float = 1.0, *, example: torch.Tensor | None = None,
                         keeps: Mapping[str, torch.Tensor] | None = None):
    """Compress a trained model and measure it: (CompressedModel, figures for report.json).

    `example`: the example input (`example_input`) that a model other than an `nn.Sequential` chain
    is compressed with, through its torch.fx graph. `keeps`: the groups to keep, decided beforehand
    (`finetune`), instead of those the thresholds keep.
    """
    t0 = time.perf_counter()
    err_uncompressed = evaluate(bmodel, *test)
    compressed = compress(bmodel, thresholds, keeps=keeps, bit_accounting=bit_accounting,
                          variance_scale=variance_scale, example_input=example)
    preds = predict(compressed.model, test[0])
    err = 100.0 * float((preds != test[1]).float().mean())
    figures = {"test_error": err, "test_error_uncompressed": err_uncompressed,
               "compress_seconds": time.perf_counter() - t0}
    return compressed, figures


@dataclass
class RunOptions:
    """Everything that defines a run (stored in report.json as `config`)."""

    model: str = "lenet300"
    prior: str = "gnj"
    epochs: int = 10
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)  # learning-rate factor per parameter kind (TrainConfig)
    lr_schedule: str = "constant"  # "cosine": the learning rate falls from lr to 0 (TrainConfig)
    lr_decay_epochs: float | None = None  # cosine: over this many last epochs (None: the whole run)
    warmup_epochs: float = 0.0
    kl_weight: float = 1.0  # final β of the KL term (1: the ELBO; < 1 keeps more, > 1 prunes more)
    thresholds: float | dict[str, float] | None = None
    max_var: float | dict[str, float] | None = None  # None: the recipe's clamp
    train_subset: int | None = None
    data_dir: str | None = None
    bit_accounting: str = "code"
    grad_clip: float | None = None
    init_from: str | None = None  # a state_dict of the plain model to start from (posterior means)
    pretrain_epochs: int = 0  # train the plain twin this long first, then start the Bayesian model from it
    pretrain_lr: float | None = None  # Adam's rate for that pretraining (None: lr)
    augment: bool = True  # CIFAR-10: random crops and flips during training
    verify_data: bool = True  # check the data files' published checksums (off only for data you made)
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available)
    tau0: float | None = None  # group horseshoe: global scale of the prior (None: the layer default, 1e-5)
    input_origin: float | None = None  # the first layer computes on x − this: inputs there carry no signal, no noise
    global_kl: str | None = None  # group horseshoe: "derived" (default) or "paper"
    auto_thresholds: str | None = None  # "histogram" or "validation": choose thresholds after training (compress.thresholds)
    no_split: str = "keep"  # histogram rule, a layer without a split: keep every group, or "floor": cut at the noise floor
    val_budget: float = 0.5  # validation: allowed increase of the validation error, in percentage points
    val_fraction: float = 0.1  # validation: share of the training set held out (never trained on)
    variance_scale: float = 1.0  # precision: Var[w] is multiplied by this before the bits are read (> 1: fewer bits)
    finetune_epochs: int = 0  # after pruning, train the kept groups' posterior this many epochs more (`finetune`)
    finetune_lr: float | None = None  # the fine-tuning's starting learning rate (None: lr)
    recipe: str | None = None  # the training recipe the settings came from (recipes.TRAINING_RECIPES), for the record
    extra: dict[str, Any] = field(default_factory=dict)


def _train_config(opts: RunOptions) -> TrainConfig:
    """The training settings of the Bayesian model's run."""
    return TrainConfig(opts.epochs, opts.batch_size, opts.lr, opts.warmup_epochs, opts.seed, opts.grad_clip,
                       opts.kl_weight, lr_schedule=opts.lr_schedule, lr_decay_epochs=opts.lr_decay_epochs,
                       lr_scale=dict(opts.lr_scale))


def validate(opts: RunOptions) -> None:
    """Refuse bad options before any work or file is made."""
    if opts.model not in MODELS:
        raise RunError(f"--model: unknown model {opts.model!r}; choose one of: {', '.join(sorted(MODELS))}")
    if opts.prior not in PRIORS:
        raise RunError(f"--prior: unknown prior {opts.prior!r}; choose one of: {', '.join(sorted(PRIORS))}")
    if not isinstance(opts.epochs, int) or opts.epochs < 1:
        raise RunError(f"--epochs: epochs must be a positive integer, got {opts.epochs}")
    check_seed(opts.seed)
    check_thresholds(opts.thresholds)
    check_number(opts.warmup_epochs, "--warmup-epochs", minimum=0)
    if opts.prior != "ghs" and (opts.tau0 is not None or opts.global_kl is not None):
        raise RunError("--tau0 and --global-kl apply to the group horseshoe prior (--prior ghs) only")
    if opts.tau0 is not None and not (opts.tau0 > 0 and opts.tau0 < float("inf")):
        raise RunError(f"--tau0 must be a positive finite number, got {opts.tau0}")
    resolve_device(opts.device)
    _validate_max_var(opts)
    _check_layer_names(opts, opts.thresholds, "--thresholds")
    if opts.input_origin is not None:
        if not (isinstance(opts.input_origin, (int, float)) and math.isfinite(opts.input_origin)):
            raise RunError(f"--input-origin: input origin must be a finite number, got {opts.input_origin!r}")
        check_number(opts.input_origin, "--input-origin", float32=True)
        plain = build_model(opts.model)  # the first layer's twin says whether it can take the origin
        first = first_layer(plain)
        try:
            bayesianize(torch.nn.Sequential(plain.get_submodule(first)), opts.prior, keep_weights=False,
                        input_origin={"0": opts.input_origin})
        except (ValueError, RuntimeError, OverflowError) as exc:
            raise RunError(f"--input-origin on model {opts.model}: {first}: {str(exc).removeprefix('0: ')}") from exc
    if opts.finetune_lr is not None and not (isinstance(opts.finetune_lr, (int, float)) and 0 < opts.finetune_lr < float("inf")):
        raise RunError(f"--finetune-lr must be a positive finite number, got {opts.finetune_lr!r}")
    if opts.pretrain_lr is not None and not (isinstance(opts.pretrain_lr, (int, float)) and 0 < opts.pretrain_lr < float("inf")):
        raise RunError(f"--pretrain-lr must be a positive finite number, got {opts.pretrain_lr!r}")
    if opts.pretrain_epochs < 0:
        raise RunError(f"--pretrain-epochs must be ≥ 0, got {opts.pretrain_epochs}")
    if not isinstance(opts.finetune_epochs, int) or opts.finetune_epochs < 0:
        raise RunError(f"--finetune-epochs: fine-tuning epochs must be an integer ≥ 0, got {opts.finetune_epochs!r}")
    if opts.init_from is not None and not Path(opts.init_from).is_file():
        raise RunError(f"--init-from: checkpoint not found: {opts.init_from}")
    if opts.train_subset is not None and opts.train_subset < 1:
        raise RunError(f"--train-subset must be ≥ 1, got {opts.train_subset}")
    if opts.auto_thresholds not in (None, "histogram", "validation"):
        raise RunError(f"--auto-thresholds must be 'histogram' or 'validation', got {opts.auto_thresholds!r}")
    if opts.auto_thresholds is not None and opts.thresholds is not None:
        if opts.auto_thresholds != "histogram" or not isinstance(opts.thresholds, Mapping):
            raise RunError("--thresholds with --auto-thresholds: only with the histogram rule, and only for named "
                           "layers (fc1=2.5), which the rule then leaves alone; a single number or the validation "
                           "rule excludes the other option")
    if opts.no_split not in NO_SPLIT:
        raise RunError(f"--no-split must be one of {', '.join(NO_SPLIT)}, got {opts.no_split!r}")
    if opts.no_split != "keep" and opts.auto_thresholds != "histogram":
        raise RunError(f"--no-split {opts.no_split} says what the histogram rule does in a layer without a split: "
                       "it needs --auto-thresholds histogram")
    if not 0.0 < opts.val_fraction < 1.0:
        raise RunError(f"--val-fraction: validation fraction must be in (0, 1), got {opts.val_fraction}")
    if not (opts.val_budget >= 0 and opts.val_budget < float("inf")):
        raise RunError(f"--val-budget: validation error budget must be a finite number ≥ 0 (points), got {opts.val_budget}")
    if not (opts.variance_scale > 0 and opts.variance_scale < float("inf")):
        raise RunError(f"--variance-scale must be a positive finite number, got {opts.variance_scale}")
    try:
        _train_config(opts).validate()
    except ValueError as exc:
        raise train_error(exc) from exc
    if opts.batch_size % distributed.world_size():
        raise RunError(f"--batch-size {opts.batch_size} is the global batch: it must be divisible by the number of "
                       f"processes ({distributed.world_size()})")


def _validate_max_var(opts: RunOptions) -> None:
    """A variance clamp must be a positive finite number, for layers the model has."""
    if opts.max_var is None:
        return
    per_layer = opts.max_var if isinstance(opts.max_var, Mapping) else {"": opts.max_var}
    for name, value in per_layer.items():
        if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            where = f" for {name}" if name else ""
            raise RunError(f"variance clamp (--clip-var){where} must be a positive finite number, got {value!r}")
    _check_layer_names(opts, opts.max_var, "--clip-var")


def _check_layer_names(opts: RunOptions, per_layer: Any, flag: str) -> None:
    """A per-layer option (a mapping) names only layers the model has: checked before any training."""
    if not isinstance(per_layer, Mapping):
        return
    layers = {n for n, m in build_model(opts.model).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    unknown = sorted(set(per_layer) - layers)
    if unknown:
        raise RunError(f"{flag} names layers that {opts.model} does not have: {', '.join(unknown)} "
                       f"(its layers: {', '.join(sorted(layers))})")


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device value; a clear error where CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise RunError(f"--device: unknown device {name!r}; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name!r} asked for, but this machine/PyTorch build has no CUDA")
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def load_data(model: str, data_dir: str | None, train_subset: int | None = None, seed: int = 0, verify: bool = True):
    """(train, test) tensors of the model's dataset, with an optional seeded random training subset."""
    dataset = recipe(model).dataset
    if dataset == "mnist":
        x, y = load_mnist("train", data_dir, verify=verify)
        xt, yt = load_mnist("test", data_dir, verify=verify)
    elif dataset == "cifar10":
        x, y = load_cifar10("train", data_dir, verify=verify)
        xt, yt = load_cifar10("test", data_dir, verify=verify)
    else:  # pragma: no cover - recipes name known datasets only
        raise RunError(f"unknown dataset {dataset!r}")
    if train_subset is not None and train_subset < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:train_subset]
        x, y = x[idx], y[idx]
    return (x, y), (xt, yt)


def _augmentation(opts: RunOptions):
    if recipe(opts.model).dataset == "cifar10" and opts.augment:
        return lambda batch, gen: cifar10_augment(batch, gen)
    return None


def _plain_start(opts: RunOptions, train, test, progress: bool) -> tuple[torch.nn.Module, bool]:
    """The plain model to convert, and whether its weights are a trained start (kept as posterior means)."""
    plain = build_model(opts.model)
    trained = False
    if opts.init_from is not None:
        state = load_checkpoint(opts.init_from)
        state = state.get("state_dict", state)
        try:
            plain.load_state_dict(state)
        except RuntimeError as exc:
            raise RunError(f"--init-from {opts.init_from} does not fit model {opts.model}: {exc}") from exc
        trained = True
    if opts.pretrain_epochs > 0:
        lr = opts.lr if opts.pretrain_lr is None else opts.pretrain_lr
        config = TrainConfig(opts.pretrain_epochs, opts.batch_size, lr, 0.0, opts.seed, opts.grad_clip)
        plain = plain.to(resolve_device(opts.device))
        fit(plain, train, config, test=test, progress=progress, transform=_augmentation(opts))
        plain = plain.cpu()
        trained = True
    return plain, trained


def prepare_out(out: str | os.PathLike, resume: bool, force: bool) -> RunFolder:
    """Check the output folder can be written, make and lock its working folder ``OUT.partial`` (`rundir.prepare`).

    Data-parallel, rank 0 makes and locks it; the other ranks wait for it and share it.
    """
    folder = prepare(out, resume=resume, force=force, lock=distributed.is_main())
    distributed.barrier()  # data-parallel: the other ranks wait until rank 0 has made DIR.partial
    return folder


def _refuse_own_source(run_dir: Path, out: str | os.PathLike) -> None:
    """`prune`/`finetune` write a new folder: never the run they read, nor its working folder."""
    if str(out).strip() and any(same_folder(Path(out), p) for p in (final_dir(run_dir), work_dir(run_dir))):
        raise RunError(f"--out {out} is the run being read ({run_dir}); write the result to another folder")


def check_resume_options(work: Path, opts: RunOptions) -> None:
    """Refuse to resume the run in `work` with options that would change what it trains (`RESUME_FIXED`).

    A run started by a version that did not record its options (no options.json) is resumed as asked.
    """
    path = work / OPTIONS
    if not path.is_file():
        return
    started = validate_options(read_json(path), path, RunOptions, required=())
    now = asdict(opts)
    keys = list(RESUME_FIXED)
    if "validation" in (started.get("auto_thresholds"), now.get("auto_thresholds")):
        keys += ["auto_thresholds", "val_fraction"]  # the held-out split changes the training set
    defaults = asdict(RunOptions())  # an option the starting version did not record had its default
    changed = [f"{k}={started.get(k, defaults.get(k))!r} (now {now.get(k)!r})" for k in keys
               if started.get(k, defaults.get(k)) != now.get(k)]
    changed += filter(None, [length_change_refused(opts.lr_schedule, started.get("epochs"), opts.epochs)])
    if changed:
        raise RunError(f"the run in {work} was started with other options: {', '.join(changed)}; "
                       f"resume with the same options, or start afresh with --force")


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
    finetune_metrics.jsonl) and options.json alone (no checkpoint is read): epochs done and planned (training,
    then fine-tuning), the last epoch's figures, the time spent and, from the mean of the last five epochs,
    the time left."""
    run_dir = Path(run_dir)
    work = work_dir(run_dir)
    metrics = work / METRICS
    if not metrics.is_file():
        raise RunError(f"no finished run at {run_dir} (no {REPORT}) and no unfinished one at {work} (no {METRICS})")
    rows = read_metrics(metrics)
    options: dict[str, Any] = {}
    if (work / OPTIONS).is_file():
        options = validate_options(read_json(work / OPTIONS), work / OPTIONS, RunOptions, required=())
        for key in ("epochs", "finetune_epochs"):
            if (options.get(key) or 0) < 0:
                raise RunError(f"{work / OPTIONS}: field {key!r} must be ≥ 0, got {options[key]}")
    out: dict[str, Any] = {"folder": str(work), "model": options.get("model"), "prior": options.get("prior"),
                           "epochs_done": len(rows), "epochs": options.get("epochs")}
    tuning = work / FINETUNE_METRICS
    planned_ft = int(options.get("finetune_epochs") or 0)
    ft_rows = read_metrics(tuning) if tuning.is_file() else []
    if planned_ft:
        out.update(finetune_epochs=planned_ft, finetune_epochs_done=len(ft_rows))
    if rows:
        seconds = [float(r.get("seconds") or 0.0) for r in rows + ft_rows]
        recent = seconds[-5:]  # (fine-tuning epochs, once they run: they take as long as training ones)
        out.update(last=(ft_rows or rows)[-1], seconds_spent=sum(seconds), epoch_seconds=sum(recent) / len(recent))
        if out["epochs"] is not None:
            left = max(0, out["epochs"] - len(rows)) + max(0, planned_ft - len(ft_rows))
            out["seconds_left"] = left * out["epoch_seconds"]
    return out


def _hold_out(opts: RunOptions, train):
    """(training set, validation split): with --auto-thresholds validation the split is held out of the
    TRAINING set (never the test set); otherwise (train, None)."""
    if opts.auto_thresholds != "validation":
        return train, None
    try:
        train_idx, val_idx = validation_split(len(train[0]), opts.val_fraction, opts.seed)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    return (train[0][train_idx], train[1][train_idx]), (train[0][val_idx], train[1][val_idx])


def choose_thresholds(opts: RunOptions, bmodel: torch.nn.Module, val, example: torch.Tensor):
    """(thresholds, choice) a run compresses with: its --auto-thresholds rule's per-layer choice (with the
    histogram rule, a layer named in --thresholds takes the value given there), or else its --thresholds,
    or the recipe's (choice None)."""
    if opts.auto_thresholds == "histogram":
        choice = histogram_thresholds(bmodel, no_split=opts.no_split)
        given = opts.thresholds if isinstance(opts.thresholds, Mapping) else {}  # (names checked by `validate`)
        for name, value in given.items():
            choice[name] = _given(bmodel, name, value)
    elif opts.auto_thresholds == "validation":
        choice = validation_thresholds(bmodel, *val, opts.val_budget, variance_scale=opts.variance_scale,
                                       example_input=example)
    else:
        thresholds = opts.thresholds if opts.thresholds is not None else recipe(opts.model).thresholds.get(opts.prior)
        return thresholds, None
    return {name: c.value for name, c in choice.items()}, choice


def _given(bmodel: torch.nn.Module, name: str, value: float) -> ThresholdChoice:
    """The choice record of a threshold the user set for one layer."""
    la = bmodel.get_submodule(name).log_alpha().detach()
    return ThresholdChoice(float(value), "given", "set by --thresholds", int((la < value).sum()), la.numel())


def _decide_again(rule: RunOptions | None, bmodel: torch.nn.Module, previous: Mapping[str, Any],
                  thresholds: Any) -> tuple[Any, dict[str, Any] | None]:
    """(thresholds, threshold_choice) to compress a finished run's posterior `bmodel` with again.

    The run's own thresholds and choice (its report, `previous`), or, given `rule` (the run's options with
    another `no_split`, `_no_split_again`), its histogram rule's choice made again with those.
    `thresholds` naming some layers change only those (`named_over`), recorded in the choice as given; a
    single number replaces them all. A run whose thresholds were set by hand has no choice (None).
    """
    own, choice = previous.get("thresholds") or None, previous.get("threshold_choice")
    if rule is not None:
        own, chosen = choose_thresholds(rule, bmodel, None, example_input(rule.model))
        choice = {name: c.to_dict() for name, c in chosen.items()}
    if thresholds is None:
        return own, choice
    thresholds = named_over(own, thresholds)
    if choice:
        choice = {name: choice[name] if name in choice and choice[name].get("value") == value
                  else _given(bmodel, name, value).to_dict()
                  for name, value in resolve_thresholds(bmodel, thresholds).items()}
    return thresholds, choice


def _no_split_again(opts: RunOptions, no_split: str) -> RunOptions:
    """A run's options with its histogram rule's `no_split` changed (refused for a run of another rule)."""
    opts.no_split = no_split
    validate(replace(opts, init_from=None))  # the start the run came from is not needed any more
    return opts


def finetune(opts: RunOptions, bmodel: torch.nn.Module, train, test, thresholds, work: Path, *,
             example: torch.Tensor | None = None, resume: bool = False,
             progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Prune `bmodel` at `thresholds`, then fine-tune the posterior of what is kept: (keeps, what report.json
    records of it under `finetune`: its length, the errors the model had before it, its time and history).

    The decision comes first and stays: the layers' `group_mask` switches the pruned groups off (the
    network computes without them, in training as at evaluation), and `fit` trains the rest for
    `opts.finetune_epochs` epochs with the run's settings (`finetune_config`: no warm-up, the learning rate
    falling to 0), checkpointed in `work/finetune.pt`; with `resume`, a fine-tuning stopped there continues.
    The caller compresses with `keeps=`, so the compressed model keeps exactly these groups, even one whose
    score crossed its threshold meanwhile.

    Why. Pruning a group that still carried a little signal costs accuracy (on LeNet-300-100 with the
    horseshoe, mostly fc1's input pixels); the kept weights can take that signal over.

    Data-parallel, every process calls this (the models are identical, so are the decisions); the errors
    before fine-tuning are measured on rank 0 only. `example`: as for `evaluate_compression`.
    """
    record: dict[str, Any] = {"epochs": opts.finetune_epochs}
    if distributed.is_main():
        before = evaluate_compression(bmodel, test, thresholds, opts.bit_accounting, opts.variance_scale,
                                      example=example)[1]
        record.update(test_error_before=before["test_error"],
                      test_error_uncompressed_before=before["test_error_uncompressed"])
    keeps = group_masks(bmodel, thresholds)
    empty = [name for name, keep in keeps.items() if not bool(keep.any())]
    if empty:
        raise PruneError(f"the thresholds prune every group of layer(s) {', '.join(empty)}: nothing left to fine-tune")
    apply_masks(bmodel, keeps)
    checkpoint = work / FINETUNE_CHECKPOINT
    resume = resume and (checkpoint.is_file() or previous_checkpoint(checkpoint).is_file())
    with flush_denormals():  # the pruned groups' weights decay towards 0 (see there)
        result = fit(bmodel, train, finetune_config(_train_config(opts), opts.finetune_epochs, opts.finetune_lr), test=test,
                     checkpoint=checkpoint, resume=resume, metrics=work / FINETUNE_METRICS, progress=progress,
                     transform=_augmentation(opts))
    return keeps, record | {"seconds": result.seconds, "history": result.history}


def _config(opts: RunOptions) -> dict[str, Any]:
    """The options as report.json records them (`config`)."""
    return {k: v for k, v in asdict(opts).items() if k != "extra"} | opts.extra


def _posterior(opts: RunOptions, bmodel: torch.nn.Module) -> dict[str, Any]:
    """What posterior.pt holds (`load_posterior` reads it)."""
    return {"model": opts.model, "prior": opts.prior, "tau0": opts.tau0, "global_kl": opts.global_kl,
            "state_dict": bmodel.state_dict()}


def run(opts: RunOptions, out: str | os.PathLike, *, resume: bool = False, force: bool = False,
        progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train, compress and evaluate one model; write DIR/report.json, model.bcz (packed), model.pt (plain),
    posterior.pt, metrics.jsonl.

    Under torchrun (WORLD_SIZE > 1) every process trains its share of each global batch; rank 0 alone writes
    DIR and returns the report, the others return an empty dict.
    """
    validate(opts)
    check_out(out)
    refuse_in_use(out)
    device = resolve_device(opts.device)
    distributed.init_from_env(device)  # joins the process group under torchrun (gloo on CPU, nccl on CUDA)
    train, test = load_data(opts.model, opts.data_dir, opts.train_subset, opts.seed, opts.verify_data)  # fail before any folder
    train, val = _hold_out(opts, train)
    with prepare_out(out, resume, force) as folder:  # locked until the run ends, however it ends
        if folder.interrupted_move:  # killed while its finished folder was moved into place: complete that
            commit(folder)
            return json.loads((folder.final / REPORT).read_text())
        if resume:
            check_resume_options(folder.work, opts)
        report = _train_and_write(opts, folder, device, train, test, val, resume=resume, progress=progress,
                                  command=command)
    # Data-parallel: every process leaves together. A rank that tears its process group down while rank 0 still
    # compresses and writes can be aborted by gloo at exit ("terminate called without an active exception").
    distributed.barrier()
    return report


def _train_and_write(opts: RunOptions, folder: RunFolder, device: torch.device, train, test, val, *, resume: bool,
                     progress: bool, command: str | None) -> dict[str, Any]:
    """The body of `run` in its locked working folder: train, compress, evaluate, write, move into place."""
    work = folder.work
    max_var = recipe(opts.model).clamps(opts.prior) if opts.max_var is None else opts.max_var
    if distributed.is_main():  # (on resume: what may change, e.g. more epochs, is recorded too)
        atomic_write(work / OPTIONS, (json.dumps(asdict(opts), indent=2) + "\n").encode())

    torch.manual_seed(opts.seed)
    plain, trained = _plain_start(opts, train, test, progress) if not resume else (build_model(opts.model), False)
    bmodel = build_bayesian(opts.model, opts.prior, plain=plain, keep_weights=trained, max_var=max_var or None,
                            tau0=opts.tau0, global_kl=opts.global_kl, input_origin=opts.input_origin).to(device)
    config = _train_config(opts)
    result = fit(bmodel, train, config, test=test, checkpoint=work / CHECKPOINT, resume=resume,
                 metrics=work / METRICS, progress=progress, transform=_augmentation(opts))
    example = example_input(opts.model, device=device)
    keeps = tuned = None
    if opts.finetune_epochs:  # every process prunes and fine-tunes
        thresholds, choice = choose_thresholds(opts, bmodel, val, example)
        keeps, tuned = finetune(opts, bmodel, train, test, thresholds, work, example=example, resume=resume,
                                progress=progress)
    if not distributed.is_main():
        return {}  # rank 0 compresses, evaluates and writes DIR
    if not opts.finetune_epochs:
        thresholds, choice = choose_thresholds(opts, bmodel, val, example)
    compressed, figures = evaluate_compression(bmodel, test, thresholds, opts.bit_accounting, opts.variance_scale,
                                               example=example, keeps=keeps)
    report: dict[str, Any] = {
        "model": opts.model,
        "prior": opts.prior,
        "epochs": opts.epochs,
        "seed": opts.seed,
        **figures,
        "train_seconds": result.seconds,
        "train_examples": len(train[0]),
        **{k: v for k, v in compressed.report.items() if k not in ("prior",)},
        "config": _config(opts),
        "history": result.history,
        "environment": {
            "bayescomp": __version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processes": distributed.world_size(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "device": str(device),
        },
    }
    if choice is not None:
        report["threshold_choice"] = {name: c.to_dict() for name, c in choice.items()}
    if tuned is not None:
        report["finetune"] = tuned
    if val is not None:
        report["validation_examples"] = len(val[0])
    if command:
        report["command"] = command
    _finish(folder, report, compressed, _posterior(opts, bmodel))
    return report


def _finish(folder: RunFolder, report: dict[str, Any], compressed, posterior: dict[str, Any]) -> None:
    """Write the run's files into the working folder, then move it to its final name (`rundir.commit`)."""
    work = folder.work
    meta = {k: report.get(k) for k in ("model", "prior", "architecture", "bits", "test_error")}
    save_plain(work / MODEL_FILE, compressed.model, meta)
    save_packed(compressed, work / PACKED_FILE)
    packed = packed_report(compressed, work / PACKED_FILE)
    report.update({k: packed[k] for k in ("cr_max", "file_bytes", "cr_file")})
    report["packed"] = {k: v for k, v in packed.items() if k not in ("cr_max", "file_bytes", "cr_file")}
    save_checkpoint(work / POSTERIOR_FILE, posterior)
    atomic_write(work / REPORT, (json.dumps(report, indent=2) + "\n").encode())
    commit(folder)  # (drops the checkpoints and options.json: report.json holds the options as `config`)


def named_over(own: Any, given: Any) -> Any:
    """Thresholds `given` for a run whose own are `own`: a mapping naming some layers changes only those (the
    others keep the run's own); a number, or a mapping over a run without per-layer thresholds, is as given."""
    if isinstance(given, Mapping) and isinstance(own, Mapping):
        return {**own, **given}
    return given


def _over(previous: dict[str, Any], figures: dict[str, Any], compressed) -> dict[str, Any]:
    """A run's report with a new compression's figures and report fields in place of its own."""
    return {k: v for k, v in previous.items() if k not in compressed.report and k not in figures} | figures | \
        compressed.report


def recompress(run_dir: str | os.PathLike, out: str | os.PathLike, thresholds: float | Mapping[str, float] | None,
               *, data_dir: str | None = None, bit_accounting: str = "code", force: bool = False,
               variance_scale: float = 1.0, verify: bool = True, no_split: str | None = None,
               command: str | None = None) -> dict[str, Any]:
    """Compress a run's posterior again (other thresholds), evaluate it, write a new run folder.

    A finished run is compressed from its posterior.pt. A run still training (or stopped before the end)
    is compressed from the newest checkpoint in its ``DIR.partial`` (`unfinished_run`; while it is being
    fine-tuned, the fine-tuning's, `unfinished_decision`): a look at a long run half way, which leaves the
    run alone; the report's `unfinished` says at which epoch.

    `thresholds=None` keeps the thresholds the run used (its report's `thresholds`; for an unfinished run,
    the ones it would choose: its --thresholds, its --auto-thresholds rule, or the recipe's); a mapping that
    names some layers changes only those, the others keep the run's; the report's `threshold_choice`
    records them as given. `no_split` ("keep" or "floor"): a run of the histogram rule chooses its thresholds
    again with that in the layers without a split (`_decide_again`). `verify=False` skips the data files'
    checksum check (data you made yourself). `command`: this command line, recorded as the report's
    `command`; the one that made the run compressed again becomes its `source_command`.
    """
    run_dir = Path(run_dir)
    check_thresholds(thresholds)
    check_number(variance_scale, "--variance-scale", positive=True)
    if bit_accounting not in ("code", "paper"):
        raise RunError(f"--bit-accounting must be 'code' or 'paper', got {bit_accounting!r}")
    check_out(out)
    _refuse_own_source(run_dir, out)
    refuse_in_use(out)
    posterior_path = run_dir / POSTERIOR_FILE
    unfinished = opts = None
    if posterior_path.is_file():
        state = load_checkpoint(posterior_path)
        bmodel = load_posterior(posterior_path)
        previous = read_run(run_dir, required=False) or {"model": state["model"], "prior": state["prior"]}
        if no_split is not None:
            opts = _no_split_again(_run_options(run_dir, previous), no_split)
    else:
        opts, bmodel, epoch, work = unfinished_run(run_dir)
        if no_split is not None:
            _no_split_again(opts, no_split)
        state = _posterior(opts, bmodel)
        previous = {"model": opts.model, "prior": opts.prior, "epochs": opts.epochs, "seed": opts.seed,
                    "config": _config(opts)}
        unfinished = {"from": str(work), "epochs_trained": epoch, "epochs": opts.epochs}
    _, test = load_data(state["model"], data_dir, 1, verify=verify)
    folder = prepare_out(out, False, force)
    keeps = choice = None
    try:
        if unfinished is not None:
            thresholds, keeps, tuned = unfinished_decision(opts, bmodel, unfinished["from"], thresholds, data_dir,
                                                           verify)
            if tuned:
                unfinished.update(finetune_epochs_done=tuned, finetune_epochs=opts.finetune_epochs)
        else:  # the run's own thresholds (a recipe's, or the user's), not the priors' defaults
            thresholds, choice = _decide_again(opts, bmodel, previous, thresholds)
        compressed, figures = evaluate_compression(bmodel, test, thresholds, bit_accounting, variance_scale,
                                                   example=example_input(state["model"]), keeps=keeps)
        report = _over(previous, figures, compressed)
        report.pop("threshold_choice", None)
        if choice:
            report["threshold_choice"] = choice
        if unfinished is not None:
            report["unfinished"] = unfinished
        else:
            report["recompressed_from"] = str(run_dir)
        if "command" in previous:
            report["source_command"] = report.pop("command")
        if command:
            report["command"] = command
        _finish(folder, report, compressed, state)
    except BaseException:
        folder.abandon()
        raise
    return report


def _run_options(run_dir: Path, previous: Mapping[str, Any]) -> RunOptions:
    """The options a finished run was made with: its report (`previous`)'s `config`."""
    if "config" not in previous:
        raise RunError(f"{run_dir / REPORT}: field 'config' is missing: the run's options are unknown")
    return read_options(previous["config"], run_dir / REPORT, where="config.")


def read_options(values: Any, path: Path, where: str = "") -> RunOptions:
    """The RunOptions recorded in a file (options.json, or report.json's `config` with `where`="config."),
    checked field by field (`validate_options`) and as a whole (`validate`); errors name the file and field."""
    validate_options(values, path, RunOptions, where=where)
    fields = RunOptions.__dataclass_fields__
    opts = RunOptions(**{k: v for k, v in values.items() if k in fields and k != "extra"},
                      extra={k: v for k, v in values.items() if k not in fields})
    try:  # (the run's start file and device need not be here to read what it made)
        validate(replace(opts, init_from=None, device="cpu"))
    except RunError as exc:
        raise RunError(f"{path}: {'field ' + repr(where.rstrip('.')) + ': ' if where else ''}{exc}") from exc
    return opts


def finetune_run(run_dir: str | os.PathLike, out: str | os.PathLike, epochs: int, *,
                 thresholds: float | Mapping[str, float] | None = None, no_split: str | None = None,
                 data_dir: str | None = None, device: str | None = None, force: bool = False, progress: bool = True,
                 command: str | None = None) -> dict[str, Any]:
    """Prune a finished run's posterior and fine-tune it for `epochs` epochs (`finetune`); write a new run folder.

    The run's own settings are used (its report's `config`: training set, batch, rate, KL weight, seed),
    with `finetune_epochs=epochs`, so the result is the one `run` gives for those options in one go.
    `thresholds=None` keeps the run's own thresholds (its report's `thresholds`); others are recorded in the
    new report's `config` (in place of the run's --auto-thresholds rule; a validation split the run held out
    stays held out). A mapping naming some layers only changes those: the others keep the run's own (for a
    run whose histogram rule chose them, the config then records the rule and the named layers, as
    `compress --auto-thresholds histogram --thresholds ...` would). `no_split`: a histogram run's thresholds
    are chosen again with it (`_decide_again`), as `compress --no-split` would have. `data_dir` and `device`
    default to the run's.
    """
    run_dir = Path(run_dir)
    posterior_path = run_dir / POSTERIOR_FILE
    if not isinstance(epochs, int) or epochs < 1:
        raise RunError(f"--epochs: fine-tuning epochs must be a positive integer, got {epochs!r}")
    check_thresholds(thresholds)
    check_out(out)
    _refuse_own_source(run_dir, out)
    refuse_in_use(out)
    if not posterior_path.is_file():
        raise RunError(f"no trained posterior at {posterior_path}: fine-tuning needs a finished run")
    previous = read_run(run_dir)
    opts = _run_options(run_dir, previous)
    if opts.finetune_epochs:
        raise RunError(f"the run in {run_dir} is fine-tuned already ({opts.finetune_epochs} epochs)")
    opts.finetune_epochs = epochs
    opts.data_dir = data_dir if data_dir is not None else opts.data_dir
    opts.device = device if device is not None else opts.device
    opts.no_split = no_split if no_split is not None else opts.no_split
    validate(replace(opts, init_from=None))  # the start the run came from is not needed any more
    torch_device = resolve_device(opts.device)
    train, test = load_data(opts.model, opts.data_dir, opts.train_subset, opts.seed, opts.verify_data)
    train, _ = _hold_out(opts, train)  # the training set the posterior was trained on
    bmodel = load_posterior(posterior_path).to(torch_device)
    given = thresholds
    thresholds, choice = _decide_again(opts if no_split is not None else None, bmodel, previous, given)
    if given is not None:  # the config records how the decision was taken
        partial = isinstance(given, Mapping) and isinstance(thresholds, Mapping) and set(given) < set(thresholds)
        if partial and opts.auto_thresholds == "histogram":  # named layers given, the rest the rule's (as `run`)
            named = opts.thresholds if isinstance(opts.thresholds, Mapping) else {}
            opts.thresholds = {**named, **given}
        else:
            opts.thresholds, opts.auto_thresholds, opts.no_split = thresholds, None, "keep"
    folder = prepare_out(out, False, force)
    try:
        example = example_input(opts.model, device=torch_device)
        keeps, tuned = finetune(opts, bmodel, train, test, thresholds, folder.work, example=example,
                                progress=progress)
        compressed, figures = evaluate_compression(bmodel, test, thresholds, opts.bit_accounting,
                                                   opts.variance_scale, example=example, keeps=keeps)
        report = _over(previous, figures, compressed)
        report["config"] = _config(opts)
        report["finetune"] = tuned
        report["finetuned_from"] = str(run_dir)
        report.pop("threshold_choice", None)
        if choice:
            report["threshold_choice"] = choice
        if "command" in previous:  # the command that trained the posterior, beside this one
            report["training_command"] = report.pop("command")
        if command:
            report["command"] = command
        _finish(folder, report, compressed, _posterior(opts, bmodel))
    except BaseException:
        folder.abandon()
        raise
    return report


def unfinished_thresholds(opts: RunOptions, bmodel: torch.nn.Module, data_dir: str | None, verify: bool):
    """The thresholds the unfinished run would use if it ended now (`choose_thresholds`, as `run` does)."""
    val = None
    if opts.auto_thresholds == "validation":
        _, val = _hold_out(opts, load_data(opts.model, data_dir, opts.train_subset, opts.seed, verify)[0])
    return choose_thresholds(opts, bmodel, val, example_input(opts.model))[0]


def unfinished_decision(opts: RunOptions, bmodel: torch.nn.Module, work: str | os.PathLike,
                        thresholds: float | Mapping[str, float] | None, data_dir: str | None,
                        verify: bool) -> tuple[Any, dict[str, torch.Tensor] | None, int]:
    """How the unfinished run in `work`, whose training checkpoint `bmodel` holds, would be compressed if it
    ended now: (thresholds, keeps, fine-tuning epochs done).

    `thresholds=None`: the ones the run chooses (`unfinished_thresholds`, from the trained posterior, as
    `run` does). A run already being fine-tuned took its decision then: its newest fine-tuning checkpoint
    is loaded into `bmodel`, and with the run's own thresholds, `keeps` are the groups it fine-tunes (the
    layers' `group_mask`), as `run` will compress them; other thresholds can only prune more.
    """
    own = thresholds is None
    if own:
        thresholds = unfinished_thresholds(opts, bmodel, data_dir, verify)
    elif isinstance(thresholds, Mapping):  # layers not named keep the ones the run would choose
        thresholds = named_over(resolve_thresholds(bmodel, unfinished_thresholds(opts, bmodel, data_dir, verify)),
                                thresholds)
    checkpoint = Path(work) / FINETUNE_CHECKPOINT
    if not (checkpoint.is_file() or previous_checkpoint(checkpoint).is_file()):
        return thresholds, None, 0
    try:
        state, _ = load_newest_checkpoint(checkpoint, repair=False, purpose="compressing")
        bmodel.load_state_dict(state["model"])
    except (CheckpointError, KeyError, RuntimeError) as exc:
        raise RunError(f"unfinished fine-tuning in {work}: {exc}") from exc
    bmodel.eval()
    keeps = {name: m.group_mask.clone() for name, m in bmodel.named_modules() if isinstance(m, GroupSparseLayer)}
    return thresholds, keeps if own else None, int(state.get("epoch", 0))
