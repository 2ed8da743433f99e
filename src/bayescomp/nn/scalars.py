"""Cached 0-dim constants for the training step's arithmetic.

In PyTorch (2.13, CPU) a Python number used as an operand (`0.5 * t`, `t + 1.0`, `t / n`) is wrapped
in a double tensor and converted to the operand's dtype on every call: four extra dispatched
operations (to, _to_copy, empty_strided, copy_) per arithmetic operation, and as many again in its
backward. A Bayesian training step of LeNet-300-100 made ~90 such conversions (~190 for the
horseshoe), against ~0 for the plain step; the operations themselves act on a few hundred numbers,
so the conversions, not the arithmetic, were the cost. `const(v, like)` returns a cached 0-dim
tensor of `like`'s dtype and device, which the operation uses as is. Scalar *parameters* (`alpha=`,
`value=`, `clamp_min_(v)`) are not wrapped and need no constant.

Never modify a returned constant in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

_cache: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def const(value: float, like: Tensor) -> Tensor:
    """A cached 0-dim tensor holding `value`, in `like`'s dtype and on its device."""
    key = (float(value), like.dtype, like.device)
    t = _cache.get(key)
    if t is None:
        t = _cache[key] = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    return t


_vectors: dict[tuple[tuple[float, ...], torch.dtype, torch.device], Tensor] = {}


def const_vector(values: tuple[float, ...], like: Tensor) -> Tensor:
    """A cached 1-dim tensor holding `values`, in `like`'s dtype and on its device (never modify it in place)."""
    key = (tuple(float(v) for v in values), like.dtype, like.device)
    t = _vectors.get(key)
    if t is None:
        t = _vectors[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)
    return t
