"""A stream: one integer array coded with one coder, framed as (coder id, table bytes, payload bytes).

`encode_stream` codes an array with a named coder, or with whichever makes the fewest bytes ("auto",
tables included); `decode_stream` validates the table against the symbol count and the payload against
the table, raises `CodecError` on any inconsistency, and bounds every loop by the size of its input.

Coder ids: 0 fixed width, 1 canonical Huffman (files of 0.1.0; read only, `canonical_huffman`), 2 ANS,
3 Huffman (constriction). The table of fixed width is the zigzag varint of the minimum and one width byte;
the others start with the sorted alphabet (its size, the zigzag first value, then the gaps between
successive values less one, all varints) followed by 5-bit code lengths (Huffman) or varint counts (ANS).
The coders themselves are in `codec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import canonical_huffman
from .codec import (
    MAX_CODE_LENGTH,
    MAX_FIXED_WIDTH,
    CodecError,
    ans_decode,
    ans_encode,
    fixed_decode,
    fixed_encode,
    fixed_width,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    pack_lengths,
    read_uvarint,
    unpack_lengths,
    unzigzag,
    write_uvarint,
    zigzag,
)

CODER_FIXED = 0
CODER_CANONICAL_HUFFMAN = 1
CODER_ANS = 2
CODER_HUFFMAN = 3
CODER_NAMES = {CODER_FIXED: "fixed", CODER_CANONICAL_HUFFMAN: "huffman-0.1", CODER_ANS: "ans",
               CODER_HUFFMAN: "huffman"}
#: what `encode_stream` writes: a coder's name, or "auto"
CODERS = ("auto", "ans", "huffman", "fixed")


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


def _read_counts(table: bytes | memoryview, pos: int, k: int, n: int) -> np.ndarray:
    end = len(table)
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
    return np.asarray(counts, dtype=np.float64)


def encode_stream(values: np.ndarray, coder: str = "auto") -> Stream:
    """Code the int64 array with "huffman", "ans", "fixed" or "auto" (whichever makes the fewest bytes).

    "huffman" raises ValueError for a stream whose Huffman tree is deeper than 31 bits; "auto" then skips it.
    """
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if coder == "auto":
        options = [encode_stream(values, "fixed"), encode_stream(values, "ans")]
        try:
            options.append(encode_stream(values, "huffman"))
        except ValueError:
            pass
        return min(options, key=lambda s: (s.nbytes, s.coder))
    n = values.size
    if coder == "fixed":
        lo = int(values.min()) if n else 0
        width = fixed_width((int(values.max()) if n else 0) - lo)
        table = bytearray()
        write_uvarint(table, zigzag(lo))
        table.append(width)
        return Stream(CODER_FIXED, bytes(table), fixed_encode(values, lo, width), n, n * width)
    alphabet, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    table = _alphabet_table(alphabet)
    if coder == "huffman":
        lengths = huffman_code_lengths(counts)
        if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
            raise ValueError(f"a Huffman code for this stream needs codes of {int(lengths.max())} bits (at most "
                             f"{MAX_CODE_LENGTH} are stored); use 'ans'")
        payload, nbits = huffman_encode(inverse, lengths)
        return Stream(CODER_HUFFMAN, bytes(table + pack_lengths(lengths)), payload, n, nbits)
    if coder == "ans":
        for c in counts.tolist():
            write_uvarint(table, c)
        payload = ans_encode(inverse, counts)
        return Stream(CODER_ANS, bytes(table), payload, n, 8 * len(payload))
    raise ValueError(f"coder must be one of {', '.join(CODERS)}; got {coder!r}")


def _decode_fixed(table: bytes | memoryview, payload: bytes | memoryview, n: int) -> np.ndarray:
    u, pos = read_uvarint(table, 0, len(table))
    if pos + 1 != len(table):
        raise CodecError("fixed-width table must be a varint and one width byte")
    width, minimum = table[pos], unzigzag(u)
    if width > MAX_FIXED_WIDTH or not -(1 << 63) <= minimum < 1 << 63:
        raise CodecError(f"fixed-width table out of range (width {width})")
    return fixed_decode(payload, minimum, width, n)


def decode_stream(coder: int, table: bytes | memoryview, payload: bytes | memoryview, n: int) -> np.ndarray:
    """The int64 array of `n` values that `encode_stream` (or 0.1.0) coded; `CodecError` if anything is wrong."""
    if n < 0:
        raise CodecError("negative symbol count")
    if coder == CODER_FIXED:
        return _decode_fixed(table, payload, n)
    if coder not in CODER_NAMES:
        raise CodecError(f"unknown coder id {coder}")
    alphabet, pos = _read_alphabet(table, n)
    k = alphabet.size
    if coder == CODER_ANS:
        idx = ans_decode(payload, _read_counts(table, pos, k, n), n)
    elif coder == CODER_HUFFMAN:
        idx = huffman_decode(payload, unpack_lengths(table[pos:], k), n)
    else:
        idx = canonical_huffman.decode(payload, unpack_lengths(table[pos:], k), n)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise CodecError("decoded symbol outside the alphabet")
    return alphabet[idx] if idx.size else np.zeros(0, dtype=np.int64)
