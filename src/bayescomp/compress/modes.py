"""The split between the two modes of a layer's log α scores (`split_modes`), and the record of a chosen
threshold (`ThresholdChoice`).

A well-trained group-sparse posterior puts the useful groups in a low mode of log α and the pruned ones in
a high mode; the cut is where the histogram says they part (Otsu's method, or a two-Gaussian mixture).
Degenerate layers (one mode, equal scores, two modes below the noise floor) say so in the choice's reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

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


__all__ = ["METHODS", "MIN_SEPARABILITY", "NO_SPLIT", "ThresholdChoice", "split_modes"]
