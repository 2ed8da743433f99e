"""Entropy coding and Deep Compression's sparse index, on numpy arrays and bytes.

Pure functions, no torch, no files. `packed.py` builds the `.bcz` file format on top of them.

Contents
--------

* **Quantised weights as integers.** A layer rounded to mantissa width T holds multiples of
  δ = 2^−T; `quantize` returns q = w/δ as int64 (and refuses weights that are not such multiples),
  `dequantize` maps back exactly.
* **Sparse index** (Han, Mao & Dally, "Deep Compression", ICLR 2016, §3 and Fig. 2). The weight is
  flattened row-major (a Linear weight (out, in) row by row; a Conv2d weight (out, in, kh, kw) filter
  by filter) and stored as a list of entries (value, gap): `gap` is the number of zero positions
  skipped since the previous entry, kept in `index_bits` bits, i.e. 0 … 2^b − 1. When more than
  2^b − 1 zeros separate two non-zero weights, *filler* entries (value 0, gap 2^b − 1) are inserted,
  each covering 2^b positions, as in Han et al. Trailing zeros need no entry: the decoder knows the
  shape. Han's defaults: b = 5 for fully connected layers, 8 for convolutions.
* **Canonical Huffman code** with lengths limited to `MAX_CODE_LENGTH` (24) bits. Only the code
  lengths are stored; the codes follow from them (shorter codes first, ties in symbol order). A
  one-symbol alphabet gets a length-0 code (nothing is stored per symbol).
* **Asymmetric numeral systems (ANS)** via the `constriction` library (its `AnsCoder` with a static
  `Categorical` model built from the stored symbol counts): a static two-pass coder that gets within
  a fraction of a percent of the entropy, where Huffman loses up to one bit per symbol.
* **Fixed width**: q − min(q) in ⌈log2(max − min + 1)⌉ bits each; the fallback for streams whose
  values are nearly all distinct (a layer kept at 20+ bits), where any code table costs more than it
  saves.
* **Shannon entropy** Σ_s −c_s·log2(c_s/n) of a symbol array in bits: the floor for any static
  (two-pass, order-0) coder of those symbols, tables not counted.

A *stream* is one integer array coded one of these ways: ``(coder id, table bytes, payload bytes)``.
`encode_stream`/`decode_stream` are the entry points; decoding validates everything against the
given lengths and raises `CodecError` on any inconsistency, and every loop is bounded by the size of
its input.

Bit order: all packed bit strings are most-significant-bit first within each byte, zero-padded to a
whole byte. Integers in tables are LEB128 varints (7 bits per byte, low group first, high bit =
"more follows"); signed values are zigzag-mapped first (0, −1, 1, −2, … → 0, 1, 2, 3, …).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CODE_LENGTH = 24
#: index bits Han et al. used: 5 for fully connected layers, 8 for convolutions
INDEX_BITS_LINEAR = 5
INDEX_BITS_CONV = 8
MAX_INDEX_BITS = 16
MAX_FIXED_WIDTH = 64

CODER_FIXED = 0
CODER_HUFFMAN = 1
CODER_ANS = 2
CODER_NAMES = {CODER_FIXED: "fixed", CODER_HUFFMAN: "huffman", CODER_ANS: "ans"}
CODER_IDS = {v: k for k, v in CODER_NAMES.items()}

_MAX_VARINT_BYTES = 10
_LOOKUP_BITS = 10  # first-level Huffman decoding table: 2^10 entries


class CodecError(ValueError):
    """A coded stream that is inconsistent, truncated or otherwise cannot be decoded."""


# ----------------------------------------------------------------------------------------------------------------
# varints


def zigzag(v: int) -> int:
    """Signed → unsigned: 0, −1, 1, −2, 2 … → 0, 1, 2, 3, 4 …"""
    return 2 * v if v >= 0 else -2 * v - 1


def unzigzag(u: int) -> int:
    return u >> 1 if u % 2 == 0 else -((u + 1) >> 1)


def write_uvarint(out: bytearray, v: int) -> None:
    """Append the unsigned LEB128 encoding of `v` (< 2^70) to `out`."""
    if v < 0 or v >= 1 << (7 * _MAX_VARINT_BYTES):
        raise ValueError(f"varint out of range: {v}")
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def read_uvarint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; never reads at or past `end`."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise CodecError("varint runs past the end of its table")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos
    raise CodecError("varint longer than 10 bytes")


# ----------------------------------------------------------------------------------------------------------------
# quantised weights


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


# ----------------------------------------------------------------------------------------------------------------
# Deep Compression sparse index


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


# ----------------------------------------------------------------------------------------------------------------
# entropy


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon information n·H of the symbol array, in bits: Σ_s −c_s·log2(c_s / n)."""
    _, counts = np.unique(np.asarray(symbols).reshape(-1), return_counts=True)
    return counts_entropy_bits(counts)


