"""Which groups to keep, and what that means for every layer's inputs and outputs.

Two steps, both pure functions of the trained posterior, so a user can inspect and edit the result
before anything is cut:

1. `group_masks(model, thresholds)`: keep group i of a layer while its score log α_i < threshold.
2. `propagate(model, keeps)`: the keep-masks over every weighted layer's inputs and outputs.

Propagation is exact: it removes a feature only where the masked network's output cannot change.

* Forward pass, a *constant* per feature (NaN where the feature varies with the input): a pruned
  conv channel is the constant 0 (its gate covers its bias); batch norm maps a constant c to
  γ(c − mean)/√(var + eps) + β; element-wise activations map c to f(c); pooling keeps it.
* A weighted layer drops every input that is a constant c: if c = 0 it contributes nothing;
  otherwise `shrink` folds its contribution into the layer — into the bias (Σ W[:, j]·c) for a
  Linear layer or an unpadded convolution, and for a zero-padded convolution, whose border taps see
  the padding's zeros rather than c, into one extra input channel of ones (`AppendOnes`) with kernel
  Σ_j c_j·W[:, j], so that even the border is exact.
* Backward pass, *needed* features: an output of layer l is kept only if a later layer reads it;
  a pruned input of layer l+1 thus removes the matching output of layer l (through flatten, batch
  norm, activations and pooling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer
from .chain import CHANNEL_AFFINE, WEIGHTED, chain, in_features, is_linear, out_features


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


def resolve_thresholds(model: nn.Module, thresholds: float | Mapping[str, float] | None) -> dict[str, float]:
    """Per-layer thresholds from None (the priors' defaults), one float, or a {name: float} dict."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GroupSparseLayer)}
    if not layers:
        raise PruneError("the model has no group-sparse layer; call bayescomp.bayesianize first")
    out = {n: float(m.default_threshold) for n, m in layers.items()}
    if thresholds is None:
        return out
    if isinstance(thresholds, Mapping):
        unknown = sorted(set(thresholds) - set(layers))
        if unknown:
            raise PruneError(f"thresholds name unknown layers {unknown}; group-sparse layers are {list(layers)}")
        items = dict(thresholds)
    else:
        items = {n: thresholds for n in layers}
    for n, t in items.items():
        t = float(t)
        if math.isnan(t):
            raise PruneError(f"threshold for {n} is NaN")
        out[n] = t
    return out


@torch.no_grad()
def group_masks(model: nn.Module, thresholds: float | Mapping[str, float] | None = None) -> dict[str, Tensor]:
    """Keep-mask over each group-sparse layer's own groups: log α_i < threshold, and the group not switched
    off by its `group_mask` (the masked model computes without it, so the compressed one must too)."""
    resolved = resolve_thresholds(model, thresholds)
    return {
        name: ((m.log_alpha().detach() < resolved[name]) & m.group_mask).cpu()
        for name, m in model.named_modules()
        if isinstance(m, GroupSparseLayer)
    }


def _module_const(module: nn.Module, const: Tensor) -> Tensor:
    """Carry per-channel constants (NaN = varying) through a non-weighted module at evaluation."""
    if isinstance(module, CHANNEL_AFFINE):
        if not module.track_running_stats or module.running_mean is None:
            return torch.full_like(const, math.nan)  # batch statistics: nothing is constant
        scale = 1.0 / torch.sqrt(module.running_var.detach().cpu().double() + module.eps)
        out = (const - module.running_mean.detach().cpu().double()) * scale
        if module.affine:
            out = out * module.weight.detach().cpu().double() + module.bias.detach().cpu().double()
        return out
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
        padded = any(p > 0 for p in torch.nn.modules.utils._pair(module.padding))
        if padded and module.count_include_pad:
            return torch.where(const == 0, const, torch.full_like(const, math.nan))
        return const
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d,
                           nn.Dropout2d, nn.Identity)):
        return const
    varying = torch.isnan(const)
    out = module(torch.where(varying, torch.zeros_like(const), const).float()).double()
    return torch.where(varying, const, out)


