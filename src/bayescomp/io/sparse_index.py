"""Quantised weights as integers, and Deep Compression's sparse index over them.

* **Quantised weights.** A layer rounded to mantissa width T holds multiples of δ = 2^−T; `quantize`
  returns q = w/δ as int64 (and refuses weights that are not such multiples), `dequantize` maps back exactly.
* **Sparse index** (Han, Mao & Dally, "Deep Compression", ICLR 2016, §3 and Fig. 2). The weight is
  flattened row-major (a Linear weight (out, in) row by row; a Conv2d weight (out, in, kh, kw) filter
  by filter) and stored as a list of entries (value, gap): `gap` is the number of zero positions
  skipped since the previous entry, kept in `index_bits` bits, i.e. 0 … 2^b − 1. When more than
  2^b − 1 zeros separate two non-zero weights, *filler* entries (value 0, gap 2^b − 1) are inserted,
  each covering 2^b positions, as in Han et al. Trailing zeros need no entry: the decoder knows the
  shape. Han's defaults: b = 5 for fully connected layers, 8 for convolutions.

The values and the gaps are then two integer streams, each entropy-coded by `io.streams`.
"""

from __future__ import annotations

import numpy as np

from .codec import CodecError

#: index bits Han et al. used: 5 for fully connected layers, 8 for convolutions
INDEX_BITS_LINEAR = 5
INDEX_BITS_CONV = 8
MAX_INDEX_BITS = 16


def quantize(weight: np.ndarray, bits: int) -> np.ndarray:
    """q = w·2^bits as int64; raises ValueError unless every w is a multiple of 2^−bits (to 1e-6 relative)."""
    if not 0 <= bits <= 62:
        raise ValueError(f"mantissa bits must be in 0..62, got {bits}")
    x = np.asarray(weight, dtype=np.float64) * float(2**bits)
    if not np.all(np.isfinite(x)):
        raise ValueError("weights must be finite to be quantised")
    q = np.rint(x)
    if np.any(np.abs(q) >= 2.0**62):
        raise ValueError("quantised weight out of the int64 range")
    err = np.abs(x - q)
    if np.any(err > 1e-6 * np.maximum(1.0, np.abs(x))):
        worst = float(err.max())
        raise ValueError(f"weights are not multiples of 2^-{bits} (off by up to {worst:.3g} steps); round them first")
    return q.astype(np.int64)


def dequantize(q: np.ndarray, bits: int) -> np.ndarray:
    """w = q·2^−bits as float32 (exact for |q| < 2^24)."""
    return (np.asarray(q, dtype=np.float64) * 2.0**-bits).astype(np.float32)


def default_index_bits(ndim: int) -> int:
    """Han et al.'s index width: 5 bits for a Linear weight (2-D), 8 for a convolution (4-D)."""
    return INDEX_BITS_LINEAR if ndim <= 2 else INDEX_BITS_CONV


def sparse_encode(q: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, gaps) of the flattened integer array `q`, with filler entries where a gap overflows.

    gaps[k] = zeros skipped since entry k − 1 (the first entry counts from position 0); a filler
    entry (value 0, gap 2^b − 1) is inserted for each run of 2^b positions a gap cannot span.
    """
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index bits must be in 1..{MAX_INDEX_BITS}, got {index_bits}")
    flat = np.asarray(q, dtype=np.int64).reshape(-1)
    pos = np.flatnonzero(flat)
    if pos.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = 1 << index_bits  # positions one entry can reach: a gap of 0 … span − 1 zeros, then itself
    skips = np.diff(pos, prepend=-1) - 1
    fillers = skips // span
    rest = skips - fillers * span
    lengths = fillers + 1
    ends = np.cumsum(lengths) - 1
    total = int(ends[-1]) + 1
    gaps = np.full(total, span - 1, dtype=np.int64)
    gaps[ends] = rest
    values = np.zeros(total, dtype=np.int64)
    values[ends] = flat[pos]
    return values, gaps


def sparse_decode(values: np.ndarray, gaps: np.ndarray, size: int, index_bits: int) -> np.ndarray:
    """The flat int64 array of length `size` that `sparse_encode` turned into (values, gaps)."""
    values = np.asarray(values, dtype=np.int64)
    gaps = np.asarray(gaps, dtype=np.int64)
    if values.shape != gaps.shape or values.ndim != 1:
        raise CodecError("sparse index: value and gap streams differ in length")
    if values.size > size:
        raise CodecError(f"sparse index: {values.size} entries for a tensor of {size} elements")
    out = np.zeros(size, dtype=np.int64)
    if values.size == 0:
        return out
    if int(gaps.min()) < 0 or int(gaps.max()) >= 1 << index_bits:
        raise CodecError(f"sparse index: gap outside 0..{(1 << index_bits) - 1}")
    positions = np.cumsum(gaps + 1) - 1
    if int(positions[-1]) >= size:
        raise CodecError(f"sparse index points past the end of a tensor of {size} elements")
    out[positions] = values
    return out
