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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer
from .masks import PruneError

log = logging.getLogger(__name__)

METHODS = ("otsu", "gmm")
#: what `split_modes` does in a layer whose scores show no split: keep every group, or cut at the noise floor
NO_SPLIT = ("keep", "floor")
#: Otsu's separability η = σ²_between / σ²_total below which a histogram counts as one mode.
#: One Gaussian gives η = 2/π ≈ 0.64 and a uniform distribution 0.75; two equal Gaussians reach
#: 0.8 when their means are 4 standard deviations apart (clearly two modes).
MIN_SEPARABILITY = 0.8


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold on log α for one layer (keep group i while log α_i < value) and why it was chosen."""

    value: float
    method: str
    reason: str
    kept: int | None = None  # groups of the layer the threshold keeps
    total: int | None = None  # groups of the layer
    details: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _keep_all(values: Tensor, method: str, why: str) -> ThresholdChoice:
    """The threshold that keeps every (finite) score: max + 1 (finite, JSON-safe), +inf with no finite score."""
    if values.numel():
        value = float(values.max()) + 1.0
        reason = f"{why}: no split, every group kept (threshold {value:.3g} = max + 1)"
    else:
        value = math.inf
        reason = f"{why}: no split, threshold +inf"
    log.info("split_modes: %s", reason)
    return ThresholdChoice(value, method, reason, int(values.numel()), int(values.numel()), {"degenerate": True})


def _no_split(values: Tensor, method: str, why: str, no_split: str, noise_floor: float | None) -> ThresholdChoice:
    """A layer without a split: every group kept (`no_split="keep"`), or (`"floor"`) the groups whose score lies
    below the noise floor, the ones the prior calls signal; the floor that would empty the layer keeps all."""
    if no_split == "keep" or noise_floor is None:  # (split_modes refuses "floor" without a floor)
        return _keep_all(values, method, why)
    kept = int((values < noise_floor).sum())
    if kept == 0:
        return _keep_all(values, method, f"{why}; every score at or above the noise floor {noise_floor:g}")
    reason = f"{why}: no split, cut at the noise floor {noise_floor:g} (keeps {kept} of {values.numel()})"
    log.info("split_modes: %s", reason)
    return ThresholdChoice(float(noise_floor), method, reason, kept, int(values.numel()),
                           {"degenerate": True, "no_split": "floor"})


def _otsu(s: Tensor) -> tuple[int, float]:
    """Exact Otsu on sorted values: (k, η) with the split s[:k] | s[k:] maximising σ²_between.

    σ²_between(k) = w0·w1·(m0 − m1)²; only cuts between distinct values are allowed.
    """
    n = s.numel()
    csum = torch.cumsum(s, 0)
    k = torch.arange(1, n, dtype=s.dtype)
    m0 = csum[:-1] / k
    m1 = (csum[-1] - csum[:-1]) / (n - k)
    between = (k / n) * (1 - k / n) * (m0 - m1) ** 2
    between = torch.where(s[1:] > s[:-1], between, torch.full_like(between, -1.0))  # no cut inside ties
    best = int(torch.argmax(between))
    total = float(s.var(unbiased=False))
    return best + 1, float(between[best]) / total


def _gmm_boundary(s: Tensor, k: int, iters: int = 200) -> tuple[float, dict[str, float]] | None:
    """EM for a two-component 1-D Gaussian mixture started at the Otsu split; the point between the
    means where both components are equally likely a posteriori (None if there is none)."""
    lo, hi = s[:k], s[k:]
    w = torch.tensor([k / s.numel(), 1 - k / s.numel()], dtype=s.dtype)
    mu = torch.stack([lo.mean(), hi.mean()])
    floor = 1e-6 * float(s.var(unbiased=False)) + 1e-12
    var = torch.stack([lo.var(unbiased=False), hi.var(unbiased=False)]).clamp_min(floor)

    def log_joint(x: Tensor) -> Tensor:  # (n, 2): log w_c + log N(x; μ_c, var_c)
        x = x.view(-1, 1)
        return torch.log(w) - 0.5 * torch.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var)

    prev = -math.inf
    for _ in range(iters):
        lj = log_joint(s)
        ll = torch.logsumexp(lj, 1)
        r = torch.exp(lj - ll.view(-1, 1))
        nk = r.sum(0).clamp_min(1e-12)
        w = nk / s.numel()
        mu = (r * s.view(-1, 1)).sum(0) / nk
        var = ((r * (s.view(-1, 1) - mu) ** 2).sum(0) / nk).clamp_min(floor)
        cur = float(ll.sum())
        if cur - prev < 1e-9 * abs(cur) + 1e-12:
            break
        prev = cur
    if mu[0] > mu[1]:
        w, mu, var = w.flip(0), mu.flip(0), var.flip(0)
    grid = torch.linspace(float(mu[0]), float(mu[1]), 2001, dtype=s.dtype)
    diff = log_joint(grid)
    d = diff[:, 1] - diff[:, 0]  # > 0 where the high mode wins
    crossing = torch.nonzero((d[:-1] <= 0) & (d[1:] > 0)).flatten()
    if crossing.numel() == 0:
        return None
    i = int(crossing[0])
    a, b = float(grid[i]), float(grid[i + 1])
    for _ in range(60):  # bisection on the sign change
        m = 0.5 * (a + b)
        lj = log_joint(torch.tensor([m], dtype=s.dtype))[0]
        if float(lj[1] - lj[0]) > 0:
            b = m
        else:
            a = m
    params = {"weights": w.tolist(), "means": mu.tolist(), "stds": var.sqrt().tolist()}
    return 0.5 * (a + b), params


def split_modes(scores: Tensor | Sequence[float], method: str = "otsu", *,
                min_separability: float = MIN_SEPARABILITY, noise_floor: float | None = None,
                no_split: str = "keep") -> ThresholdChoice:
    """The threshold between the two modes of a layer's log α scores (keep what lies below it).

    Methods:

    * ``"otsu"`` (default): Otsu's method — the cut that maximises the between-class variance
      w0·w1·(m0 − m1)² of the two sides — computed exactly on the sorted scores (the limit of an
      infinitely fine histogram, so there is no bin width to choose; it is the globally optimal
      1-D 2-means). The threshold is the midpoint of the gap at the optimal cut. Parameter-free,
      robust to unequal mode sizes and widths, and it always puts a gap between the two classes,
      so every score in the low mode is kept and every score in the high mode is pruned.
    * ``"gmm"``: a two-component Gaussian mixture fitted by EM from the Otsu split; the threshold is
      the point between the two means where both components are equally probable a posteriori.
      It moves the cut towards the narrower mode when the widths differ, and can cut inside a
      dense region (the Otsu cut never does); it falls back to Otsu when there is no crossing.

    Degenerate inputs keep everything (threshold max + 1, or +inf without any finite score), with the
    reason in the result and in the log: fewer than two finite scores, all scores equal, or a
    unimodal histogram — Otsu's separability η = σ²_between/σ²_total below `min_separability`
    (0.8: a single Gaussian gives 0.64, a uniform spread 0.75). NaN scores are ignored; the value
    can be compared against all scores.

    `noise_floor`: the score from which a group counts as noise (for a layer: its prior's
    `noise_floor`, log α = −3 for GNJ). Two modes that both lie below it are two populations of
    groups that still carry signal — a layer early in training, or one with weak and strong
    channels — and cutting between them prunes useful groups (a small residual network on MNIST
    lost 41 points of accuracy that way after 8 epochs). When the upper mode's mean is below the
    floor, everything is kept, and the reason says so.

    `no_split`: in every case above without a split (and with a `noise_floor`), ``"keep"`` (default) keeps every
    group; ``"floor"`` cuts at the noise floor instead, so the groups the prior calls noise go and the rest
    stay (details ``{"degenerate": True, "no_split": "floor"}``). A floor at or below every score would
    empty the layer: then everything is kept. Use it where a layer's pruned groups do not form a mode of
    their own, such as the first layer of a run with an input origin, whose inputs that never leave the
    origin keep the score the prior gives them (a spike inside the spread of the others).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if no_split not in NO_SPLIT:
        raise ValueError(f"no_split must be one of {NO_SPLIT}, got {no_split!r}")
    if no_split == "floor" and noise_floor is None:
        raise ValueError('no_split="floor" cuts at the noise floor: give noise_floor')
    s = torch.as_tensor(scores).detach().flatten().double().cpu()
    s = s[torch.isfinite(s)]
    if s.numel() < 2:
        return _no_split(s, method, f"{s.numel()} finite score(s)", no_split, noise_floor)
    s, _ = torch.sort(s)
    if float(s[-1]) == float(s[0]):
        return _no_split(s, method, f"all {s.numel()} scores equal ({float(s[0]):.3g})", no_split, noise_floor)
    k, eta = _otsu(s)
    if eta < min_separability:
        return _no_split(s, method, f"unimodal histogram (Otsu separability {eta:.2f} < {min_separability})",
                         no_split, noise_floor)
    value = 0.5 * float(s[k - 1] + s[k])
    details: dict[str, Any] = {"separability": eta, "low_mode": float(s[:k].mean()), "high_mode": float(s[k:].mean())}
    reason = (f"Otsu split between modes at {details['low_mode']:.2f} and {details['high_mode']:.2f} "
              f"(separability {eta:.2f}); gap {float(s[k - 1]):.2f}..{float(s[k]):.2f}")
    if noise_floor is not None and details["high_mode"] < noise_floor:
        return _no_split(s, method, f"two modes ({details['low_mode']:.2f}, {details['high_mode']:.2f}), both below "
                                    f"the noise floor {noise_floor:g}: neither is pruned", no_split, noise_floor)
    if method == "gmm":
        fit = _gmm_boundary(s, k)
        if fit is None:
            reason = f"GMM without a crossing between its means; {reason}"
        else:
            value, params = fit
            details["gmm"] = params
            m0, m1 = params["means"]
            sd0, sd1 = params["stds"]
            reason = (f"2-Gaussian mixture: modes {m0:.2f}±{sd0:.2f} and {m1:.2f}±{sd1:.2f}, equal posterior at "
                      f"{value:.2f} (Otsu separability {eta:.2f})")
    kept = int((s < value).sum())
    return ThresholdChoice(value, method, reason, kept, int(s.numel()), details)


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
def _error(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error in % of `model` in evaluation mode (the only place data is read)."""
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
                cache[key] = (_error(c.model, val_x, val_y), int(c.report["weights_kept"]))
        return cache[key]

    try:
        base = _error(model, val_x, val_y)
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


__all__ = [
    "METHODS",
    "ThresholdChoice",
    "default_candidates",
    "histogram_thresholds",
    "split_modes",
    "validation_split",
    "validation_thresholds",
]
