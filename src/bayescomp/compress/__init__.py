"""compress(): decide → precision → surgery → rates, from a trained Bayesian model — one engine for every model.

>>> result = compress(bmodel, thresholds={"fc1": -2.8, "fc2": -3.0, "fc3": -5.0})   # doctest: +SKIP
>>> result.model        # plain nn.Sequential for a chain, pruned units removed, weights rounded
>>> result.report       # architecture, bits, weights kept, cr_architecture, cr_fast, per-layer details

Every model, chain or graph, goes the same way: traced (`tracing`), analysed (`analysis`: the
decision, which groups of which layer and which channels are tied), its precision read off the kept
weights (`precision`, the one bits loop below), and rebuilt smaller (`surgery`). A chain is a graph
that happens to be a line: its result is given back as an `nn.Sequential`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..convert import CompressionWarning
from ..nn import GroupSparseLayer
from .analysis import Analysis, analyse, decision_masks, output_layers
from .budget import check_target, known_example
from .costs import multiply_adds
from .masks import (
    LayerMask,
    PruneError,
    apply_masks,
    check_keeps,
    group_masks,
    keeps_below,
    on_device,
    resolve_thresholds,
)
from .precision import exponent_bits, layer_bits, round_to_bits, weight_bits
from .rates import rates
from .rules import OpRule, register_channelwise
from .runtime import AppendOnes, FastMaxPool2d, Realign, Select, with_pooling
from .summary import summarize
from .surgery import Builder, as_sequential
from .thresholds import SizeTarget
from .tracing import chain_example, trace
from .weights import effective_params, kept_weights

Example = Tensor | tuple[Tensor, ...]


@dataclass
class CompressedModel:
    """A plain pruned model plus the decision that made it and the figures that describe it."""

    model: nn.Module
    report: dict[str, Any]
    masks: dict[str, LayerMask] = field(repr=False)
    bits: dict[str, int]


#: a compression that keeps at least this percentage of the weights warns (`CompressionWarning`)
KEEPS_ALL_PCT = 99.0


def _traced(model: nn.Module, example_input: Example | None) -> fx.GraphModule:
    """The model traced with `example_input`, or a chain's own `chain_example`."""
    return trace(model, chain_example(model) if example_input is None else example_input)


def _analysis(model: nn.Module, keeps: Mapping[str, Tensor], example_input: Example | None,
              thresholds: Mapping[str, float] | None) -> Analysis:
    """The model traced (with `example_input`, or a chain's own `chain_example`) and analysed under `keeps`."""
    return analyse(model, _traced(model, example_input), keeps, thresholds)


