"""Thresholds on log α chosen from the evidence: the posterior's own histogram, or a validation split.

The paper (and `recipes`) fix the log α thresholds by hand. Two data-driven choices are offered here:

* `histogram_thresholds(model)`: per layer, the cut between the two modes of the layer's log α
  histogram (`split_modes`). It needs no data at all: a well-trained group-sparse posterior puts the
  useful groups in a low mode and the pruned ones in a high mode, and the cut is where the
  histogram says they part.
* `validation_thresholds(model, val_x, val_y, budget)`: the most compression whose error on a
  validation split stays within `budget` percentage points of the uncompressed model's error on
  that split. The caller holds the validation split out of the TRAINING set
  (`validation_split`); the test set is never seen here.

Every choice comes back as a `ThresholdChoice`: the value, the method, and a one-line reason that
says why (and, for degenerate layers, why everything is kept).

The decision policy: every way of choosing the thresholds is a rule object with one method,
`choose(model) -> {layer: ThresholdChoice}` — the priors' defaults (`PriorDefault`), one value for every
layer (`EveryLayer`), values for named layers over another rule (`PerLayer`), the histogram split
(`HistogramSplit`), the noise floor (`NoiseFloor`), the validation budget (`ValidationBudget`), a size target (`SizeTarget`).
`rule_for(thresholds)` turns what a user passes (None, a number, {layer: number}, or a rule) into a
rule, and `choose_thresholds(model, thresholds)` resolves it, once, into {layer: float}.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer
from .masks import PruneError
from .modes import METHODS, MIN_SEPARABILITY, NO_SPLIT, ThresholdChoice, split_modes

log = logging.getLogger(__name__)


def _layers(model: nn.Module) -> dict[str, GroupSparseLayer]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GroupSparseLayer)}
    if not layers:
        raise PruneError("the model has no group-sparse layer; call bayescomp.bayesianize first")
    return layers


@torch.no_grad()
def histogram_thresholds(model: nn.Module, method: str = "otsu", *, min_separability: float = MIN_SEPARABILITY,
                         use_noise_floor: bool = True, no_split: str = "keep") -> dict[str, ThresholdChoice]:
    """`split_modes` of every group-sparse layer's log α: {layer name: ThresholdChoice}.

    `use_noise_floor`: a split counts only if its upper mode lies above the layer prior's noise floor
    (`noise_floor` of the layer: log α −3 for GNJ, 2 for GHS; `split_modes`). `no_split`: a layer without a
    split keeps every group (``"keep"``) or is cut at that floor (``"floor"``; needs `use_noise_floor`).
    """
    if no_split == "floor" and not use_noise_floor:
        raise ValueError('no_split="floor" cuts at the noise floor: it needs use_noise_floor=True')
    out = {}
    for name, m in _layers(model).items():
        la = m.log_alpha().detach().cpu()
        floor = float(getattr(m, "noise_floor", m.default_threshold)) if use_noise_floor else None
        c = split_modes(la, method, min_separability=min_separability, noise_floor=floor, no_split=no_split)
        out[name] = ThresholdChoice(c.value, c.method, c.reason, int((la < c.value).sum()), la.numel(), c.details)
    return out


def validation_split(n_train: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train_idx, val_idx): a seeded random hold-out of round(fraction·n_train) training examples.

    The two index sets are disjoint, cover 0..n_train−1, are each sorted, and depend only on
    (n_train, fraction, seed), so a resumed run holds out the same examples.
    """
    if not isinstance(n_train, int) or n_train < 2:
        raise ValueError(f"a validation split needs at least 2 training examples, got {n_train!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    n_val = min(max(int(round(fraction * n_train)), 1), n_train - 1)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    val, _ = torch.sort(perm[:n_val])
    train, _ = torch.sort(perm[n_val:])
    return train, val


@torch.no_grad()
def classification_error(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error in % of `model` in evaluation mode (the only place a threshold rule reads data)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(device))
        wrong += int((out.argmax(1).cpu() != y[i : i + batch_size].cpu()).sum())
    model.train(was)
    return 100.0 * wrong / max(len(x), 1)


def default_candidates(scores: Tensor, n: int = 24) -> list[float]:
    """Up to `n` thresholds for one layer, ascending: midpoints between consecutive distinct scores at
    evenly spaced ranks (so they keep about 1/n, 2/n, … of the groups, at least one), then max + 1
    (keep all)."""
    u = torch.unique(scores.detach().double().cpu()[torch.isfinite(scores.detach().cpu())])
    if u.numel() == 0:
        return [math.inf]
    mids = (u[:-1] + u[1:]) / 2
    if mids.numel() > n - 1:
        idx = torch.linspace(0, mids.numel() - 1, max(n - 1, 1)).round().long().unique()
        mids = mids[idx]
    return [float(v) for v in mids] + [float(u[-1]) + 1.0]


def validation_thresholds(
    model: nn.Module,
    val_x: Tensor,
    val_y: Tensor,
    budget: float,
    candidates: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    *,
    n_candidates: int = 24,
    max_passes: int = 3,
    round_weights: bool = True,
    bits_reduce: str = "mean",
    variance_scale: float = 1.0,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
) -> dict[str, ThresholdChoice]:
    """Per-layer thresholds with the fewest weights kept whose validation error is within `budget` points.

    The limit is err_val(uncompressed posterior-mean model) + `budget`; a setting's error is that of
    the compressed model (`compress(...)`, rounded to the inferred bits unless `round_weights=False`)
    on (val_x, val_y), and its size is `compress(...).report["weights_kept"]`.

    Search (greedy coordinate descent): start from thresholds that keep every group; then, layer by
    layer in order of decreasing weight count (the biggest savings first), scan that layer's
    candidates from the most aggressive up and take the first one that is within the limit with
    the other layers where they are; repeat the pass (the others have moved) until a pass changes
    nothing or `max_passes` passes. Since the weights kept never decrease as one threshold rises,
    the first feasible candidate of a scan is the smallest setting along that coordinate; the
    result is a local optimum of the search, not necessarily the global one. Cost: at most
    max_passes · Σ_layers (candidates) compressions and validation passes.

    `candidates`: None (each layer's `default_candidates`, `n_candidates` of them), one list for every
    layer, or {layer name: list}; a keep-all value (max + 1) is always added. A setting that
    `compress` refuses (a layer left empty) counts as infeasible. `example_input`: as for `compress`, a
    batch the model accepts (on its device); a model that is not an `nn.Sequential` chain needs it.

    Only `val_x`, `val_y` and the model are read: the caller holds the split out of the training set
    (`validation_split`) and the test set never enters this function.
    """
    from . import compress  # the package's compress(); imported late (this module is imported by it)

    if not (budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"error budget must be a finite number ≥ 0 (percentage points), got {budget}")
    if len(val_x) == 0 or len(val_x) != len(val_y):
        raise ValueError(f"validation set must be non-empty with as many labels as inputs ({len(val_x)} vs {len(val_y)})")
    layers = _layers(model)
    scores = {n: m.log_alpha().detach().cpu() for n, m in layers.items()}
    grid: dict[str, list[float]] = {}
    for n, la in scores.items():
        if candidates is None:
            values = default_candidates(la, n_candidates)
        else:
            values = list(candidates[n]) if isinstance(candidates, Mapping) else list(candidates)
            if isinstance(candidates, Mapping) and not values:
                raise ValueError(f"no candidate thresholds for layer {n}")
        finite = la[torch.isfinite(la)]
        keep_all = float(finite.max()) + 1.0 if finite.numel() else math.inf
        values = sorted({float(v) for v in values if not math.isnan(float(v))} | {keep_all})
        grid[n] = values
    if isinstance(candidates, Mapping):
        unknown = sorted(set(candidates) - set(layers))
        if unknown:
            raise PruneError(f"candidates name unknown layers {unknown}; group-sparse layers are {list(layers)}")

    was_training = model.training
    model.eval()
    evaluations = 0
    cache: dict[tuple[float, ...], tuple[float, int] | None] = {}

    def measure(th: dict[str, float]) -> tuple[float, int] | None:
        nonlocal evaluations
        key = tuple(th[n] for n in layers)
        if key not in cache:
            try:
                c = compress(model, th, round_weights=round_weights, bits_reduce=bits_reduce,
                             variance_scale=variance_scale, example_input=example_input)
            except PruneError:
                cache[key] = None
            else:
                evaluations += 1
                cache[key] = (classification_error(c.model, val_x, val_y), int(c.report["weights_kept"]))
        return cache[key]

    try:
        base = classification_error(model, val_x, val_y)
        limit = base + budget
        current = {n: grid[n][-1] for n in layers}
        state = measure(current)
        if state is None:  # pragma: no cover - keep-all never empties a layer
            raise PruneError("keeping every group still leaves a layer empty")
        feasible = state[0] <= limit + 1e-9
        order = sorted(layers, key=lambda n: layers[n].weight_mu.numel(), reverse=True)
        passes = 0
        while feasible and passes < max_passes:
            passes += 1
            changed = False
            for n in order:
                for t in grid[n]:
                    if t >= current[n]:
                        break
                    trial = dict(current, **{n: t})
                    r = measure(trial)
                    if r is not None and r[0] <= limit + 1e-9:
                        if r[1] < state[1] or (r[1] == state[1] and r[0] < state[0]):
                            current, state, changed = trial, r, True
                        break
            if not changed:
                break
    finally:
        model.train(was_training)

    err, kept_w = state
    out = {}
    for n in layers:
        la = scores[n]
        kept = int((la < current[n]).sum())
        if feasible:
            reason = (f"greedy validation search: validation error {err:.2f}% ≤ {base:.2f}% + {budget:g} points; "
                      f"keeps {kept}/{la.numel()} groups ({kept_w} weights in all, {evaluations} settings tried)")
        else:
            reason = (f"budget cannot be met: even keeping every group the compressed model's validation error is "
                      f"{err:.2f}% > {base:.2f}% + {budget:g} points; every group kept")
            log.warning("validation_thresholds: %s", reason)
        details = {"val_error": err, "val_error_uncompressed": base, "budget": budget, "weights_kept": kept_w,
                   "settings_tried": evaluations, "passes": passes if feasible else 0, "feasible": feasible,
                   "n_val": len(val_x)}
        out[n] = ThresholdChoice(float(current[n]), "validation", reason, kept, la.numel(), details)
    return out


class ThresholdRule(Protocol):
    """A way to choose every group-sparse layer's log α threshold (keep group i while log α_i < it)."""

    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        """{layer name: ThresholdChoice} for every group-sparse layer of `model`."""
        ...


def _fixed(m: GroupSparseLayer, value: float, method: str, reason: str) -> ThresholdChoice:
    """The record of a threshold set without looking at the data: what it keeps of the layer's groups."""
    la = m.log_alpha().detach()
    return ThresholdChoice(float(value), method, reason, int((la < value).sum()), la.numel())


@dataclass(frozen=True)
class PriorDefault:
    """Each layer's prior's own threshold (`default_threshold`: log α −3 for GNJ, the paper's value)."""

    @torch.no_grad()
    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        return {n: _fixed(m, float(m.default_threshold), "default", "the prior's default threshold")
                for n, m in _layers(model).items()}


@dataclass(frozen=True)
class EveryLayer:
    """One threshold for every layer."""

    value: float

    @torch.no_grad()
    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        if math.isnan(float(self.value)):
            raise PruneError("threshold is NaN")
        return {n: _fixed(m, float(self.value), "given", "one threshold for every layer")
                for n, m in _layers(model).items()}


@dataclass(frozen=True)
class PerLayer:
    """Thresholds for the layers named in `values`; the other layers take `others`' choice."""

    values: Mapping[str, float]
    others: ThresholdRule = PriorDefault()
    reason: str = "set by --thresholds"

    @torch.no_grad()
    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        layers = _layers(model)
        unknown = sorted(set(self.values) - set(layers))
        if unknown:
            raise PruneError(f"thresholds name unknown layers {unknown}; group-sparse layers are {list(layers)}")
        for n, t in self.values.items():
            if math.isnan(float(t)):
                raise PruneError(f"threshold for {n} is NaN")
        chosen = self.others.choose(model) if set(self.values) != set(layers) else {}
        return {n: _fixed(m, float(self.values[n]), "given", self.reason) if n in self.values else chosen[n]
                for n, m in layers.items()}


@dataclass(frozen=True)
class HistogramSplit:
    """The cut between the two modes of each layer's log α histogram (`histogram_thresholds`)."""

    method: str = "otsu"
    no_split: str = "keep"
    use_noise_floor: bool = True
    min_separability: float = MIN_SEPARABILITY

    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        return histogram_thresholds(model, self.method, min_separability=self.min_separability,
                                    use_noise_floor=self.use_noise_floor, no_split=self.no_split)


@dataclass(frozen=True)
class NoiseFloor:
    """Each layer cut at its prior's noise floor (`noise_floor`: the score from which a group counts as noise)."""

    @torch.no_grad()
    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        return {n: _fixed(m, float(getattr(m, "noise_floor", m.default_threshold)), "floor",
                          "the prior's noise floor") for n, m in _layers(model).items()}


@dataclass(frozen=True, eq=False)
class ValidationBudget:
    """The most compression within `budget` points of validation error (`validation_thresholds`)."""

    x: Tensor
    y: Tensor
    budget: float
    variance_scale: float = 1.0
    example_input: Tensor | tuple[Tensor, ...] | None = None

    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        return validation_thresholds(model, self.x, self.y, self.budget, variance_scale=self.variance_scale,
                                     example_input=self.example_input)


@dataclass(frozen=True, eq=False)
class SizeTarget:
    """Per-layer thresholds that make the compressed model fit a size: `target_kept` (share of the weights
    kept) or `max_multiply_adds` (per example), groups ranked by log α across layers (`budget`)."""

    target_kept: float | None = None
    max_multiply_adds: int | None = None
    example_input: Tensor | tuple[Tensor, ...] | None = None

    def choose(self, model: nn.Module) -> dict[str, ThresholdChoice]:
        from .budget import size_target_thresholds  # imported late: budget imports the analysis and surgery

        return size_target_thresholds(model, target_kept=self.target_kept, max_multiply_adds=self.max_multiply_adds,
                                      example_input=self.example_input)


def rule_for(thresholds: ThresholdRule | float | Mapping[str, float] | None) -> ThresholdRule:
    """The rule for what a user passes as thresholds: None (the priors' defaults), a number (every layer),
    {layer: number} (those layers; the others the priors' defaults), or a rule (itself)."""
    if thresholds is None:
        return PriorDefault()
    if hasattr(thresholds, "choose"):
        return thresholds  # type: ignore[return-value]
    if isinstance(thresholds, Mapping):
        return PerLayer(dict(thresholds))
    return EveryLayer(float(thresholds))  # type: ignore[arg-type]


def choose_thresholds(model: nn.Module, thresholds: ThresholdRule | float | Mapping[str, float] | None
                      ) -> dict[str, float]:
    """Every group-sparse layer's threshold, resolved once from what a user passes (`rule_for`)."""
    return {n: float(c.value) for n, c in rule_for(thresholds).choose(model).items()}


__all__ = [
    "METHODS",
    "NO_SPLIT",
    "EveryLayer",
    "HistogramSplit",
    "NoiseFloor",
    "PerLayer",
    "PriorDefault",
    "SizeTarget",
    "ThresholdChoice",
    "ThresholdRule",
    "ValidationBudget",
    "choose_thresholds",
    "classification_error",
    "rule_for",
    "default_candidates",
    "histogram_thresholds",
    "split_modes",
    "validation_split",
    "validation_thresholds",
]
