"""fit(): maximise the ELBO of a Bayesian model on in-memory tensors, on one process or data-parallel.

Per step: loss = mean cross-entropy + β·KL/N, with N the size of the training set (the negative
ELBO divided by N; one local-reparameterisation sample), Adam, then the layers' variance clamps.
β ramps linearly from 0 to 1 over `warmup_epochs` (KL warm-up), then stays at 1.

Data-parallel (launched by torchrun, see `distributed`): `batch_size` is the global batch; each of the
W processes takes a contiguous 1/W share of every global batch of the same seeded permutation, and
DistributedDataParallel averages the gradients, so a step is the single-process step on the global batch
(up to float rounding; the sampling noise differs, as each process draws its own). Only rank 0 writes
checkpoints and metrics and prints.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base import atomic_write
from ..convert import group_layers, kl_divergence
from ..nn.base import PARAMETER_KINDS, fuse_weight_kl, parameter_kind
from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .memory import keep_freed_memory


class TrainingDivergedError(FloatingPointError):
    """The loss or a parameter became NaN/inf; the message names the step and the layer."""


#: learning-rate schedules `fit` knows (see `lr_at`)
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Settings of one training run (all plain values, stored in checkpoints and reports).

    - `epochs`: passes over the training set.
    - `batch_size`: examples per optimiser step. Data-parallel, this is the GLOBAL batch, split evenly over
      the processes (it must be divisible by their number).
    - `lr`: Adam's learning rate (PyTorch's other Adam defaults).
    - `lr_schedule`: "constant" (default, the paper's Adam): `lr` throughout. "cosine": the learning rate
      falls from `lr` to 0 along half a cosine (`lr_at`), which damps the step-to-step noise of the last
      epochs. The curve is laid out over `epochs`, so a cosine run cannot be extended.
    - `lr_decay_epochs`: with "cosine", how many of the last epochs the fall takes (the rate is `lr` before
      them); None (default): the whole run. A short fall at the end lets the groups the prior switches off
      finish collapsing at the full rate first (a whole-run cosine slows that, and fewer groups separate).
    - `warmup_epochs`: β of the KL term ramps linearly from 0 to `kl_weight` over this many epochs; 0 (default):
      β = `kl_weight` from the start. β is a function of the global step, so a resumed run continues the same ramp.
    - `kl_weight`: the final β (default 1: the ELBO). Below 1 the KL counts less than the data: a tempered
      posterior that keeps more groups and fits better; above 1, sparser. The warm-up ramps 0 → `kl_weight`.
    - `seed`: data order, augmentation and sampling noise; the same seed gives the same run, bit for bit
      (on the same machine, library versions and number of processes), resumed or not.
    - `grad_clip`: None (default): no clipping. Otherwise the gradient norm is clipped to this value
      every step, and a non-finite norm stops training with `TrainingDivergedError` naming the parameter.
    - `eval_every`: evaluate on the test set every this many epochs (and after the last one); default 1.
    - `check_grads`: False (default): per step, only the loss is checked for NaN/inf (a non-finite
      gradient then shows as a non-finite loss one step later, which names the parameter). True: every
      gradient is checked after each backward pass and the first non-finite one is named at once (a
      little slower).
    - `lr_scale`: per parameter kind ("mean", "variance", "scale": `nn.parameter_kind`), a factor on the
      learning rate of those parameters (the schedule scales them all alike); a kind not named: 1. Adam's
      step is about `lr` per step whatever the gradient's size, so a log-variance or a group scale that has
      to travel from its initial value (log σ² = −9) to a pruned group's (log α above the threshold, several
      units away) needs thousands of steps at 1e-3: `recipes.FAST` gives them a larger rate.

    Not set here: the variance clamp σ² ≤ `max_var` belongs to the layers (`bayesianize(..., max_var=)`,
    per layer or for all; default None: no clamp; the model recipes set the paper's values). `fit` applies
    it after every optimiser step.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 0.0
    seed: int = 0
    grad_clip: float | None = None
    kl_weight: float = 1.0
    eval_every: int = 1
    lr_schedule: str = "constant"
    lr_decay_epochs: float | None = None
    check_grads: bool = False
    lr_scale: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_decay_epochs is not None:
            if self.lr_schedule == "constant":
                raise ValueError("lr_decay_epochs needs a decaying learning-rate schedule (lr_schedule='cosine')")
            if not (0 < self.lr_decay_epochs <= self.epochs):
                raise ValueError(f"lr_decay_epochs must be in (0, epochs={self.epochs}], got {self.lr_decay_epochs}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warm-up epochs must be ≥ 0, got {self.warmup_epochs}")
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight > 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"KL weight must be positive and finite, got {self.kl_weight!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"gradient clip must be positive, got {self.grad_clip}")
        if not isinstance(self.lr_scale, dict):
            raise ValueError(f"lr_scale must be a mapping of parameter kind to factor, got {self.lr_scale!r}")
        for kind, factor in self.lr_scale.items():
            if kind not in PARAMETER_KINDS:
                raise ValueError(f"lr_scale names an unknown parameter kind {kind!r}; the kinds: {', '.join(PARAMETER_KINDS)}")
            if not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
                raise ValueError(f"lr_scale of {kind!r} must be a positive finite number, got {factor!r}")
        if not isinstance(self.check_grads, bool):
            raise ValueError(f"check_grads must be True or False, got {self.check_grads!r}")


def finetune_config(config: TrainConfig, epochs: int, lr: float | None = None) -> TrainConfig:
    """The settings of fine-tuning after pruning: `config`'s (batch, rate, KL weight, seed, clipping) for `epochs`
    epochs, with no KL warm-up and the learning rate falling from `lr` (default: `config.lr`) to 0 along half a
    cosine over them.

    Why the fall. Over a whole training run it stops the groups the prior switches off from collapsing
    (fewer separate; README, group horseshoe). Once the pruning decision is fixed (the layers' `group_mask`)
    there is nothing left to collapse, and the fall only settles the kept weights at the end.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fine-tuning epochs must be a positive integer, got {epochs!r}")
    return replace(config, epochs=epochs, warmup_epochs=0.0, lr_schedule="cosine", lr_decay_epochs=None,
                   lr=config.lr if lr is None else lr)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Within this block, the CPU treats denormal floats (|x| < 1.2e-38 in float32) as 0; after it, PyTorch's
    default again (they are kept; torch has no getter for the setting to restore).

    Fine-tuning needs it: the weights of the pruned groups (and Adam's moments of them) see no data any more,
    only the KL's pull to 0, and decay into the denormal range, where every operation on them is slow
    (on LeNet-300-100 with the horseshoe after five epochs, 72 ms a forward and backward pass instead of 16). Values that small
    are zeros for every purpose of the model. A no-op where the CPU cannot flush them.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


#: settings that shape the trajectory: a checkpoint resumes only a run with the same ones (`epochs` may grow)
_RUN_DEFINING = ("batch_size", "lr", "warmup_epochs", "seed", "grad_clip", "kl_weight", "lr_schedule",
                 "lr_decay_epochs", "lr_scale")


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def _count_wrong(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> int:
    was = model.training
    model.eval()
    wrong = 0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(device))
        wrong += int((out.argmax(1).cpu() != y[i : i + batch_size]).sum())
    model.train(was)
    return wrong


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error in % of `model` in evaluation mode (restores the previous mode)."""
    return 100.0 * _count_wrong(model, x, y, batch_size) / max(len(x), 1)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted classes of `model` in evaluation mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(preds)


def _non_finite_layer(model: nn.Module, grads: bool) -> str | None:
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is not None and not torch.isfinite(t).all():
            return name
    return None


def _non_finite_output(model: nn.Module, xb: Tensor) -> str | None:
    """The first layer (in execution order) whose output is NaN/inf on batch `xb`, from a forward pass without
    gradients (a fresh noise sample: a layer that overflows does so again)."""
    found: list[str] = []

    def hook(name: str):
        def check(module: nn.Module, args: Any, out: Any) -> None:
            if not found and isinstance(out, Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)
        return check

    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            model(xb)
    except Exception:  # the diagnosis must not hide the divergence
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _divergence(model: nn.Module, xb: Tensor, what: str, lr: float) -> str:
    """Where a non-finite loss (`what`: how it showed) came from, and its likely cause, in one line: the first
    parameter that is non-finite (and how many more), else the first layer whose output is, else the first
    layer whose KL term is."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    cause = (f"likely cause: a learning rate too high for this model (--lr {lr:g}): lower it, or clip the "
             "gradients (--grad-clip)")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        layer = bad[0].rpartition(".")[0] or bad[0]
        return f"{what}: layer {layer}, parameter {bad[0]} is non-finite{more}; {cause}"
    if not torch.isfinite(xb).all():
        return f"{what}: the input batch holds NaN/inf values; the data are damaged (check the data files)"
    layer = _non_finite_output(model, xb)
    if layer is not None:
        own = [(float(p.detach().abs().max()), n) for n, p in model.named_parameters()
               if n.startswith(layer + ".") and p.numel()]
        largest = f"; the largest, {max(own)[1]}, reaches {max(own)[0]:.3g}" if own else ""
        return (f"{what}: the output of layer {layer} is the first non-finite one (its parameters are finite"
                f"{largest}); {cause}")
    for name, module in group_layers(model).items():
        with torch.no_grad():
            if not torch.isfinite(module.kl()).all():
                return f"{what}: the KL term of layer {name} is non-finite (its parameters are finite); {cause}"
    return f"{what}: every layer's output is finite, the loss itself overflowed; {cause}"


def _clip_gradients(model: nn.Module, max_norm: float, epoch: int, i: int) -> None:
    """clip_grad_norm_, but a non-finite norm raises before the clipping smears NaN over every gradient."""
    params = [p for p in model.parameters() if p.grad is not None]
    if hasattr(nn.utils, "get_total_norm"):  # torch ≥ 2.6: the two halves of clip_grad_norm_ (same numbers)
        norm = nn.utils.get_total_norm([p.grad for p in params])
        if torch.isfinite(norm):
            nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            return
    else:
        norm = nn.utils.clip_grad_norm_(params, max_norm)
        if torch.isfinite(norm):
            return
    bad = _non_finite_layer(model, grads=True)
    raise TrainingDivergedError(f"gradient of {bad} became non-finite at epoch {epoch + 1}, step {i + 1}")


def param_groups(model: nn.Module, lr: float, lr_scale: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one per parameter kind named in `lr_scale` (learning rate
    `lr`·factor, the factor kept as the group's "lr_scale"), one for the rest at `lr`, in a fixed order
    (the rest first, then `PARAMETER_KINDS` order) so that a checkpoint's optimiser state loads back."""
    lr_scale = lr_scale or {}
    named: dict[str, list[nn.Parameter]] = {kind: [] for kind in PARAMETER_KINDS}
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        kind = parameter_kind(name, model)
        (named[kind] if kind in lr_scale else rest).append(p)
    groups = [{"params": rest, "lr": lr, "lr_scale": 1.0}] if rest else []
    groups += [{"params": named[k], "lr": lr * lr_scale[k], "lr_scale": float(lr_scale[k]), "kind": k}
               for k in PARAMETER_KINDS if k in lr_scale and named[k]]
    return groups


def _adam(model: nn.Module, lr: float, lr_scale: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """Adam with PyTorch's defaults over `param_groups`; the fused kernel where this build has it (same
    update, fewer passes)."""
    groups = param_groups(model, lr, lr_scale)
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, lr=lr)


def format_duration(seconds: float) -> str:
    """A duration for a person: "42 s", "3 min 05 s", "2 h 07 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _interactive() -> bool:
    """A live progress bar only on a terminal: in logs and CI it would print every refresh."""
    return sys.stderr.isatty()


def kl_beta(step: int, steps_per_epoch: int, warmup_epochs: float, weight: float = 1.0) -> float:
    """The KL weight β at a global step: linear 0 → `weight` over the warm-up epochs, then `weight`."""
    if warmup_epochs <= 0:
        return weight
    return weight * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


def lr_at(step: int, total_steps: int, lr: float, schedule: str = "constant", decay_steps: int | None = None) -> float:
    """The learning rate of global step `step` (0-based) of a run of `total_steps` steps.

    - "constant": `lr`.
    - "cosine": `lr` until the last `decay_steps` steps (default: all of them), then
      lr·½(1 + cos(π·k/decay_steps)) at the k-th of those (k = 0 …): `lr` where the fall starts, lr/2
      halfway, lr·½(1 − cos(π/decay_steps)) ≈ 0 at the last step (never exactly 0, so every step moves
      the parameters).
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        d = total_steps if decay_steps is None else max(1, min(int(decay_steps), total_steps))
        k = step - (total_steps - d)
        return lr if k <= 0 else lr * 0.5 * (1.0 + math.cos(math.pi * min(k, d) / d))
    raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def length_change_refused(schedule: str, started_epochs: int | None, epochs: int) -> str | None:
    """Why a run started for `started_epochs` epochs cannot resume for `epochs` under `schedule`; None if it
    can (a constant rate, the same length, or a start that did not record its length)."""
    if schedule == "constant" or started_epochs is None or started_epochs == epochs:
        return None
    return (f"epochs={started_epochs!r} (now {epochs!r}; the {schedule} learning-rate schedule is laid out over "
            "the run's epochs and cannot be extended)")


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where the checkpoint before the newest one is kept: `<name>.prev` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def discard_checkpoint(path: str | os.PathLike) -> None:
    """Remove a run's checkpoint and the previous one kept beside it (when the run is finished)."""
    Path(path).unlink(missing_ok=True)
    previous_checkpoint(path).unlink(missing_ok=True)


def _link_over(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` in one atomic rename (a hard link where the file system has them)."""
    tmp = dst.with_name(f".{src.name}.link.tmp")  # matches atomic_write's ".<name>.*.tmp" temp files
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _save_rotating(path: Path, state: dict[str, Any]) -> None:
    """Keep the current checkpoint as `<name>.prev`, then write the new one atomically.

    At every instant `path` holds a whole checkpoint (the old one or the new one), and `.prev` the one
    before it, so a checkpoint damaged after it was written (a truncating copy, a bad disk) still leaves
    a good one to resume from.
    """
    if path.is_file():
        _link_over(path, previous_checkpoint(path))
    save_checkpoint(path, state)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of writes that a killed process left half done (they are never read)."""
    for tmp in glob.glob(os.path.join(glob.escape(str(path.parent)), glob.escape(f".{path.name}.") + "*.tmp")):
        Path(tmp).unlink(missing_ok=True)


def load_newest_checkpoint(path: Path, repair: bool, purpose: str = "resuming") -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint: `path`, else (with a warning that says it is `purpose` from it)
    `<name>.prev`.

    With `repair`, a damaged `path` is replaced by the good previous one, so that the next rotation cannot
    push the damaged file into `.prev`. Raises `CheckpointError` naming both files when neither loads.
    """
    prev = previous_checkpoint(path)
    try:
        return load_checkpoint(path), path
    except CheckpointError as newest_error:
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev)
        except CheckpointError as prev_error:
            raise CheckpointError(f"no usable checkpoint: {newest_error}; and the previous one: {prev_error}") from prev_error
        warnings.warn(f"{newest_error}; {purpose} from the previous checkpoint {prev} (one epoch earlier)",
                      RuntimeWarning, stacklevel=3)
        if repair:
            _link_over(prev, path)
        return state, prev


def _training_data(train: Any, batch_size: int, n_train: int | None):
    """(loader or None, x, y, N, steps per epoch) of `fit`'s `train`: a pair of tensors, or a loader."""
    if isinstance(train, (tuple, list)) and len(train) == 2 and all(isinstance(t, Tensor) for t in train):
        x, y = train
        n = len(x)
        if n == 0 or len(y) != n:
            raise ValueError(f"training set must be non-empty with as many labels as inputs ({n} vs {len(y)})")
        return None, x, y, n, math.ceil(n / batch_size)
    if not hasattr(train, "__iter__"):
        raise TypeError(f"training data must be (inputs, labels) tensors or a DataLoader of such batches, got "
                        f"{type(train).__name__}")
    try:
        steps = len(train)
    except TypeError:
        raise TypeError("a training DataLoader must have a length (batches per epoch): an iterable-style dataset "
                        "needs a sized loader") from None
    if n_train is None:
        try:
            n_train = len(train.dataset)
        except (AttributeError, TypeError):
            raise ValueError("the number of training examples N (which scales the KL) is unknown: pass n_train=") from None
    if not isinstance(n_train, int) or n_train < 1 or steps < 1:
        raise ValueError(f"training set must be non-empty (N = {n_train!r}, {steps} batches per epoch)")
    return train, None, None, n_train, steps


def _tensor_batches(x: Tensor, y: Tensor, order: Tensor, batch_size: int, world: int, rank: int,
                    transform, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor, int]]:
    """This process's (inputs, labels, size of the global batch) of each batch of one epoch, in `order`."""
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if world == 1:
            xb = x[idx]
            yield (transform(xb, gen) if transform is not None else xb), y[idx], len(idx)
        else:
            # This rank's contiguous share of the global batch. The whole batch is augmented, as on one
            # process, so augmentations match a single-process run and the generator stays in step.
            lo, hi = _shard(len(idx), world, rank)
            xb = transform(x[idx], gen)[lo:hi] if transform is not None else x[idx[lo:hi]]
            yield xb, y[idx[lo:hi]], len(idx)


def _loader_batches(loader: Any, transform, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor, int]]:
    """(inputs, labels, batch size) of each batch a user's loader yields in one epoch."""
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(f"a training batch must be (inputs, labels), got {type(batch).__name__}")
        xb, yb = batch[0], batch[1]
        yield (transform(xb, gen) if transform is not None else xb), yb, len(yb)


def _shard(total: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of `total` items (shares differ by at most one)."""
    base, extra = divmod(total, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _restore(state: dict[str, Any], source: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             gen: torch.Generator, config: TrainConfig, n: int, device: torch.device, world: int,
             rank: int) -> tuple[int, list[dict[str, Any]], float]:
    """Load a checkpoint's state into the run; return (epochs done, history, seconds)."""
    try:
        saved = json.loads(state["config"]) if "config" in state else {}
        defaults = TrainConfig()  # a setting an older version did not record had its default
        changed = [f"{k}={saved.get(k, getattr(defaults, k))!r} (now {getattr(config, k)!r})" for k in _RUN_DEFINING
                   if saved.get(k, getattr(defaults, k)) != getattr(config, k)]
        changed += filter(None, [length_change_refused(config.lr_schedule, saved.get("epochs"), config.epochs)])
        if "n_train" in state and int(state["n_train"]) != n:
            changed.append(f"{state['n_train']} training examples (now {n})")
        if changed:
            raise CheckpointError(f"checkpoint {source} was written by a run with other settings: "
                                  f"{', '.join(changed)}; resume with the same settings or start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu().clone())
        epoch = int(state["epoch"])
        history = list(json.loads(state["history"]))
        seconds = float(state["seconds"])
        saved_world = int(state.get("world_size", 1))
        if saved_world == world:
            # the sampling noise continues exactly where the interrupted run left it, on every rank
            cpu_rng = state["torch_rng"] if world == 1 else state["torch_rng_ranks"][rank]
            cuda_rng = state.get("cuda_rng") if world == 1 else (
                state["cuda_rng_ranks"][rank] if "cuda_rng_ranks" in state else None)
            # (clone: a row of the stacked states is a view, which set_rng_state misreads (segfaults))
            torch.set_rng_state(cpu_rng.cpu().clone())
            if cuda_rng is not None and device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng.cpu().clone(), device)
        else:
            warnings.warn(f"checkpoint {source} was written by {saved_world} process(es), this run has {world}: "
                          "training continues, with fresh sampling noise (not bit-identical to an uninterrupted run)",
                          RuntimeWarning, stacklevel=3)
            torch.manual_seed(distributed.stream_seed(config.seed, rank, epoch))
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {source} does not fit this model/run: {exc}") from exc
    return epoch, history, seconds


def fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    config: TrainConfig,
    *,
    test: tuple[Tensor, Tensor] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    metrics: str | os.PathLike | None = None,
    progress: bool = True,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    n_train: int | None = None,
) -> TrainResult:
    """Train `model` in place; return its per-epoch history and the training time in seconds.

    A model without group-sparse layers is trained on the cross-entropy alone (plain pre-training).

    - `train`, `test`: (inputs, labels) tensors; N = len(train inputs) scales the KL. `train` may also be a
      `DataLoader` (any sized iterable of (inputs, labels) batches; its own batch size and order are used,
      `config.batch_size` is not): N is then `n_train`, else the size of its `dataset`. With a loader, no
      checkpoint, resume or data-parallel run (their bit-exact data order needs the tensors).
    - `checkpoint`: path of a checkpoint written atomically after every epoch (the one before is kept as
      `<name>.prev`); with `resume`, training continues from it (model, optimiser, epoch, data order, random
      state, KL warm-up), bit for bit as if never interrupted. If it cannot be read, the previous one is used,
      with a warning.
    - `metrics`: a file that receives one JSON line per epoch (rewritten from the checkpoint on resume).
    - `transform(batch, generator)`: batch augmentation (e.g. random crops), seeded by the run; it must
      draw its randomness from the generator it is given.
    - `on_epoch(row)`: called after each epoch, on every process.

    Data-parallel: run one process per device under torchrun (WORLD_SIZE > 1 in the environment); `fit`
    joins the process group if the caller has not (`distributed.init_from_env`: gloo for a model on the
    CPU, nccl on CUDA), wraps the model in DistributedDataParallel and splits every global batch of
    `config.batch_size` examples over the processes. All processes need the same data, config and paths
    (on resume, each reads the checkpoint); only rank 0 writes files and prints. Batch-norm statistics
    are per process, and rank 0's are kept.
    """
    config.validate()
    loader, x, y, n, steps_per_epoch = _training_data(train, config.batch_size, n_train)
    if loader is not None and (checkpoint is not None or resume):
        raise ValueError("checkpoints and resuming need the training set as (inputs, labels) tensors, not a DataLoader "
                         "(a resumed run continues the same data order bit for bit)")
    layers = group_layers(model)  # none: a plain model (pre-training), the loss is the cross-entropy alone
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()  # ~540 page faults per LeNet-300-100 step otherwise (train/memory.py)
    if resume and checkpoint is None:
        raise ValueError("resume needs a checkpoint path")
    world = distributed.init_from_env(device)
    if loader is not None and world > 1:
        raise ValueError("data-parallel training needs the training set as (inputs, labels) tensors, not a DataLoader")
    rank = distributed.rank()
    main = rank == 0
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch size {config.batch_size} is the global batch and must be divisible by the "
                         f"number of processes ({world}); choose a multiple of {world}")
    # Sampling noise: the seed on a single process; independent seeded streams on the ranks of a
    # data-parallel run (the same stream everywhere would give example k of every rank's share the same noise).
    torch.manual_seed(distributed.stream_seed(config.seed, rank))
    gen = torch.Generator().manual_seed(config.seed)  # data order and augmentation: the same on every rank
    optimizer = _adam(model, config.lr, config.lr_scale)
    total_steps = steps_per_epoch * config.epochs
    decay_steps = None if config.lr_decay_epochs is None else round(config.lr_decay_epochs * steps_per_epoch)
    result = TrainResult()
    start_epoch = 0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    metrics_file = Path(metrics) if metrics is not None else None
    if resume:
        assert checkpoint is not None
        if main:
            _remove_stale_temps(checkpoint)
        state, source = load_newest_checkpoint(checkpoint, repair=main)
        start_epoch, result.history, result.seconds = _restore(
            state, source, model, optimizer, gen, config, n, device, world, rank)
        del state
        if metrics_file is not None and main:
            # lines of epochs after the checkpoint (written before a kill) would be written again: drop them
            _remove_stale_temps(metrics_file)
            atomic_write(metrics_file, "".join(json.dumps(r) + "\n" for r in result.history).encode())
    elif metrics_file is not None and main and metrics_file.exists():
        metrics_file.unlink()

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net.train()
    with fuse_weight_kl(model):  # each layer's weight KL computed in its forward (nn/base.py)
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            if loader is None:
                batches = _tensor_batches(x, y, torch.randperm(n, generator=gen), config.batch_size, world, rank,
                                          transform, gen)
            else:
                batches = _loader_batches(loader, transform, gen)
            sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "wrong": 0}
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and main and _interactive()),
                       leave=False, dynamic_ncols=True)  # the per-epoch summary line is printed either way
            for i, (xb, yb, count) in zip(bar, batches, strict=False):
                step = epoch * steps_per_epoch + i
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                out = net(xb)
                kl = kl_divergence(model) if layers else out.new_zeros(())
                beta = kl_beta(step, steps_per_epoch, config.warmup_epochs, config.kl_weight)
                if world == 1:
                    nll = F.cross_entropy(out, yb)
                    loss = nll + beta * kl / n
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(_divergence(
                            model, xb, f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}", config.lr))
                else:
                    # DDP averages gradients over the W ranks. Cross-entropy: each rank contributes its sum over
                    # its share times W/B (B = this global batch, which may be short at the end of an epoch);
                    # the average is the mean over the global batch, as on one process, whatever the shares' sizes.
                    # KL: every rank adds the same β·KL/N (N the GLOBAL training-set size), so its gradient is
                    # W·(∇KL/N)/W = ∇KL/N after averaging: counted once, as on one process.
                    nll_sum = F.cross_entropy(out, yb, reduction="sum")
                    loss = nll_sum * (world / count) + beta * kl / n
                    finite = bool(torch.isfinite(loss))
                    flags = [0.0] * world
                    flags[rank] = 0.0 if finite else 1.0
                    flags = distributed.all_reduce(flags, device)  # every rank stops together, none hangs in backward
                    if any(flags):
                        ranks = ", ".join(str(r) for r, f in enumerate(flags) if f)
                        raise TrainingDivergedError(_divergence(
                            model, xb, f"loss became non-finite on rank {ranks} at epoch {epoch + 1}, step {i + 1}",
                            config.lr))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.check_grads:
                    bad = _non_finite_layer(model, grads=True)
                    if bad is not None:
                        raise TrainingDivergedError(f"gradient of {bad} became non-finite at epoch {epoch + 1}, step {i + 1}")
                if config.grad_clip is not None:
                    _clip_gradients(model, config.grad_clip, epoch, i)
                # (otherwise a non-finite gradient makes the next loss non-finite, which names the parameter)
                if config.lr_schedule != "constant":
                    lr = lr_at(step, total_steps, config.lr, config.lr_schedule, decay_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                optimizer.step()
                for layer in layers.values():
                    layer.clamp_variances()
                if world == 1:
                    sums["loss"] += loss.item() * count
                    sums["nll"] += nll.item() * count
                else:
                    local_nll = nll_sum.item()
                    sums["loss"] += local_nll + beta * kl.item() / n * len(yb)
                    sums["nll"] += local_nll
                sums["kl"] = kl.item()
                sums["wrong"] += int((out.detach().argmax(1) != yb).sum())
                if progress and main and i % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", beta=f"{beta:.2f}")
            bar.close()
            if world > 1:
                distributed.broadcast_buffers(model)  # identical models everywhere (batch-norm statistics: rank 0's)
                total = distributed.all_reduce([sums["loss"], sums["nll"], sums["wrong"]], device)
                sums["loss"], sums["nll"], sums["wrong"] = total[0], total[1], int(round(total[2]))
            bad = _non_finite_layer(model, grads=False)
            if bad is not None:
                raise TrainingDivergedError(f"parameter {bad} became non-finite during epoch {epoch + 1}")
            seconds = time.perf_counter() - t0
            result.seconds += seconds
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": sums["loss"] / n,
                "nll": sums["nll"] / n,
                "kl": sums["kl"],
                "beta": kl_beta((epoch + 1) * steps_per_epoch - 1, steps_per_epoch, config.warmup_epochs,
                                config.kl_weight),
                "train_error": 100.0 * sums["wrong"] / n,
                "seconds": seconds,
            }
            if config.lr_schedule != "constant":  # the learning rate of the epoch's last step
                row["lr"] = lr_at((epoch + 1) * steps_per_epoch - 1, total_steps, config.lr, config.lr_schedule,
                                  decay_steps)
            if test is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
                if world == 1:
                    row["test_error"] = evaluate(model, *test)
                else:  # each rank counts the errors on its share of the test set
                    lo, hi = _shard(len(test[0]), world, rank)
                    wrong = distributed.all_reduce([_count_wrong(model, test[0][lo:hi], test[1][lo:hi])], device)[0]
                    row["test_error"] = 100.0 * round(wrong) / max(len(test[0]), 1)
            if layers:
                row["groups_kept"] = {name: int((m.log_alpha() < m.default_threshold).sum()) for name, m in layers.items()}
            result.history.append(row)
            if metrics_file is not None and main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if progress and main:
                msg = f"epoch {epoch + 1}/{config.epochs}  loss {row['loss']:.4f}  train err {row['train_error']:.2f}%"
                if "test_error" in row:
                    msg += f"  test err {row['test_error']:.2f}%"
                left = config.epochs - (epoch + 1)
                if left:  # the time estimate: this run's mean epoch so far
                    msg += f"  ~{format_duration(left * result.seconds / (epoch + 1))} left"
                tqdm.write(msg)
            if on_epoch is not None:
                on_epoch(row)
            if checkpoint is not None:
                cpu_rng = torch.get_rng_state()
                cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                ranks_rng = distributed.all_gather_object((cpu_rng, cuda_rng)) if world > 1 else None
                if main:
                    saved: dict[str, Any] = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "generator": gen.get_state(),
                        "torch_rng": cpu_rng,
                        "epoch": epoch + 1,
                        "history": json.dumps(result.history),
                        "seconds": result.seconds,
                        "config": json.dumps(asdict(config)),
                        "n_train": n,
                        "world_size": world,
                    }
                    if cuda_rng is not None:
                        saved["cuda_rng"] = cuda_rng
                    if ranks_rng is not None:
                        saved["torch_rng_ranks"] = torch.stack([r[0] for r in ranks_rng])
                        if cuda_rng is not None:
                            saved["cuda_rng_ranks"] = torch.stack([r[1] for r in ranks_rng])
                    _save_rotating(checkpoint, saved)
    if world > 1:
        distributed.barrier()  # when fit returns on any rank, rank 0's files are complete (a resume may follow)
    model.eval()
    return result
