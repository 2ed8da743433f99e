"""The decoder of canonical Huffman streams, coder id 1, which bayescomp 0.1.0 wrote (read only).

Files written by 0.1.0 with ``coder="huffman"`` (or "auto", where Huffman won a stream) hold such streams;
newer files code Huffman streams with constriction (`codec.huffman_encode`, coder id 3). The table is the
same for both (the alphabet, then 5-bit code lengths, at most `MAX_LENGTH` = 24 bits); the payload here is
the canonical code of those lengths (shorter codes first, equal lengths in symbol order), most significant
bit first within each byte, zero-padded to a whole byte.
"""

from __future__ import annotations

import numpy as np

from .codec import CodecError

MAX_LENGTH = 24
_TABLE_BITS = 10  # codes this short are decoded by one lookup of the next 10 bits


def canonical_codes(lengths: np.ndarray) -> list[int]:
    """Canonical code value per symbol: shorter codes first, equal lengths in symbol order."""
    codes = [0] * len(lengths)
    code, prev = 0, 0
    for i in np.lexsort((np.arange(len(lengths)), lengths)).tolist():
        length = int(lengths[i])
        if length:
            code <<= length - prev
            codes[i], prev = code, length
            code += 1
    return codes


def decode(payload: bytes | memoryview, lengths: np.ndarray, n: int) -> np.ndarray:
    """n symbol indices from a 0.1.0 canonical-Huffman payload; `CodecError` on any inconsistency."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if n == 0 or lengths.size == 1:
        if payload or (lengths.size == 1 and lengths[0] != 0):
            raise CodecError("a stream of no symbols, or of one, has a length-0 code and no payload")
        return np.zeros(n, dtype=np.int64)
    if lengths.size == 0 or int(lengths.min()) < 1 or int(lengths.max()) > MAX_LENGTH:
        raise CodecError(f"Huffman code lengths must be in 1..{MAX_LENGTH}")
    if sum(1 << (MAX_LENGTH - length) for length in lengths.tolist()) > 1 << MAX_LENGTH:
        raise CodecError("Huffman code lengths violate the Kraft inequality")
    nbits = 8 * len(payload)
    if n * int(lengths.min()) > nbits:
        raise CodecError(f"Huffman payload of {nbits} bits cannot hold {n} symbols")
    codes = canonical_codes(lengths)
    # the next _TABLE_BITS bits -> symbol·32 + length, for codes that short; 0: a longer code
    tb = min(int(lengths.max()), _TABLE_BITS)
    table = [0] * (1 << tb)
    for s in np.flatnonzero(lengths <= tb).tolist():
        lo = codes[s] << (tb - int(lengths[s]))
        table[lo : lo + (1 << (tb - int(lengths[s])))] = [s * 32 + int(lengths[s])] * (1 << (tb - int(lengths[s])))
    longer = {(int(lengths[s]), codes[s]): s for s in np.flatnonzero(lengths > tb).tolist()}
    raw = np.frombuffer(bytes(payload) + b"\0\0\0\0", dtype=np.uint8).astype(np.uint32)
    words = ((raw[:-3] << 24) | (raw[1:-2] << 16) | (raw[2:-1] << 8) | raw[3:]).tolist()  # 32 bits from each byte
    out = [0] * n
    pos = 0
    for i in range(n):
        peek = (words[pos >> 3] >> (8 - (pos & 7))) & 0xFFFFFF  # the next 24 bits
        entry = table[peek >> (24 - tb)]
        if entry:
            out[i], pos = entry >> 5, pos + (entry & 31)
        else:
            found = next(((length, longer[(length, peek >> (24 - length))]) for length in range(tb + 1, MAX_LENGTH + 1)
                          if (length, peek >> (24 - length)) in longer), None)
            if found is None:
                raise CodecError("invalid Huffman code word")
            pos += found[0]
            out[i] = found[1]
        if pos > nbits:
            raise CodecError("Huffman payload ends in the middle of a code word")
    if (pos + 7) // 8 != len(payload):
        raise CodecError(f"Huffman payload has {len(payload)} bytes but its {n} symbols use {pos} bits")
    return np.asarray(out, dtype=np.int64)