def keep_output_width(model: nn.Module, gm: fx.GraphModule, keeps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`keeps` with every group of each output convolution kept (its groups are its output channels, which
    are the model's outputs: a pruned one would be a constant logit), except groups its `group_mask` switched
    off. A fully connected output layer's groups are its inputs; it never loses outputs anyway."""
    out = dict(keeps)
    for name in output_layers(gm):
        m = model.get_submodule(name)
        if isinstance(m, GroupSparseLayer) and not hasattr(m, "in_features") and name in out:
            out[name] = m.group_mask.detach().cpu().clone()
    return out


def _threshold_decision(model: nn.Module, gm: fx.GraphModule, resolved: Mapping[str, float]) -> dict[str, Tensor]:
    """The group keeps at resolved thresholds, output width preserved (`keep_output_width`)."""
    return keep_output_width(model, gm, keeps_below(model, resolved))


def warn_if_keeps_all(model: nn.Module, report: Mapping[str, Any], resolved: Mapping[str, float]) -> None:
    """A `CompressionWarning` when the compression keeps ≥ `KEEPS_ALL_PCT` % of the weights, with each
    layer's score range and threshold (usually: the training was too short for the scores to separate)."""
    pct = report["weights_kept_pct"]
    if pct < KEEPS_ALL_PCT:
        return
    parts = []
    for name, m in model.named_modules():
        if isinstance(m, GroupSparseLayer):
            la = m.log_alpha().detach()
            parts.append(f"{name}: scores {la.min().item():.1f}..{la.max().item():.1f}, threshold {resolved[name]:g}")
    warnings.warn(f"compression keeps {pct:.1f}% of the weights ({'; '.join(parts)}); a group is kept while its "
                  "score is below the threshold: train longer or lower the threshold", CompressionWarning, stacklevel=4)


def _keeps_of(masks: Mapping[str, LayerMask]) -> dict[str, Tensor]:
    return {n: lm.group_keep for n, lm in masks.items() if lm.group_keep is not None}


def _check_same(given: Mapping[str, LayerMask], derived: Mapping[str, LayerMask]) -> None:
    """`masks=` must be a decision the analysis gives (its group keeps decide; edit those, not the rest)."""
    if set(given) != set(derived):
        raise PruneError(f"masks name the layers {sorted(given)}; the model's weighted layers are {sorted(derived)}")
    for name, lm in given.items():
        d = derived[name]
        if not (torch.equal(lm.in_mask.cpu(), d.in_mask) and torch.equal(lm.out_mask.cpu(), d.out_mask)):
            raise PruneError(f"{name}: its in/out masks are not those its group keep-masks give; edit the group "
                             "keep-masks and pass keeps= (or propagate() them) instead")


def _shrunk(an: Analysis, masks: Mapping[str, LayerMask], bits: Mapping[str, int] | None) -> tuple[Builder, nn.Module]:
    """The surgery under a decision: its builder (layers made, in order) and the plain model, a chain's as a Sequential."""
    builder = Builder(an, masks, bits)
    plain: nn.Module = builder.build()
    if isinstance(an.model, nn.Sequential):
        plain = as_sequential(plain) or plain
    return builder, plain


def layer_precisions(model: nn.Module, masks: Mapping[str, LayerMask], bits_reduce: str = "mean",
              variance_scale: float = 1.0) -> tuple[dict[str, int], int]:
    """The one bits loop: each group-sparse layer's mantissa bits from its kept weights' posterior variances
    (`precision.layer_bits`), and the exponent bits from the largest kept |E[w]| of the network."""
    bits: dict[str, int] = {}
    max_abs = 0.0
    for name, lm in masks.items():
        m = model.get_submodule(name)
        if not isinstance(m, GroupSparseLayer):
            continue
        lm = on_device(lm, m)
        keep = kept_weights(m, lm)
        if not bool(keep.any()):
            continue  # a layer nobody reads: not stored, no precision
        bits[name] = layer_bits(m.posterior_variance()[keep], bits_reduce, variance_scale)
        weight, _ = effective_params(m, lm)
        max_abs = max(max_abs, weight[keep].abs().max().item())
    return bits, exponent_bits(max_abs)


@torch.no_grad()
def compress(
    model: nn.Module,
    thresholds: float | Mapping[str, float] | None = None,
    *,
    masks: Mapping[str, LayerMask] | None = None,
    keeps: Mapping[str, Tensor] | None = None,
    round_weights: bool = True,
    bits_reduce: str = "mean",
    variance_scale: float = 1.0,
    bit_accounting: str = "code",
    example_input: Example | None = None,
    target_kept: float | None = None,
    max_multiply_adds: int | None = None,
) -> CompressedModel:
    """Prune, quantise and shrink a trained Bayesian model.

    - `thresholds`: None (each prior's default), a float for every layer, or {layer name: float};
      group i of a layer is kept while its log α_i is below the layer's threshold. Resolved once here
      (`masks.resolve_thresholds`).
    - `keeps`: {layer name: bool mask over its groups} (`group_masks`), the groups to keep instead of
      those the thresholds keep (e.g. a decision taken before fine-tuning). The report still records
      `thresholds`. `masks`: a decision from `propagate` (its group keep-masks decide).
    - `round_weights`: round each layer's weights to its inferred precision (else keep float32).
    - `bits_reduce`, `variance_scale`: see `precision.layer_bits`; `bit_accounting`: see `rates`.
    - `example_input`: a batch (or tuple of inputs) the model accepts; it fixes the shapes used to follow
      channels through flatten and pooling. Needed for any model but an `nn.Sequential` chain.
    - `target_kept` (share of the weights kept, in (0, 1]) or `max_multiply_adds` (per example, on
      `example_input`): a size target instead of thresholds: per-layer thresholds chosen by the scores alone
      (`SizeTarget`, `budget`) so that this compressed model meets it, within one group per layer. The report
      then holds `size_target` (the rule, the budget, the size reached, the floor).

    With thresholds (no `keeps`/`masks`), an output convolution keeps all its groups: the model's output
    width is preserved (`keep_output_width`). Where the input's shape is known (`example_input`, or a chain
    that starts fully connected) the report gives `multiply_adds_total`, `multiply_adds_kept` (per example,
    `costs.multiply_adds`) and `multiply_adds_kept_pct`. A compression keeping ≥ 99% of the weights warns
    (`CompressionWarning`, with each layer's score range and threshold).

    `.model` is an `nn.Sequential` for a chain (an `nn.Sequential` whose traced graph is a line), else a
    plain `torch.fx.GraphModule`. The input model is not modified.
    """
    if masks is not None and keeps is not None:
        raise ValueError("give masks= or keeps=, not both")
    if target_kept is not None or max_multiply_adds is not None:
        check_target(target_kept, max_multiply_adds)
        if thresholds is not None or masks is not None or keeps is not None:
            raise ValueError("a size target chooses the thresholds: give target_kept=/max_multiply_adds= or "
                             "thresholds=/keeps=/masks=, not both")
        thresholds = SizeTarget(target_kept, max_multiply_adds, example_input)
    was_training = model.training
    model.eval()
    try:
        size_target = None
        if isinstance(thresholds, SizeTarget):
            choices = thresholds.choose(model)
            size_target = next(iter(choices.values())).details["size_target"]
            thresholds = {n: float(c.value) for n, c in choices.items()}
        resolved = resolve_thresholds(model, thresholds)
        chosen = _keeps_of(masks) if masks is not None else keeps
        gm = _traced(model, example_input)
        decision = dict(chosen) if chosen is not None else _threshold_decision(model, gm, resolved)
        an = analyse(model, gm, decision, resolved)
        layer_masks = decision_masks(an, resolved)
        if masks is not None:
            _check_same(masks, layer_masks)
        bits, e_bits = layer_precisions(model, layer_masks, bits_reduce, variance_scale)
        builder, plain = _shrunk(an, layer_masks, bits if round_weights else None)
        rows = [(n, an.modules[n], layer_masks[n], 0 if new is None else new.weight.numel())
                for n, new in builder.new_layers.items()]
        report = summarize(rows, bits, e_bits, resolved, bit_accounting)
        report.update(rounded=round_weights, bits_reduce=bits_reduce, variance_scale=variance_scale)
        report.update(_multiply_adds(model, plain, example_input))
        if size_target is not None:  # (one keeping everything was asked for: no warning)
            report["size_target"] = size_target
        else:
            warn_if_keeps_all(model, report, resolved)
        return CompressedModel(plain, report, layer_masks, bits)
    finally:
        model.train(was_training)


def _multiply_adds(model: nn.Module, plain: nn.Module, example_input: Example | None) -> dict[str, Any]:
    """The report's multiply-adds per example before and after (`costs.multiply_adds`), where the input is known."""
    example = known_example(model, example_input)
    if example is None:
        return {}
    total, kept = multiply_adds(model, example), multiply_adds(plain, example)
    return {"multiply_adds_total": total, "multiply_adds_kept": kept,
            "multiply_adds_kept_pct": 100.0 * kept / total if total else 0.0}


def graph_compress(model: nn.Module, thresholds: float | Mapping[str, float] | None = None, *,
                   example_input: Example, **options: Any) -> CompressedModel:
    """`compress` with a required `example_input` (the name earlier versions gave graph compression)."""
    return compress(model, thresholds, example_input=example_input, **options)


@torch.no_grad()
def propagate(model: nn.Module, keeps: Mapping[str, Tensor], thresholds: Mapping[str, float] | None = None, *,
              example_input: Example | None = None) -> dict[str, LayerMask]:
    """The `LayerMask` of every weighted layer from the group keep-masks (`analysis.decision_masks`)."""
    was_training = model.training
    model.eval()
    try:
        return decision_masks(_analysis(model, keeps, example_input, thresholds), thresholds)
    finally:
        model.train(was_training)


def compression_masks(model: nn.Module, thresholds: float | Mapping[str, float] | None = None, *,
                      example_input: Example | None = None) -> dict[str, LayerMask]:
    """`group_masks` then `propagate`: the full decision for a model at the given thresholds."""
    resolved = resolve_thresholds(model, thresholds)
    was_training = model.training
    model.eval()
    try:
        gm = _traced(model, example_input)
        return decision_masks(analyse(model, gm, _threshold_decision(model, gm, resolved), resolved), resolved)
    finally:
        model.train(was_training)


@torch.no_grad()
def graph_shrinker(model: nn.Module, keeps: Mapping[str, Tensor], *,
                   example_input: Example | None = None) -> Callable[[Mapping[str, int] | None], nn.Module]:
    """Rebuild one decision at many precisions: analyse `model` once under `keeps` ({layer name: bool mask
    over its groups}) and return ``build(bits)``, the plain model with each layer's weights rounded to
    ``bits[layer]`` mantissa bits (a layer left out is not rounded; None: no rounding).
    ``build(compressed.bits)`` is the model `compress(model, keeps=keeps, ...)` returns."""
    was_training = model.training
    model.eval()
    try:
        an = _analysis(model, keeps, example_input, None)
    finally:
        model.train(was_training)
    layer_masks = decision_masks(an)

    @torch.no_grad()
    def build(bits: Mapping[str, int] | None) -> nn.Module:
        return _shrunk(an, layer_masks, None if bits is None else dict(bits))[1]

    return build


def shrink(model: nn.Module, masks: Mapping[str, LayerMask], bits: Mapping[str, int] | None = None, *,
           example_input: Example | None = None) -> nn.Module:
    """The plain model computing what the masked model computes at evaluation, for a decision from `propagate`;
    `bits` (layer name → mantissa bits) rounds each named layer's kept weights to 2^−bits."""
    keeps = _keeps_of(masks)
    build = graph_shrinker(model, keeps, example_input=example_input)
    return build(bits)


__all__ = [
    "AppendOnes",
    "CompressedModel",
    "CompressionWarning",
    "FastMaxPool2d",
    "LayerMask",
    "SizeTarget",
    "OpRule",
    "PruneError",
    "Realign",
    "Select",
    "apply_masks",
    "check_keeps",
    "compress",
    "compression_masks",
    "exponent_bits",
    "graph_compress",
    "graph_shrinker",
    "group_masks",
    "keep_output_width",
    "kept_weights",
    "layer_bits",
    "layer_precisions",
    "multiply_adds",
    "propagate",
    "rates",
    "register_channelwise",
    "round_to_bits",
    "shrink",
    "weight_bits",
    "warn_if_keeps_all",
    "with_pooling",
]
