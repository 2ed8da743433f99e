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

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base import atomic_write
from ..convert import group_layers, kl_divergence
from ..nn.base import PARAMETER_KINDS, parameter_kind
from ..nn.fusion import fuse_weight_kl
from ..nn.zdraw import draw_z
from . import distributed
from .checkpoint import CheckpointError
from .config import RUN_DEFINING, TrainConfig, kl_beta, length_change_refused, lr_at
from .diverge import TrainingDivergedError, clip_gradients, divergence, non_finite_layer
from .memory import keep_freed_memory
from .rotation import load_newest_checkpoint, remove_stale_temps, save_rotating


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
            lo, hi = shard(len(idx), world, rank)
            xb = transform(x[idx], gen)[lo:hi] if transform is not None else x[idx[lo:hi]]
            yield xb, y[idx[lo:hi]], len(idx)


def _loader_batches(loader: Any, transform, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor, int]]:
    """(inputs, labels, batch size) of each batch a user's loader yields in one epoch."""
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(f"a training batch must be (inputs, labels), got {type(batch).__name__}")
        xb, yb = batch[0], batch[1]
        yield (transform(xb, gen) if transform is not None else xb), yb, len(yb)


def shard(total: int, world: int, rank: int) -> tuple[int, int]:
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
        changed = [f"{k}={saved.get(k, getattr(defaults, k))!r} (now {getattr(config, k)!r})" for k in RUN_DEFINING
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
            remove_stale_temps(checkpoint)
        state, source = load_newest_checkpoint(checkpoint, repair=main)
        start_epoch, result.history, result.seconds = _restore(
            state, source, model, optimizer, gen, config, n, device, world, rank)
        del state
        if metrics_file is not None and main:
            # lines of epochs after the checkpoint (written before a kill) would be written again: drop them
            remove_stale_temps(metrics_file)
            atomic_write(metrics_file, "".join(json.dumps(r) + "\n" for r in result.history).encode())
    elif metrics_file is not None and main and metrics_file.exists():
        metrics_file.unlink()

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net.train(config.sample)  # sample False: the posterior means, as at evaluation (`TrainConfig.sample`)
    # each layer's weight KL computed in its forward (nn/base.py); z drawn per example or per batch
    with fuse_weight_kl(model), draw_z(model, config.z_draw):
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
                kl = kl_divergence(model) if layers and config.sample else out.new_zeros(())
                beta = kl_beta(step, steps_per_epoch, config.warmup_epochs, config.kl_weight)
                if world == 1:
                    nll = F.cross_entropy(out, yb)
                    loss = nll + beta * kl / n
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(divergence(
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
                        raise TrainingDivergedError(divergence(
                            model, xb, f"loss became non-finite on rank {ranks} at epoch {epoch + 1}, step {i + 1}",
                            config.lr))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.check_grads:
                    bad = non_finite_layer(model, grads=True)
                    if bad is not None:
                        raise TrainingDivergedError(f"gradient of {bad} became non-finite at epoch {epoch + 1}, step {i + 1}")
                if config.grad_clip is not None:
                    clip_gradients(model, config.grad_clip, epoch, i)
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
            bad = non_finite_layer(model, grads=False)
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
                    lo, hi = shard(len(test[0]), world, rank)
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
                    save_rotating(checkpoint, saved)
    if world > 1:
        distributed.barrier()  # when fit returns on any rank, rank 0's files are complete (a resume may follow)
    model.eval()
    return result