def counts_entropy_bits(counts: np.ndarray) -> float:
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size <= 1:
        return 0.0
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Huffman


def huffman_code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Code length per symbol (int64) of an optimal prefix code, limited to `max_length` bits.

    Counts must be positive. One symbol gets length 0. If the optimal (Huffman) tree is deeper than
    `max_length`, the long codes are cut to `max_length` and the Kraft sum is restored by lengthening
    the least probable of the longest remaining codes, then any slack is given back to the most
    probable codes (near-optimal; only needed for very skewed distributions of > 100k symbols).
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    k = counts.size
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if np.any(counts <= 0):
        raise ValueError("Huffman counts must be positive")
    if k == 1:
        return np.zeros(1, dtype=np.int64)
    if k > 1 << max_length:
        raise ValueError(f"{k} symbols do not fit a prefix code of at most {max_length} bits")
    # two-queue Huffman construction over the leaves sorted by count: O(k) after the sort
    order = np.argsort(counts, kind="stable")
    weight = [int(c) for c in counts[order]] + [0] * (k - 1)
    parent = [0] * (2 * k - 1)
    leaf, node = 0, k
    for new in range(k, 2 * k - 1):
        picked = []
        for _ in range(2):
            if leaf < k and (node >= new or weight[leaf] <= weight[node]):
                picked.append(leaf)
                leaf += 1
            else:
                picked.append(node)
                node += 1
        weight[new] = weight[picked[0]] + weight[picked[1]]
        parent[picked[0]] = parent[picked[1]] = new
    depth = [0] * (2 * k - 1)
    for i in range(2 * k - 3, -1, -1):  # parents have larger indices than their children
        depth[i] = depth[parent[i]] + 1
    lengths = np.zeros(k, dtype=np.int64)
    lengths[order] = depth[:k]
    if int(lengths.max()) > max_length:
        lengths = _limit_lengths(lengths, counts, max_length)
    return lengths


