"""Fixed-point precision read off the posterior variance of the weights (paper §5, notes §5).

The idea (bits-back / MDL): a weight whose marginal posterior variance is Var[w] cannot be known
more precisely than about √Var, so rounding it at a step comparable to its uncertainty costs
(almost) nothing. The paper's code turns that into a per-layer mantissa width:

1. per weight, the number of significand widths t ∈ {1..23} whose unit round-off 2^−t exceeds
   2·Var[w]: ``bits(w) = #{t : 2·Var[w] < 2^−t}`` = clamp(⌈−log2(2·Var[w])⌉ − 1, 0, 23)
   (Var = 0 gives 23). Note it compares the *variance*, not the standard deviation, with the step;
2. per layer, T_l = ⌈mean over the kept weights of bits(w)⌉ (`reduce="max"` is the stricter choice);
3. weights are rounded to the nearest multiple of δ_l = 2^−T_l, half up (absolute fixed point);
4. one global exponent width E for the accounting ``1 + E + T_l`` bits per stored weight (sign,
   exponent, mantissa), from the largest kept |E[w]| over the network.

The paper's exponent formula ⌈log2(log2(max|w|) + 1) + 1⌉ is −inf or NaN for max|w| ≤ 0.5; here
log2(max|w|) is clamped at 0 first, so such networks get E = 1, as a network with max|w| = 1 does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_BITS = 23  # significand width of float32


def weight_bits(variance: Tensor) -> Tensor:
    """bits(w) = #{t ∈ 1..23 : 2·Var[w] < 2^−t} for every weight (integer tensor)."""
    if torch.any(variance < 0) or not torch.all(torch.isfinite(variance)):
        raise ValueError("posterior variances must be finite and non-negative")
    v = variance.double()
    x = -torch.log2(2.0 * v)  # +inf where Var = 0
    bits = torch.ceil(x) - 1.0
    return torch.clamp(torch.nan_to_num(bits, posinf=MAX_BITS), 0, MAX_BITS).to(torch.int64)


def layer_bits(variance: Tensor, reduce: str = "mean", variance_scale: float = 1.0) -> int:
    """T_l: the mantissa width of a layer from its kept weights' marginal variances.

    `variance_scale` multiplies Var[w] first: > 1 guards against mean-field VI underestimating the
    posterior variance (fewer bits, coarser rounding), < 1 is the opposite.
    """
    if variance.numel() == 0:
        raise ValueError("a layer with no kept weights has no precision")
    if not variance_scale > 0:
        raise ValueError(f"variance_scale must be positive, got {variance_scale}")
    bits = weight_bits(variance * variance_scale).double()
    if reduce == "mean":
        value = bits.mean().item()
    elif reduce == "max":
        value = bits.max().item()
    else:
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    return int(math.ceil(value - 1e-9))


def exponent_bits(max_abs: float) -> int:
    """E = ⌈log2(max(log2(max|w|), 0) + 1) + 1⌉: 1 for max|w| ≤ 1, 2 for 2, 4 for 10."""
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"max |w| must be finite and non-negative, got {max_abs}")
    lg = math.log2(max_abs) if max_abs > 0 else 0.0
    return int(math.ceil(math.log2(max(lg, 0.0) + 1.0) + 1.0))


def round_to_bits(weight: Tensor, bits: int) -> Tensor:
    """Round to the nearest multiple of 2^−bits, half up: ⌊w/δ + ½⌋·δ."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 0..{MAX_BITS}, got {bits}")
    delta = 2.0 ** -bits
    return (torch.floor(weight.double() / delta + 0.5) * delta).to(weight.dtype)
