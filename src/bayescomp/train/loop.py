"""fit(): maximise the ELBO of a Bayesian model on in-memory tensors.

Per step: loss = mean cross-entropy + β·KL/N, with N the size of the training set (the negative
ELBO divided by N; one local-reparameterisation sample), Adam, then the layers' variance clamps.
β ramps linearly from 0 to 1 over `warmup_epochs` (KL warm-up), then stays at 1.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..convert import group_layers, kl_divergence
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class TrainingDivergedError(FloatingPointError):
    """The loss or a parameter became NaN/inf; the message names the step and the layer."""


@dataclass
class TrainConfig:
    """Settings of one training run (all plain values, stored in checkpoints and reports)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 0.0
    seed: int = 0
    grad_clip: float | None = None
    eval_every: int = 1

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warm-up epochs must be ≥ 0, got {self.warmup_epochs}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"gradient clip must be positive, got {self.grad_clip}")


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error in % of `model` in evaluation mode (restores the previous mode)."""
    was = model.training
    model.eval()
    wrong = 0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(device))
        wrong += int((out.argmax(1).cpu() != y[i : i + batch_size]).sum())
    model.train(was)
    return 100.0 * wrong / max(len(x), 1)


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


def _adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with PyTorch's defaults; the fused kernel where this build has it (same update, fewer passes)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def kl_beta(step: int, steps_per_epoch: int, warmup_epochs: float) -> float:
    """The KL weight β at a global step: linear 0 → 1 over the warm-up epochs."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


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
) -> TrainResult:
    """Train `model` in place; return its per-epoch history and the training time in seconds.

    A model without group-sparse layers is trained on the cross-entropy alone (plain pre-training).

    - `train`, `test`: (inputs, labels) tensors; N = len(train inputs) scales the KL.
    - `checkpoint`: path of a checkpoint written atomically after every epoch; with `resume`, training
      continues from it (model, optimiser, epoch, data order and random state).
    - `metrics`: a file that receives one JSON line per epoch.
    - `transform(batch, generator)`: batch augmentation (e.g. random crops), seeded by the run.
    """
    config.validate()
    x, y = train
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"training set must be non-empty with as many labels as inputs ({n} vs {len(y)})")
    layers = group_layers(model)  # none: a plain model (pre-training), the loss is the cross-entropy alone
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    optimizer = _adam(model, config.lr)
    steps_per_epoch = math.ceil(n / config.batch_size)
    result = TrainResult()
    start_epoch = 0
    if resume:
        if checkpoint is None:
            raise ValueError("resume needs a checkpoint path")
        state = load_checkpoint(checkpoint, map_location=device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start_epoch = int(state["epoch"])
            result.history = list(json.loads(state["history"]))
            result.seconds = float(state["seconds"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint} does not fit this model/run: {exc}") from exc
    metrics_file = Path(metrics) if metrics is not None else None
    if metrics_file is not None and not resume and metrics_file.exists():
        metrics_file.unlink()

    model.train()
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "wrong": 0}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for i in bar:
            step = epoch * steps_per_epoch + i
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            xb, yb = x[idx], y[idx]
            if transform is not None:
                xb = transform(xb, gen)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = model(xb)
            nll = F.cross_entropy(out, yb)
            kl = kl_divergence(model) if layers else nll.new_zeros(())
            beta = kl_beta(step, steps_per_epoch, config.warmup_epochs)
            loss = nll + beta * kl / n
            if not torch.isfinite(loss):
                bad = _non_finite_layer(model, grads=False)
                where = f"; parameter {bad} is non-finite" if bad else "; all parameters are finite (the data or the loss overflowed)"
                raise TrainingDivergedError(f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}{where}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if not torch.isfinite(norm):
                    bad = _non_finite_layer(model, grads=True)
                    raise TrainingDivergedError(f"gradient of {bad} became non-finite at epoch {epoch + 1}, step {i + 1}")
            # (without clipping, a non-finite gradient makes the next loss non-finite, which names the parameter)
            optimizer.step()
            for layer in layers.values():
                layer.clamp_variances()
            sums["loss"] += loss.item() * len(idx)
            sums["nll"] += nll.item() * len(idx)
            sums["kl"] = kl.item()
            sums["wrong"] += int((out.detach().argmax(1) != yb).sum())
            if progress and i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", beta=f"{beta:.2f}")
        bar.close()
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
            "beta": kl_beta((epoch + 1) * steps_per_epoch - 1, steps_per_epoch, config.warmup_epochs),
            "train_error": 100.0 * sums["wrong"] / n,
            "seconds": seconds,
        }
        if test is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            row["test_error"] = evaluate(model, *test)
        if layers:
            row["groups_kept"] = {name: int((m.log_alpha() < m.default_threshold).sum()) for name, m in layers.items()}
        result.history.append(row)
        if metrics_file is not None:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        if progress:
            msg = f"epoch {epoch + 1}/{config.epochs}  loss {row['loss']:.4f}  train err {row['train_error']:.2f}%"
            if "test_error" in row:
                msg += f"  test err {row['test_error']:.2f}%"
            tqdm.write(msg)
        if on_epoch is not None:
            on_epoch(row)
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "history": json.dumps(result.history),
                "seconds": result.seconds,
                "config": json.dumps(asdict(config)),
            })
    model.eval()
    return result
