"""The Pareto front of a set of runs or settings: which are not beaten in every figure at once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: the figures a sweep's points are compared by: both minimised
PARETO_KEYS = ("test_error", "weights_kept_pct")


def pareto_front(points: Sequence[Mapping[str, Any]], keys: Sequence[str] = PARETO_KEYS) -> list[bool]:
    """Which points are on the Pareto front when every key is minimised.

    A point is on the front unless another point is ≤ in every key and < in at least one. A point
    missing a key (absent, None, NaN) is never on the front and dominates nothing. Equal points do
    not dominate each other: both stay on the front.
    """
    vals: list[tuple[float, ...] | None] = []
    for p in points:
        v = [p.get(k) for k in keys]
        ok = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in v)
        vals.append(tuple(float(a) for a in v) if ok else None)
    out = []
    for i, a in enumerate(vals):
        if a is None:
            out.append(False)
            continue
        dominated = any(
            b is not None and j != i and all(bk <= ak for bk, ak in zip(b, a, strict=True))
            and any(bk < ak for bk, ak in zip(b, a, strict=True))
            for j, b in enumerate(vals)
        )
        out.append(not dominated)
    return out


__all__ = ["PARETO_KEYS", "pareto_front"]
