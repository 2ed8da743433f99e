"""Where a diverging run went wrong: the non-finite parameter, layer output or KL term, named in one line."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..convert import group_layers


class TrainingDivergedError(FloatingPointError):
    """The loss or a parameter became NaN/inf; the message names the step and the layer."""



def non_finite_layer(model: nn.Module, grads: bool) -> str | None:
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is not None and not torch.isfinite(t).all():
            return name
    return None


def non_finite_output(model: nn.Module, xb: Tensor) -> str | None:
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


def divergence(model: nn.Module, xb: Tensor, what: str, lr: float) -> str:
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
    layer = non_finite_output(model, xb)
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


def clip_gradients(model: nn.Module, max_norm: float, epoch: int, i: int) -> None:
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
    bad = non_finite_layer(model, grads=True)
    raise TrainingDivergedError(f"gradient of {bad} became non-finite at epoch {epoch + 1}, step {i + 1}")

