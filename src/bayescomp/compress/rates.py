"""Every compression rate bayescomp reports, computed here and nowhere else.

Counts are of weights only: biases and batch-norm parameters are excluded, as in the paper.

* weights kept: Σ_l (weights of the dense pruned layer l) and its share of the original total, in %
  (the paper's |w≠0|/|w|).
* architecture CR ("compression after pruning"): original weights / weights of the dense pruned
  architecture.
* fast-prediction CR ("compression after precision reduction"): 32·N_orig / Σ_l n_l·b_l, with n_l
  the weights of the dense pruned layer l and b_l the bits stored per weight: 1 + E + T_l (sign,
  exponent, mantissa) under the paper code's accounting (``"code"``), or T_l alone (``"paper"``,
  the reading that reproduces the figures printed in the paper's Table 1). A layer that is not
  quantised counts 32 bits per weight. The weights stay dense (no index overhead), hence "fast".
* maximum-compression CR (`cr_max`, the paper's "maximum compression"): 32·N_orig / Σ_l bits_l with
  bits_l the size of layer l in Deep Compression's storage (Han et al. 2016): the non-zero quantised
  weights (plus filler entries) and their relative-index gaps, each Huffman-coded; code tables and
  biases are not counted, as in Han et al. and the papers that copy their accounting. The bit counts
  come from `bayescomp.io.codec` / `bayescomp.io.packed`; this module only divides.
* file CR (`cr_file`): 32·N_orig / (8·bytes of the packed file): everything the file holds (header,
  architecture, code tables, biases, checksum) counts. The honest number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ACCOUNTINGS = ("code", "paper")


@dataclass(frozen=True)
class LayerCount:
    """Weights of one layer before and after pruning, and its mantissa bits (None: kept at 32-bit float)."""

    name: str
    weights_total: int
    weights_kept: int
    bits: int | None


def stored_bits(bits: int | None, exponent_bits: int, accounting: str = "code") -> int:
    """Bits stored per weight of a layer under the given accounting."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"bit accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    if bits is None:
        return 32
    return 1 + exponent_bits + bits if accounting == "code" else bits


def rates(layers: Sequence[LayerCount], exponent_bits: int, accounting: str = "code") -> dict[str, float | int]:
    """weights_total, weights_kept, weights_kept_pct, cr_architecture and cr_fast for a pruned network."""
    total = sum(lc.weights_total for lc in layers)
    kept = sum(lc.weights_kept for lc in layers)
    if total <= 0 or kept <= 0:
        raise ValueError("rates need at least one weight before and after pruning")
    stored = sum(lc.weights_kept * stored_bits(lc.bits, exponent_bits, accounting) for lc in layers)
    return {
        "weights_total": total,
        "weights_kept": kept,
        "weights_kept_pct": 100.0 * kept / total,
        "cr_architecture": total / kept,
        "cr_fast": 32.0 * total / stored,
    }


@dataclass(frozen=True)
class CodedBits:
    """Bits one layer's weights take in Deep Compression's sparse storage.

    `weight_bits`: the Huffman-coded stored weights (non-zeros and filler zeros); `gap_bits`: the
    Huffman-coded relative-index gaps. A layer kept as float32 counts 32 bits per stored weight in
    `weight_bits` and 0 in `gap_bits`.
    """

    name: str
    weight_bits: int
    gap_bits: int


def cr_max(weights_total: int, layers: Sequence[CodedBits]) -> float:
    """The "maximum compression" rate: 32·weights_total / Σ_l (weight_bits_l + gap_bits_l).

    `weights_total` is the original network's weight count (biases excluded), as in `rates`.
    """
    if weights_total <= 0:
        raise ValueError("cr_max needs a positive original weight count")
    bits = sum(lc.weight_bits + lc.gap_bits for lc in layers)
    if bits <= 0:
        raise ValueError("cr_max needs at least one stored bit")
    return 32.0 * weights_total / bits


def cr_file(weights_total: int, file_bytes: int) -> float:
    """Compression rate of a real file: 32·weights_total / (8·file_bytes), i.e. float32 weights vs the file."""
    if weights_total <= 0 or file_bytes <= 0:
        raise ValueError("cr_file needs a positive weight count and file size")
    return 32.0 * weights_total / (8.0 * file_bytes)