def _limit_lengths(lengths: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    lengths = np.minimum(lengths, limit)
    budget = 1 << limit
    kraft = int(np.sum(np.left_shift(1, limit - lengths)))  # Σ 2^(limit − l), must be ≤ 2^limit
    while kraft > budget:  # at most `limit` passes: a code shorter than `limit` exists while kraft > budget
        for length in range(limit - 1, 0, -1):  # lengthen the longest codes first, rarest symbols first
            idx = np.flatnonzero(lengths == length)
            for i in idx[np.argsort(counts[idx], kind="stable")]:
                if kraft <= budget:
                    break
                lengths[i] += 1
                kraft -= 1 << (limit - length - 1)
    for i in np.argsort(-counts, kind="stable"):  # give the slack back to the frequent symbols
        while lengths[i] > 1 and kraft + (1 << (limit - int(lengths[i]))) <= budget:
            kraft += 1 << (limit - int(lengths[i]))
            lengths[i] -= 1
    return lengths


def kraft_sum(lengths: np.ndarray) -> float:
    """Σ 2^−l over the codes (≤ 1 for every prefix code; a length-0 code counts 1)."""
    return float(np.sum(np.ldexp(1.0, -np.asarray(lengths, dtype=np.int64))))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code value per symbol (uint64): shorter codes first, equal lengths in symbol order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    code, prev = 0, 0
    for i in np.lexsort((np.arange(lengths.size), lengths)):
        length = int(lengths[i])
        if length == 0:
            continue
        code <<= length - prev
        prev = length
        codes[i] = code
        code += 1
    return codes


def huffman_bits(symbols: np.ndarray) -> int:
    """Payload bits of the canonical Huffman coding of `symbols` (code table not counted)."""
    _, counts = np.unique(np.asarray(symbols).reshape(-1), return_counts=True)
    if counts.size == 0:
        return 0
    return int(np.dot(counts, huffman_code_lengths(counts)))


def huffman_encode(indices: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """(payload, number of bits) of the symbol indices under the canonical code of `lengths`."""
    indices = np.asarray(indices, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    lens = lengths[indices]
    total = int(lens.sum())
    if total == 0:
        return b"", 0
    vals = codes[indices]
    starts = np.cumsum(lens) - lens
    bits = np.zeros(total, dtype=np.uint8)
    for j in range(int(lens.max())):
        sel = lens > j
        shift = (lens[sel] - 1 - j).astype(np.uint64)
        bits[starts[sel] + j] = ((vals[sel] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes(), total


def huffman_decode(payload: bytes, lengths: np.ndarray, n: int) -> np.ndarray:
    """n symbol indices from the canonical-Huffman `payload`; the payload must end within its last byte."""
    lengths = np.asarray(lengths, dtype=np.int64)
    k = lengths.size
    if n == 0:
        if payload:
            raise CodecError("Huffman payload present for an empty stream")
        return np.zeros(0, dtype=np.int64)
    if k == 0:
        raise CodecError("Huffman stream with symbols but an empty alphabet")
    if k == 1:
        if lengths[0] != 0 or payload:
            raise CodecError("a one-symbol Huffman code must have length 0 and no payload")
        return np.zeros(n, dtype=np.int64)
    _check_lengths(lengths)
    nbits = 8 * len(payload)
    min_len, max_len = int(lengths.min()), int(lengths.max())
    if n * min_len > nbits:
        raise CodecError(f"Huffman payload of {nbits} bits cannot hold {n} symbols of ≥ {min_len} bits")
    codes = canonical_codes(lengths)
    # first-level table: the next _LOOKUP_BITS bits → symbol·32 + length, for codes that short
    tb = min(max_len, _LOOKUP_BITS)
    table = np.zeros(1 << tb, dtype=np.int64)
    for s in np.flatnonzero(lengths <= tb):
        length = int(lengths[s])
        lo = int(codes[s]) << (tb - length)
        table[lo : lo + (1 << (tb - length))] = s * 32 + length
    # canonical scan for longer codes: first code, count and offset (into the sorted symbols) per length
    order = np.lexsort((np.arange(k), lengths))
    sorted_syms = order.tolist()
    count = [0] * (max_len + 2)
    for length in lengths.tolist():
        count[length] += 1
    first = [0] * (max_len + 2)
    offset = [0] * (max_len + 2)
    code = off = 0
    for length in range(1, max_len + 1):
        code = (code + count[length - 1]) << 1 if length > 1 else 0
        first[length] = code
        offset[length] = off
        off += count[length]
    raw = np.frombuffer(bytes(payload) + b"\0\0\0\0", dtype=np.uint8).astype(np.uint32)
    # 32 bits starting at each byte: the next 24 bits from any bit position are inside one word
    words = ((raw[:-3] << 24) | (raw[1:-2] << 16) | (raw[2:-1] << 8) | raw[3:]).tolist()
    tab = table.tolist()
    long_lengths = range(tb + 1, max_len + 1)
    out = [0] * n
    pos = 0
    drop = 24 - tb
    for i in range(n):
        peek = (words[pos >> 3] >> (8 - (pos & 7))) & 0xFFFFFF
        entry = tab[peek >> drop]
        if entry:
            out[i] = entry >> 5
            pos += entry & 31
        else:
            for length in long_lengths:
                c = (peek >> (24 - length)) - first[length]
                if c < count[length]:
                    out[i] = sorted_syms[offset[length] + c]
                    pos += length
                    break
            else:
                raise CodecError("invalid Huffman code word")
        if pos > nbits:
            raise CodecError("Huffman payload ends in the middle of a code word")
    if (pos + 7) // 8 != len(payload):
        raise CodecError(f"Huffman payload has {len(payload)} bytes but its {n} symbols use {pos} bits")
    return np.asarray(out, dtype=np.int64)


def _check_lengths(lengths: np.ndarray) -> None:
    if lengths.size > 1 and (int(lengths.min()) < 1 or int(lengths.max()) > MAX_CODE_LENGTH):
        raise CodecError(f"Huffman code lengths must be in 1..{MAX_CODE_LENGTH}")
    if lengths.size > 1 and int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - lengths))) > 1 << MAX_CODE_LENGTH:
        raise CodecError("Huffman code lengths violate the Kraft inequality")


def _pack_lengths(lengths: np.ndarray) -> bytes:
    """5 bits per code length, MSB first."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    bits = np.unpackbits(lengths[:, None], axis=1)[:, 3:]
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_lengths(buf: bytes | memoryview, k: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: 5 * k].reshape(k, 5)
    return (bits.astype(np.int64) * np.array([16, 8, 4, 2, 1])).sum(axis=1)


# ----------------------------------------------------------------------------------------------------------------
# ANS (constriction)


def ans_available() -> bool:
    """True when the `constriction` package (the ANS coder) can be imported."""
    try:
        _constriction()
    except CodecError:
        return False
    return True


def _constriction():
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CodecError("the ANS coder needs the 'constriction' package (pip install constriction)") from exc
    return constriction


def _ans_model(counts: np.ndarray):
    c = _constriction()
    probs = np.asarray(counts, dtype=np.float64)
    return c.stream.model.Categorical(probs / probs.sum(), perfect=False)


def ans_encode(indices: np.ndarray, counts: np.ndarray) -> bytes:
    """ANS payload (little-endian uint32 words) of the symbol indices under the static model `counts`."""
    if len(counts) <= 1:
        return b""
    c = _constriction()
    coder = c.stream.stack.AnsCoder()
    coder.encode_reverse(np.asarray(indices, dtype=np.int32), _ans_model(counts))
    return coder.get_compressed().astype("<u4").tobytes()


def ans_decode(payload: bytes | memoryview, counts: np.ndarray, n: int) -> np.ndarray:
    """n symbol indices from an `ans_encode` payload; the payload must be consumed exactly."""
    if n == 0 or len(counts) <= 1:
        if payload:
            raise CodecError("ANS payload present for a stream that needs none")
        return np.zeros(n, dtype=np.int64)
    if len(payload) % 4:
        raise CodecError("ANS payload is not a whole number of 32-bit words")
    c = _constriction()
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        coder = c.stream.stack.AnsCoder(words)
        out = coder.decode(_ans_model(counts), n)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CodecError(f"ANS payload cannot be decoded: {exc}") from exc
    if not empty:
        raise CodecError("ANS payload holds more data than its symbols")
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# fixed width


def _width(span: int) -> int:
    return int(span).bit_length()


def fixed_encode(values: np.ndarray, minimum: int, width: int) -> bytes:
    v = (np.asarray(values, dtype=np.int64) - minimum).astype(np.uint64)
    if width == 0 or v.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((v[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def fixed_decode(payload: bytes | memoryview, minimum: int, width: int, n: int) -> np.ndarray:
    need = (n * width + 7) // 8
    if len(payload) != need:
        raise CodecError(f"fixed-width payload has {len(payload)} bytes, {n} values of {width} bits need {need}")
    if width == 0 or n == 0:
        return np.full(n, minimum, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[: n * width].reshape(n, width)
    acc = np.zeros(n, dtype=np.uint64)
    for j in range(width):
        acc = (acc << np.uint64(1)) | bits[:, j].astype(np.uint64)
    out = acc.astype(np.int64) + np.int64(minimum)  # wraps like the int64 arithmetic that made it
    return out


# ----------------------------------------------------------------------------------------------------------------
# streams


@dataclass(frozen=True)
class Stream:
    """One coded integer array: coder id, its table and payload, and the payload size in bits."""

    coder: int
    table: bytes
    payload: bytes
    n: int
    payload_bits: int

    @property
    def nbytes(self) -> int:
        return len(self.table) + len(self.payload)

    @property
    def coder_name(self) -> str:
        return CODER_NAMES[self.coder]


def _alphabet_table(alphabet: np.ndarray) -> bytearray:
    out = bytearray()
    write_uvarint(out, int(alphabet.size))
    prev = None
    for v in alphabet.tolist():
        write_uvarint(out, zigzag(v) if prev is None else v - prev - 1)
        prev = v
    return out


def _read_alphabet(table: bytes | memoryview, n: int) -> tuple[np.ndarray, int]:
    end = len(table)
    k, pos = read_uvarint(table, 0, end)
    if k > n or k > end:  # every symbol occurs, every symbol takes ≥ 1 table byte
        raise CodecError(f"alphabet of {k} symbols for {n} values in a {end}-byte table")
    if n > 0 and k == 0:
        raise CodecError("empty alphabet for a non-empty stream")
    values = []
    prev = 0
    for i in range(k):
        u, pos = read_uvarint(table, pos, end)
        prev = unzigzag(u) if i == 0 else prev + u + 1
        if not -(1 << 63) <= prev < 1 << 63:
            raise CodecError("alphabet value out of the int64 range")
        values.append(prev)
    return np.asarray(values, dtype=np.int64), pos


def encode_stream(values: np.ndarray, coder: str = "auto") -> Stream:
    """Code the int64 array with "huffman", "ans", "fixed" or "auto" (whichever makes fewest bytes)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if coder == "auto":
        options = [encode_stream(values, "fixed")]
        try:
            options.append(encode_stream(values, "huffman"))
        except ValueError:  # more distinct values than a 24-bit code can hold
            pass
        if ans_available():
            options.append(encode_stream(values, "ans"))
        return min(options, key=lambda s: (s.nbytes, -s.coder))
    n = values.size
    if coder == "fixed":
        lo = int(values.min()) if n else 0
        hi = int(values.max()) if n else 0
        width = _width(hi - lo)
        table = bytearray()
        write_uvarint(table, zigzag(lo))
        table.append(width)
        return Stream(CODER_FIXED, bytes(table), fixed_encode(values, lo, width), n, n * width)
    alphabet, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    table = _alphabet_table(alphabet)
    if coder == "huffman":
        lengths = huffman_code_lengths(counts)
        table += _pack_lengths(lengths)
        payload, nbits = huffman_encode(inverse, lengths)
        return Stream(CODER_HUFFMAN, bytes(table), payload, n, nbits)
    if coder == "ans":
        _constriction()
        for c in counts.tolist():
            write_uvarint(table, c)
        payload = ans_encode(inverse, counts)
        return Stream(CODER_ANS, bytes(table), payload, n, 8 * len(payload))
    raise ValueError(f"coder must be 'auto', 'ans', 'huffman' or 'fixed', got {coder!r}")


def decode_stream(coder: int, table: bytes | memoryview, payload: bytes | memoryview, n: int) -> np.ndarray:
    """The int64 array of `n` values that `encode_stream` coded; `CodecError` if anything is inconsistent."""
    if n < 0:
        raise CodecError("negative symbol count")
    end = len(table)
    if coder == CODER_FIXED:
        u, pos = read_uvarint(table, 0, end)
        if pos + 1 != end:
            raise CodecError("fixed-width table must be a varint and one width byte")
        width = table[pos]
        minimum = unzigzag(u)
        if width > MAX_FIXED_WIDTH or not -(1 << 63) <= minimum < 1 << 63:
            raise CodecError(f"fixed-width table out of range (width {width})")
        return fixed_decode(payload, minimum, width, n)
    if coder not in (CODER_HUFFMAN, CODER_ANS):
        raise CodecError(f"unknown coder id {coder}")
    alphabet, pos = _read_alphabet(table, n)
    k = alphabet.size
    if coder == CODER_HUFFMAN:
        if end - pos != (5 * k + 7) // 8:
            raise CodecError(f"Huffman table: {end - pos} bytes of code lengths for {k} symbols")
        lengths = _unpack_lengths(table[pos:], k)
        idx = huffman_decode(payload, lengths, n)
    else:
        counts = []
        for _ in range(k):
            c, pos = read_uvarint(table, pos, end)
            if c < 1:
                raise CodecError("ANS table: a symbol count of zero")
            counts.append(c)
        if pos != end:
            raise CodecError("ANS table has trailing bytes")
        if sum(counts) != n:
            raise CodecError(f"ANS table counts {sum(counts)} symbols, stream has {n}")
        idx = ans_decode(payload, np.asarray(counts, dtype=np.float64), n)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise CodecError("decoded symbol outside the alphabet")
    return alphabet[idx] if idx.size else np.zeros(0, dtype=np.int64)


def stream_bits_summary(values: np.ndarray) -> dict[str, float]:
    """Payload bits under each coder and the entropy floor, for one symbol array (tables excluded)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    out = {"n": int(values.size), "entropy_bits": entropy_bits(values), "huffman_bits": huffman_bits(values)}
    if values.size:
        out["fixed_bits"] = int(values.size) * _width(int(values.max()) - int(values.min()))
    else:
        out["fixed_bits"] = 0
    return out


__all__ = [
    "CODER_ANS",
    "CODER_FIXED",
    "CODER_HUFFMAN",
    "CODER_IDS",
    "CODER_NAMES",
    "CodecError",
    "INDEX_BITS_CONV",
    "INDEX_BITS_LINEAR",
    "MAX_CODE_LENGTH",
    "Stream",
    "ans_available",
    "ans_decode",
    "ans_encode",
    "canonical_codes",
    "counts_entropy_bits",
    "decode_stream",
    "default_index_bits",
    "dequantize",
    "encode_stream",
    "entropy_bits",
    "huffman_bits",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "kraft_sum",
    "quantize",
    "sparse_decode",
    "sparse_encode",
]
