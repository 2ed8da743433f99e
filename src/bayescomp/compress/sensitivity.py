"""Is the inferred precision right? Error of the compressed model with one layer's bits moved by ±k.

`compress` reads each layer's mantissa width T_l off the posterior variances (`precision`). Mean-field
VI tends to underestimate variances, which would make T_l larger than needed; a layer whose weights
matter more than their variance suggests would make it too small. This module measures it: with
every other layer at its inferred bits, layer l alone is rounded to T_l − k and T_l + k, and the
classification error on (x, y) is recorded.

Verdict per layer (tolerance 0.1 percentage points by default):

* "optimistic": the inferred bits already cost more than the tolerance — error(all at inferred)
  − error(layer l unrounded, the others at inferred) > tol: the rule gave too few bits;
* "conservative": one bit fewer is free — error(l at T_l − 1) − error(all at inferred) ≤ tol:
  the rule gave more bits than needed;
* "tight" otherwise.

Every setting is built by `shrink` (a chain) or `graph_shrinker` (any other model, given an example
input) from the same decision with its own bits dict (a layer left out of it is not rounded), so each
model is exactly the one `compress` would produce at those bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from .precision import MAX_BITS
from .thresholds import classification_error

VERDICTS = ("conservative", "tight", "optimistic")


def _clamp(bits: int) -> int:
    return max(0, min(MAX_BITS, int(bits)))


@torch.no_grad()
def precision_sensitivity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    thresholds: float | Mapping[str, float] | None = None,
    ks: Sequence[int] = (1, 2, 3, 4),
    *,
    tolerance: float = 0.1,
    bits_reduce: str = "mean",
    variance_scale: float = 1.0,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
) -> dict[str, Any]:
    """Per-layer error when that layer alone is rounded to its inferred bits − k and + k.

    `model`: a trained Bayesian model; `thresholds`, `example_input`: as for `compress` (a model that
    is not an `nn.Sequential` chain needs the example input). Bits are clamped to
    0..23 (`clamped` says when). Returns a JSON-ready dict::

        {"ks": [...], "tolerance": 0.1, "error_unrounded": e, "error_inferred": e,
         "layers": {name: {"inferred_bits": T, "error_layer_unrounded": e, "cost_inferred": e,
                           "minus": [{"k", "bits", "clamped", "error", "delta"}, ...],
                           "plus": [...], "verdict": ..., "reason": ...}}}

    `delta` is the error minus error_inferred (percentage points). The data should be a validation
    split when the answer feeds a decision; the test set is fine for a report.
    """
    from . import compress, graph_shrinker, shrink

    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be ≥ 0, got {tolerance}")
    base = compress(model, thresholds, round_weights=False, bits_reduce=bits_reduce, variance_scale=variance_scale,
                    example_input=example_input)
    inferred = dict(base.bits)
    if isinstance(base.model, fx.GraphModule):  # compressed through its graph: rebuild that decision
        keeps = {n: lm.group_keep for n, lm in base.masks.items() if lm.group_keep is not None}
        build = graph_shrinker(model, keeps, example_input=example_input)
    else:
        def build(bits: Mapping[str, int]) -> nn.Module:
            return shrink(model, base.masks, bits)

    def error(bits: Mapping[str, int]) -> float:
        return classification_error(build(dict(bits)), x, y)

    err_unrounded = classification_error(base.model, x, y)
    err_inferred = error(inferred)
    layers: dict[str, Any] = {}
    for name, b in inferred.items():
        others = {n: v for n, v in inferred.items() if n != name}
        err_free = error(others)
        entry: dict[str, Any] = {"inferred_bits": b, "error_layer_unrounded": err_free,
                                 "cost_inferred": err_inferred - err_free}
        for side, sign in (("minus", -1), ("plus", 1)):
            rows = []
            for k in ks:
                want = b + sign * k
                got = _clamp(want)
                e = error(dict(others, **{name: got}))
                rows.append({"k": k, "bits": got, "clamped": got != want, "error": e, "delta": e - err_inferred})
            entry[side] = rows
        one_less = _clamp(b - 1)
        known = [r["error"] for r in entry["minus"] if r["bits"] == one_less]
        if one_less == b:
            cost_minus1 = 0.0
        else:
            cost_minus1 = (known[0] if known else error(dict(others, **{name: one_less}))) - err_inferred
        entry["cost_minus1"] = cost_minus1
        if entry["cost_inferred"] > tolerance:
            entry["verdict"] = "optimistic"
            entry["reason"] = (f"rounding to the inferred {b} bits costs {entry['cost_inferred']:.2f} points "
                               f"> {tolerance:g} against this layer unrounded")
        elif one_less != b and cost_minus1 <= tolerance:
            entry["verdict"] = "conservative"
            entry["reason"] = f"{one_less} bits (one fewer) cost only {cost_minus1:+.2f} points ≤ {tolerance:g}"
        else:
            entry["verdict"] = "tight"
            entry["reason"] = ("already at 0 bits" if one_less == b else
                               f"{one_less} bits cost {cost_minus1:+.2f} points > {tolerance:g}; the inferred bits cost "
                               f"{entry['cost_inferred']:+.2f}")
        layers[name] = entry
    return {"ks": ks, "tolerance": tolerance, "error_unrounded": err_unrounded, "error_inferred": err_inferred,
            "bits_reduce": bits_reduce, "variance_scale": variance_scale, "n": len(x), "layers": layers}


__all__ = ["VERDICTS", "precision_sensitivity"]
