"""The compression decision as plain data: which groups to keep, and each layer's kept inputs and outputs.

1. `group_masks(model, thresholds)`: keep group i of a layer while its score log α_i < threshold.
2. `compress.propagate(model, keeps)`: the `LayerMask` of every weighted layer, from the analysis of
   the traced network (`analysis.py`): which inputs it reads, which outputs it keeps, and the constant
   a removed input carries (folded into the shrunk layer's bias, or a channel of ones).

Both are pure functions of the trained posterior, so a user can inspect and edit the keeps before
anything is cut. `resolve_thresholds` is where a threshold argument becomes per-layer numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer


class PruneError(ValueError):
    """Thresholds or masks that leave a layer with nothing, or that do not fit the model."""


@dataclass
class LayerMask:
    """The compression decision for one weighted layer (plain data; edit it freely)."""

    name: str
    in_mask: Tensor  # bool (in_features or in_channels,): inputs the shrunk layer keeps
    out_mask: Tensor  # bool (out_features or out_channels,): outputs the shrunk layer keeps
    in_const: Tensor  # float (same as in_mask): the constant a removed input carries (NaN = none)
    group_keep: Tensor | None = None  # bool (n_groups,): the layer's own groups kept (None: plain layer)
    threshold: float | None = None


def on_device(lm: LayerMask, module: nn.Module) -> LayerMask:
    """The decision (kept on the CPU) with its tensors on the layer's device, for the surgery helpers."""
    device = next(module.parameters()).device
    return dataclasses.replace(
        lm, in_mask=lm.in_mask.to(device), out_mask=lm.out_mask.to(device), in_const=lm.in_const.to(device),
        group_keep=None if lm.group_keep is None else lm.group_keep.to(device),
    )


def resolve_thresholds(model: nn.Module, thresholds: float | Mapping[str, float] | None) -> dict[str, float]:
    """Per-layer thresholds from None (the priors' defaults), one float, a {name: float} dict (the other layers:
    their priors' defaults) or a threshold rule: `compress.thresholds.choose_thresholds`, the one place a
    threshold argument becomes numbers."""
    from .thresholds import choose_thresholds  # here: thresholds imports PruneError from this module

    return choose_thresholds(model, thresholds)


@torch.no_grad()
def group_masks(model: nn.Module, thresholds: float | Mapping[str, float] | None = None) -> dict[str, Tensor]:
    """Keep-mask over each group-sparse layer's own groups: log α_i < threshold, and the group not switched
    off by its `group_mask` (the masked model computes without it, so the compressed one must too)."""
    return keeps_below(model, resolve_thresholds(model, thresholds))


@torch.no_grad()
def keeps_below(model: nn.Module, resolved: Mapping[str, float]) -> dict[str, Tensor]:
    """`group_masks` at thresholds already resolved (`resolve_thresholds`), so a caller resolves them once."""
    return {
        name: ((m.log_alpha().detach() < resolved[name]) & m.group_mask).cpu()
        for name, m in model.named_modules()
        if isinstance(m, GroupSparseLayer)
    }


def check_keeps(model: nn.Module, keeps: Mapping[str, Tensor], thresholds: Mapping[str, float] | None = None) -> None:
    """Raise `PruneError` unless `keeps` holds a bool mask of the right size for every group-sparse layer of
    `model`, keeping some group of each fully connected one (its groups are its inputs; a convolution whose
    groups all go is a constant, which a residual branch may be)."""
    for name, m in model.named_modules():
        if not isinstance(m, GroupSparseLayer):
            continue
        if name not in keeps:
            raise PruneError(f"no keep-mask given for layer {name}")
        k = keeps[name]
        if not isinstance(k, Tensor) or k.dtype != torch.bool or tuple(k.shape) != (m.n_groups,):
            got = f"{k.dtype} {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
            raise PruneError(f"{name}: keep-mask must be a bool tensor of shape ({m.n_groups},), got {got}")
        if not bool(k.any()) and hasattr(m, "in_features"):
            t = "" if thresholds is None or name not in thresholds else f" at threshold {thresholds[name]}"
            la = m.log_alpha().detach()
            raise PruneError(
                f"pruning removes every group of layer {name}{t} (its log α ranges from {la.min().item():.2f} "
                f"to {la.max().item():.2f}); raise the threshold"
            )


@torch.no_grad()
def apply_masks(model: nn.Module, keeps: Mapping[str, Tensor]) -> None:
    """Switch off the pruned groups of a Bayesian model in place (its `group_mask` buffers).

    The masked model at evaluation is what the shrunk model must reproduce.
    """
    for name, m in model.named_modules():
        if isinstance(m, GroupSparseLayer) and name in keeps:
            m.group_mask.copy_(keeps[name].to(m.group_mask.device))
