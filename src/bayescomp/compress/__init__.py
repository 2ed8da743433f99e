"""compress(): masks → precision → shrink → rates, from a trained Bayesian model.

>>> result = compress(bmodel, thresholds={"fc1": -2.8, "fc2": -3.0, "fc3": -5.0})   # doctest: +SKIP
>>> result.model        # plain nn.Sequential, pruned units removed, weights rounded
>>> result.report       # architecture, bits, weights kept, cr_architecture, cr_fast, per-layer details
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..nn import GroupSparseLayer
from .chain import WEIGHTED, chain, is_linear
from .graph import Realign, graph_compress, graph_shrinker
from .masks import (
    LayerMask,
    PruneError,
    apply_masks,
    compression_masks,
    group_masks,
    propagate,
    resolve_thresholds,
)
from .precision import exponent_bits, layer_bits, round_to_bits, weight_bits
from .rates import rates
from .shrink import AppendOnes, Select, effective_params, shrink
from .summary import summarize


@dataclass
class CompressedModel:
    """A plain pruned model plus the decision that made it and the figures that describe it."""

    model: nn.Sequential
    report: dict[str, Any]
    masks: dict[str, LayerMask] = field(repr=False)
    bits: dict[str, int]


def kept_weights(module: nn.Module, lm: LayerMask) -> torch.Tensor:
    """Boolean mask over a layer's weight of the entries the shrunk layer stores with gate on.

    `lm` is a chain's decision (`compression_masks`) or a graph's (`graph_compress(...).masks`); a
    depthwise convolution's kernel has one input per output channel, so only its outputs are masked.
    """
    w = module.posterior_mean() if isinstance(module, GroupSparseLayer) else module.weight
    keep = lm.out_mask.view(-1, *([1] * (w.dim() - 1)))
    if getattr(module, "groups", 1) == 1:
        keep = keep & lm.in_mask.view(1, -1, *([1] * (w.dim() - 2)))
    if lm.group_keep is not None and not is_linear(module):
        keep = keep & lm.group_keep.view(-1, *([1] * (w.dim() - 1)))
    return keep.expand_as(w)


@torch.no_grad()
def compress(
    model: nn.Module,
    thresholds: float | Mapping[str, float] | None = None,
    *,
    masks: Mapping[str, LayerMask] | None = None,
    keeps: Mapping[str, torch.Tensor] | None = None,
    round_weights: bool = True,
    bits_reduce: str = "mean",
    variance_scale: float = 1.0,
    bit_accounting: str = "code",
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> CompressedModel:
    """Prune, quantise and shrink a trained Bayesian model.

    - `thresholds`: None (each prior's default), a float for every layer, or {layer name: float};
      group i of a layer is kept while its log α_i is below the layer's threshold.
    - `masks`: a decision from `compression_masks` (possibly edited) to use instead of thresholds.
    - `keeps`: {layer name: bool mask over its groups} (`group_masks`), the groups to keep instead of
      those the thresholds keep (any model; e.g. a decision taken before fine-tuning). The report still
      records `thresholds`.
    - `round_weights`: round each layer's weights to its inferred precision (else keep float32).
    - `bits_reduce`, `variance_scale`: see `precision.layer_bits`; `bit_accounting`: see `rates`.
    - `example_input`: a batch the model accepts. A model that is not an `nn.Sequential` chain
      (residual sums, concatenations, ...) is then compressed through its torch.fx graph by
      `graph.graph_compress`, and `.model` is a `torch.fx.GraphModule`.

    The input model is not modified.
    """
    if example_input is not None and not isinstance(model, nn.Sequential):
        if masks is not None:
            raise ValueError("masks= describes a chain's decision; for a graph model pass keeps=")
        return graph_compress(model, thresholds, keeps=keeps, example_input=example_input, round_weights=round_weights,
                              bits_reduce=bits_reduce, variance_scale=variance_scale, bit_accounting=bit_accounting)
    was_training = model.training
    model.eval()
    try:
        resolved = resolve_thresholds(model, thresholds)
        if masks is not None and keeps is not None:
            raise ValueError("give masks= or keeps=, not both")
        if masks is not None:
            decision = dict(masks)
        elif keeps is not None:
            decision = propagate(model, keeps, resolved)
        else:
            decision = compression_masks(model, resolved)
        layers = chain(model)
        # precision per group-sparse layer, from the kept weights' marginal variances
        bits: dict[str, int] = {}
        max_abs = 0.0
        for name, m in layers:
            if isinstance(m, GroupSparseLayer):
                keep = kept_weights(m, decision[name])
                if not bool(keep.any()):
                    raise PruneError(f"layer {name} keeps no weight")
                bits[name] = layer_bits(m.posterior_variance()[keep], bits_reduce, variance_scale)
                weight, _ = effective_params(m, decision[name])
                max_abs = max(max_abs, weight[keep].abs().max().item())
        e_bits = exponent_bits(max_abs)
        plain = shrink(model, decision, bits if round_weights else None)
        report = _report(layers, decision, bits, e_bits, plain, resolved, bit_accounting)
        report.update(rounded=round_weights, bits_reduce=bits_reduce, variance_scale=variance_scale)
        return CompressedModel(plain, report, decision, bits)
    finally:
        model.train(was_training)


def _report(layers, decision, bits, e_bits, plain, thresholds, accounting) -> dict[str, Any]:
    shrunk_weighted = [m for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    originals = [(n, m) for n, m in layers if isinstance(m, WEIGHTED)]
    rows = [(name, m, decision[name], new.weight.numel())
            for (name, m), new in zip(originals, shrunk_weighted, strict=True)]
    return summarize(rows, bits, e_bits, thresholds, accounting)


__all__ = [
    "AppendOnes",
    "CompressedModel",
    "LayerMask",
    "PruneError",
    "Realign",
    "Select",
    "apply_masks",
    "compress",
    "compression_masks",
    "exponent_bits",
    "graph_compress",
    "graph_shrinker",
    "group_masks",
    "kept_weights",
    "layer_bits",
    "propagate",
    "rates",
    "round_to_bits",
    "shrink",
    "weight_bits",
]