def _layer_in_const(module: nn.Module, name: str, const: Tensor | None, pending_flatten: bool) -> Tensor:
    """The constants over a weighted layer's inputs, expanding a flatten in front of a Linear layer."""
    n_in = in_features(module)
    if const is None:
        return torch.full((n_in,), math.nan, dtype=torch.float64)
    if pending_flatten:
        if not is_linear(module) or n_in % const.numel():
            raise PruneError(f"{name}: cannot map {const.numel()} flattened channels onto {n_in} inputs")
        return const.repeat_interleave(n_in // const.numel())
    if const.numel() != n_in:
        raise PruneError(f"{name}: expects {n_in} inputs but the previous layer gives {const.numel()}")
    return const


@torch.no_grad()
def propagate(model: nn.Module, keeps: Mapping[str, Tensor], thresholds: Mapping[str, float] | None = None) -> dict[str, LayerMask]:
    """Input and output keep-masks of every weighted layer from the group keep-masks (see module doc)."""
    layers = chain(model)
    weighted = [(n, m) for n, m in layers if isinstance(m, WEIGHTED)]
    for name, m in weighted:
        if isinstance(m, GroupSparseLayer):
            if name not in keeps:
                raise PruneError(f"no keep-mask given for layer {name}")
            k = keeps[name]
            if k.dtype != torch.bool or k.shape != (m.n_groups,):
                raise PruneError(f"{name}: keep-mask must be a bool tensor of shape ({m.n_groups},), got {k.dtype} {tuple(k.shape)}")
            if not bool(k.any()):
                t = "" if thresholds is None else f" at threshold {thresholds.get(name)}"
                la = m.log_alpha().detach()
                raise PruneError(
                    f"pruning removes every group of layer {name}{t} (its log α ranges from {la.min().item():.2f} "
                    f"to {la.max().item():.2f}); raise the threshold"
                )

    # forward pass: constants per feature; input masks of the weighted layers
    result: dict[str, LayerMask] = {}
    const: Tensor | None = None
    pending_flatten = False
    for name, m in layers:
        if isinstance(m, WEIGHTED):
            in_const = _layer_in_const(m, name, const, pending_flatten)
            pending_flatten = False
            foldable = ~torch.isnan(in_const)
            in_mask = ~foldable
            own = keeps.get(name) if isinstance(m, GroupSparseLayer) else None
            if own is not None and is_linear(m):
                in_mask &= own
            n_out = out_features(m)
            if own is not None and not is_linear(m):
                const = torch.where(own, torch.full((n_out,), math.nan, dtype=torch.float64), torch.zeros(n_out, dtype=torch.float64))
            else:
                const = torch.full((n_out,), math.nan, dtype=torch.float64)
            fold = torch.where(foldable, in_const, torch.full_like(in_const, math.nan))
            result[name] = LayerMask(name, in_mask, torch.ones(n_out, dtype=torch.bool), fold, own,
                                     None if thresholds is None or own is None else thresholds.get(name))
        elif isinstance(m, nn.Flatten):
            pending_flatten = const is not None
        elif const is not None:
            const = _module_const(m, const)

    # backward pass: outputs are kept only where the next weighted layer reads them
    needed: Tensor | None = None  # over the features after the current position; None: all needed
    for name, m in reversed(layers):
        if isinstance(m, WEIGHTED):
            lm = result[name]
            if needed is not None:
                if needed.numel() != lm.out_mask.numel():
                    if needed.numel() % lm.out_mask.numel():
                        raise PruneError(f"{name}: cannot map {needed.numel()} features onto {lm.out_mask.numel()} outputs")
                    needed = needed.view(lm.out_mask.numel(), -1).any(dim=1)  # through a flatten
                lm.out_mask = needed.clone()
            if not bool(lm.out_mask.any()):
                raise PruneError(f"pruning removes every output of layer {name}: the layers after it read none of them")
            if not bool(lm.in_mask.any()):
                raise PruneError(f"pruning removes every input of layer {name}")
            needed = lm.in_mask.clone()
    return result


def compression_masks(model: nn.Module, thresholds: float | Mapping[str, float] | None = None) -> dict[str, LayerMask]:
    """`group_masks` then `propagate`: the full decision for a model at the given thresholds."""
    resolved = resolve_thresholds(model, thresholds)
    return propagate(model, group_masks(model, resolved), resolved)


@torch.no_grad()
def apply_masks(model: nn.Module, keeps: Mapping[str, Tensor]) -> None:
    """Switch off the pruned groups of a Bayesian model in place (its `group_mask` buffers).

    The masked model at evaluation is what the shrunk model must reproduce.
    """
    for name, m in model.named_modules():
        if isinstance(m, GroupSparseLayer) and name in keeps:
            m.group_mask.copy_(keeps[name].to(m.group_mask.device))
