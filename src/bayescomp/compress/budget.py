"""A size target: per-layer thresholds that make the compressed model fit a budget, chosen by the scores alone.

The budget is a share of the weights kept (`target_kept`, as `weights_kept / weights_total` of the
report) or a count of multiply-adds per example (`max_multiply_adds`, `costs.multiply_adds`), of the
compressed model *as built*: removing a group can remove more than the group (a pruned output channel is
an unread input of the next layer, through flatten, batch norm and residual sums), and an output
convolution keeps its width. So every candidate decision is analysed and rebuilt (`analysis`, `surgery`)
and measured; no data is read, only the log α scores and the shapes of the example input.

Search, over each layer's groups in order of increasing score (a layer's kept groups are always those with
the lowest scores, so each layer's decision is one threshold; groups with the same score go together):

1. The floor: every layer keeps only its lowest-score group (a layer with none left would cut the network
   in two), output convolutions all theirs; where that leaves a fully connected layer no input (its kept
   inputs come from channels cut upstream), groups are added in the order of step 2 until every layer has
   one. A budget below it raises `PruneError` naming the floor.
2. Groups across layers, ranked by score: the longest prefix of that ranking that fits (binary search;
   the size never shrinks as groups are added).
3. Then, layer by layer in the order of their next group's score, as many more of the layer's next
   groups as still fit (binary search again). Afterwards, taking back any layer's lowest-score removed
   group would exceed the budget: the target is met "within one group per layer". A layer's groups only
   grow the model, so one pass suffices.

A layer's threshold is the score of its lowest-score removed group (keep while log α < it), or
max + 1 where every group is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer
from .analysis import analyse, decision_masks, output_layers
from .costs import Example, multiply_adds
from .masks import PruneError
from .modes import ThresholdChoice
from .surgery import Builder
from .tracing import chain_example, trace

RULE = "size-target"


def known_example(model: nn.Module, example_input: Example | None) -> Example | None:
    """`example_input`, or for an `nn.Sequential` chain whose first weighted layer is fully connected, its
    `chain_example` (that layer fixes the input). None where the input's shape is not known (the multiply-adds
    of a convolution depend on the image size)."""
    if example_input is not None:
        return example_input
    if isinstance(model, nn.Sequential):
        first = next((m for m in model.modules() if isinstance(m, (GroupSparseLayer, nn.Linear, nn.Conv1d, nn.Conv2d))),
                     None)
        if first is not None and hasattr(first, "in_features"):
            return chain_example(model)
    return None


def check_target(target_kept: float | None, max_multiply_adds: int | None) -> None:
    """Exactly one of the two targets, each in its range (a `ValueError` naming the problem otherwise)."""
    if (target_kept is None) == (max_multiply_adds is None):
        raise ValueError("give one size target: target_kept= (a share of the weights) or max_multiply_adds=")
    if target_kept is not None and not (isinstance(target_kept, (int, float)) and 0.0 < target_kept <= 1.0):
        raise ValueError(f"target_kept is the share of the weights kept, in (0, 1]; got {target_kept!r}")
    if max_multiply_adds is not None and (isinstance(max_multiply_adds, bool) or not isinstance(max_multiply_adds, int)
                                          or max_multiply_adds < 1):
        raise ValueError(f"max_multiply_adds must be a positive integer, got {max_multiply_adds!r}")


def target_example(model: nn.Module, target_kept: float | None, max_multiply_adds: int | None,
                   example_input: Example | None) -> Example | None:
    """The example a size target on `model` measures with (`known_example`), after checking the target
    (`check_target`) and that a multiply-add target has one: a `ValueError` naming the problem otherwise."""
    check_target(target_kept, max_multiply_adds)
    example = known_example(model, example_input)
    if max_multiply_adds is not None and example is None:
        raise ValueError("max_multiply_adds needs example_input=, a batch the model accepts (the multiply-adds of "
                         "a convolution depend on the input's size)")
    return example


@dataclass
class _Layer:
    """One group-sparse layer in the search: its scores, its distinct score levels, how many it keeps."""

    module: GroupSparseLayer
    scores: Tensor  # log α (CPU)
    levels: list[float]  # distinct finite scores of the groups not switched off, ascending
    fixed: bool  # an output convolution: keeps its width
    count: int = 0  # levels kept

    def threshold(self, count: int | None = None) -> float:
        """Keep while log α < this: the score of the first level not kept, or max + 1 (keep all)."""
        c = len(self.levels) if self.fixed or count is None and self.count >= len(self.levels) else \
            self.count if count is None else count
        if c < len(self.levels):
            return self.levels[c]
        finite = self.scores[torch.isfinite(self.scores)]
        return float(finite.max()) + 1.0 if finite.numel() else math.inf

    def keep(self, count: int | None = None) -> Tensor:
        if self.fixed:
            return self.module.group_mask.detach().cpu().clone()
        return (self.scores < self.threshold(count)) & self.module.group_mask.detach().cpu()


def _layers(model: nn.Module, outputs: list[str]) -> dict[str, _Layer]:
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, GroupSparseLayer):
            continue
        la = m.log_alpha().detach().cpu()  # (in the layer's dtype: a threshold is one of these values, exactly)
        on = m.group_mask.detach().cpu() & torch.isfinite(la)
        levels = [float(v) for v in torch.unique(la[on])]  # sorted ascending
        layers[name] = _Layer(m, la, levels, name in outputs and not hasattr(m, "in_features"))
    if not layers:
        raise PruneError("the model has no group-sparse layer; call bayescomp.bayesianize first")
    return layers


@torch.no_grad()
def size_target_thresholds(model: nn.Module, *, target_kept: float | None = None,
                           max_multiply_adds: int | None = None,
                           example_input: Example | None = None) -> dict[str, ThresholdChoice]:
    """Per-layer thresholds whose compressed model meets the size target, within one group per layer.

    `target_kept`: the share of the weights kept, in (0, 1]; `max_multiply_adds`: multiply-adds of one
    example's forward pass (`costs.multiply_adds`). `example_input`: a batch the model accepts (needed for any
    model but an `nn.Sequential` chain; for multiply-adds, unless the chain starts fully connected). Each
    layer's `ThresholdChoice.details["size_target"]` holds the budget, the size reached, the floor and the
    full size. Raises `PruneError` when the budget is below the floor.
    """
    example = target_example(model, target_kept, max_multiply_adds, example_input)
    was_training = model.training
    model.eval()
    try:
        gm = trace(model, chain_example(model) if example is None else example)
        layers = _layers(model, output_layers(gm))
        measure = _measure(model, gm, layers, example if max_multiply_adds is not None else None)
        full = measure({n: lay.keep(len(lay.levels)) for n, lay in layers.items()})
        if target_kept is not None:
            total = _weights_total(model, gm)
            budget = int(math.floor(target_kept * total + 1e-9 * total))
        else:
            total = full
            budget = int(max_multiply_adds)
        return _search(layers, measure, budget, total, full, target_kept, max_multiply_adds)
    finally:
        model.train(was_training)


def _weights_total(model: nn.Module, gm: Any) -> int:
    from .rules import module_rule  # the weighted layers, as the report counts them

    total = 0
    for _, m in gm.named_modules():
        rule = module_rule(m)
        if rule is not None and rule.kind == "weighted":
            total += (m.posterior_mean() if isinstance(m, GroupSparseLayer) else m.weight).numel()
    return total


def _measure(model: nn.Module, gm: Any, layers: Mapping[str, _Layer],
             example: Example | None) -> Callable[[Mapping[str, Tensor]], float]:
    """size(keeps): weights kept by the built model (or, given `example`, its multiply-adds); inf where the
    decision cannot be built (a layer left with no input)."""

    def size(keeps: Mapping[str, Tensor]) -> float:
        try:
            an = analyse(model, gm, keeps)
        except PruneError:
            return math.inf
        builder = Builder(an, decision_masks(an), None)
        plain = builder.build()
        if example is not None:
            return float(multiply_adds(plain, example))
        return float(sum(0 if m is None else m.weight.numel() for m in builder.new_layers.values()))

    return size


def _search(layers: dict[str, _Layer], measure: Callable[[Mapping[str, Tensor]], float], budget: int, total: int,
            full: float, target_kept: float | None, max_multiply_adds: int | None) -> dict[str, ThresholdChoice]:
    evaluations = 0

    def size_at(counts: Mapping[str, int]) -> float:
        nonlocal evaluations
        evaluations += 1
        return measure({n: lay.keep(counts[n]) for n, lay in layers.items()})

    free = {n: lay for n, lay in layers.items() if not lay.fixed}
    counts = {n: min(1, len(lay.levels)) for n, lay in layers.items()}
    # the ranking across layers: every level above each layer's floor, by score
    ranking = sorted(((lay.levels[i], k, n) for k, (n, lay) in enumerate(free.items())
                      for i in range(counts[n], len(lay.levels))))

    def with_prefix(k: int) -> dict[str, int]:
        c = dict(counts)
        for _, _, n in ranking[:k]:
            c[n] += 1
        return c

    # 1. the floor: the shortest prefix of the ranking whose model can be built (a fully connected layer
    # whose kept inputs are all cut upstream cannot; more groups never make a model unbuildable)
    start = _smallest(len(ranking), lambda k: not math.isinf(size_at(with_prefix(k))))
    floor = size_at(with_prefix(start)) if start <= len(ranking) else math.inf
    unit = "weights" if target_kept is not None else "multiply-adds"
    if floor > budget:
        what = "it cannot be built" if math.isinf(floor) else f"{int(floor)} {unit}"
        share = "" if math.isinf(floor) or target_kept is None else f" ({100.0 * floor / total:.3g}% of {total})"
        raise PruneError(f"size target {budget} {unit} is below the floor: keeping only each layer's lowest-score "
                         f"group (output convolutions their width; then groups by score until every layer has an "
                         f"input), the compressed model keeps {what}{share}")
    # 2. the longest prefix of the ranking that fits
    k = start + _largest(len(ranking) - start, lambda j: size_at(with_prefix(start + j)) <= budget)
    counts = with_prefix(k)
    # 3. each layer's next groups while they fit, the layers in order of their next group's score
    order = sorted((n for n, lay in free.items() if counts[n] < len(lay.levels)), key=lambda n: free[n].levels[counts[n]])
    for n in order:
        room = len(free[n].levels) - counts[n]
        counts[n] += _largest(room, lambda m, n=n: size_at({**counts, n: counts[n] + m}) <= budget)
    reached = size_at(counts)
    record = {"rule": RULE, "measure": "weights_kept" if target_kept is not None else "multiply_adds",
              "target_kept": target_kept, "max_multiply_adds": max_multiply_adds, "budget": budget,
              "reached": int(reached), "floor": int(floor), "full": int(full),
              "ranked_by": "log α across layers, then each layer's next groups while they fit",
              "evaluations": evaluations}
    out = {}
    for n, lay in layers.items():
        lay.count = counts[n]
        kept = int(lay.keep().sum())
        why = ("an output convolution: keeps its width" if lay.fixed else
               f"size target: {reached:.0f} of {budget} {unit} allowed; the layer's next group would not fit"
               if counts[n] < len(lay.levels) else f"size target: {reached:.0f} of {budget} {unit} allowed; "
               "every group fits")
        out[n] = ThresholdChoice(lay.threshold(), RULE, why, kept, lay.module.n_groups, {"size_target": dict(record)})
    return out


def _smallest(n: int, ok: Callable[[int], bool]) -> int:
    """The smallest k in 0..n with ok(k), for ok monotone (false, then true); n + 1 where none is."""
    lo, hi = 0, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid <= n and ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _largest(n: int, fits: Callable[[int], bool]) -> int:
    """The largest k in 0..n with fits(k), for fits true at 0 and monotone (true, then false)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = ["RULE", "check_target", "known_example", "size_target_thresholds", "target_example"]
