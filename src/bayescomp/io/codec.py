"""Entropy coders for integer symbols, on numpy arrays and bytes, and the bit counts they are judged by.

Pure functions, no torch, no files. `streams.py` frames one coded array with its table; `packed.py` builds
the `.bcz` file from such streams.

* **Fixed width**: v − min in ⌈log2(max − min + 1)⌉ bits each, most significant bit first; the fallback for
  streams whose values are nearly all distinct (a layer kept at 20+ bits), where any code table costs more
  than it saves.
* **Huffman** via `constriction.symbol` (its `EncoderHuffmanTree`/`DecoderHuffmanTree` and bit queues). Only
  the code lengths l_s are stored; both sides build the tree from the dyadic probabilities 2^−l_s, whose
  Huffman code has exactly those lengths, so the decoder rebuilds the encoder's code. The payload is
  constriction's bit queue (little-endian 32-bit words, first bit in the lowest bit), cut to whole bytes.
  Code lengths are at most `MAX_CODE_LENGTH` (31); a deeper tree (only for very skewed streams of
  millions of symbols, where ANS does far better anyway) is refused, so `auto` picks another coder.
* **Asymmetric numeral systems (ANS)** via constriction's `AnsCoder` with a static `Categorical` model
  built from the stored symbol counts: within a fraction of a percent of the entropy, where Huffman loses
  up to one bit per symbol (but ANS's table of counts is larger than Huffman's 5-bit lengths).
* **Shannon entropy** Σ_s −c_s·log2(c_s/n) of a symbol array in bits: the floor for any static (two-pass,
  order-0) coder of those symbols, tables not counted; `huffman_bits`, the payload of an optimal prefix
  code, is what the paper's "maximum compression" counts.

Integers in tables are LEB128 varints (7 bits per byte, low group first, high bit = "more follows");
signed values are zigzag-mapped first (0, −1, 1, −2, … → 0, 1, 2, 3, …).
"""

from __future__ import annotations

import constriction
import numpy as np

from ..base import BayescompError

#: the longest Huffman code: code lengths are stored in 5 bits
MAX_CODE_LENGTH = 31
MAX_FIXED_WIDTH = 64
_MAX_VARINT_BYTES = 10


class CodecError(BayescompError, ValueError):
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
# entropy and Huffman code lengths


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon information n·H of the symbol array, in bits: Σ_s −c_s·log2(c_s / n)."""
    _, counts = np.unique(np.asarray(symbols).reshape(-1), return_counts=True)
    if counts.size <= 1:
        return 0.0
    c = counts.astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol (int64) of a Huffman code for these positive counts; one symbol gets length 0."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if np.any(counts <= 0):
        raise ValueError("Huffman counts must be positive")
    if counts.size <= 1:
        return np.zeros(counts.size, dtype=np.int64)
    return _tree_lengths(constriction.symbol.huffman.EncoderHuffmanTree(counts), counts.size)


def _tree_lengths(tree: constriction.symbol.huffman.EncoderHuffmanTree, k: int) -> np.ndarray:
    lengths = np.empty(k, dtype=np.int64)
    for s in range(k):
        coder = constriction.symbol.QueueEncoder()
        coder.encode_symbol(s, tree)
        lengths[s] = coder.get_compressed_and_bitrate()[1]
    return lengths


def huffman_bits(symbols: np.ndarray) -> int:
    """Payload bits of a Huffman coding of `symbols` (code table not counted): Σ_s c_s·l_s."""
    _, counts = np.unique(np.asarray(symbols).reshape(-1), return_counts=True)
    if counts.size == 0:
        return 0
    return int(np.dot(counts, huffman_code_lengths(counts)))


# ----------------------------------------------------------------------------------------------------------------
# Huffman (constriction)


def check_code_lengths(lengths: np.ndarray) -> None:
    """`CodecError` unless `lengths` are a complete prefix code (Kraft sum exactly 1) of 1…31 bits, or [0], or []."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0 or (lengths.size == 1 and lengths[0] == 0):
        return
    if lengths.size < 2 or int(lengths.min()) < 1 or int(lengths.max()) > MAX_CODE_LENGTH:
        raise CodecError(f"Huffman code lengths must be in 1..{MAX_CODE_LENGTH}, for two symbols or more")
    if sum(1 << (MAX_CODE_LENGTH - length) for length in lengths.tolist()) != 1 << MAX_CODE_LENGTH:
        raise CodecError("Huffman code lengths do not make a complete prefix code (Kraft sum is not 1)")


def pack_lengths(lengths: np.ndarray) -> bytes:
    """5 bits per code length, most significant bit first, zero-padded to a whole byte."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    bits = np.unpackbits(lengths[:, None], axis=1)[:, 3:]
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_lengths(buf: bytes | memoryview, k: int) -> np.ndarray:
    """The `k` code lengths `pack_lengths` wrote; `CodecError` if `buf` is not exactly their bytes."""
    if len(buf) != (5 * k + 7) // 8:
        raise CodecError(f"Huffman table: {len(buf)} bytes of code lengths for {k} symbols")
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: 5 * k].reshape(k, 5)
    return (bits.astype(np.int64) * np.array([16, 8, 4, 2, 1])).sum(axis=1)


def _dyadic(lengths: np.ndarray) -> np.ndarray:
    return np.ldexp(1.0, -np.asarray(lengths, dtype=np.int64))


def huffman_encode(indices: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """(payload, bits) of the symbol indices under the Huffman code with these complete code lengths."""
    if len(lengths) <= 1:
        return b"", 0
    tree = constriction.symbol.huffman.EncoderHuffmanTree(_dyadic(lengths))
    coder = constriction.symbol.QueueEncoder()
    for s in np.asarray(indices, dtype=np.int64).tolist():
        coder.encode_symbol(s, tree)
    words, nbits = coder.get_compressed_and_bitrate()
    return words.astype("<u4").tobytes()[: (nbits + 7) // 8], int(nbits)


def huffman_decode(payload: bytes | memoryview, lengths: np.ndarray, n: int) -> np.ndarray:
    """n symbol indices from a `huffman_encode` payload; it must end within its last byte, padded with zeros."""
    lengths = np.asarray(lengths, dtype=np.int64)
    check_code_lengths(lengths)
    if n == 0 or lengths.size == 1:
        if payload:
            raise CodecError("Huffman payload present for a stream that needs none")
        return np.zeros(n, dtype=np.int64)
    if n * int(lengths.min()) > 8 * len(payload):
        raise CodecError(f"Huffman payload of {len(payload)} bytes cannot hold {n} symbols")
    data = bytes(payload) + b"\0" * (-len(payload) % 4)
    tree = constriction.symbol.huffman.DecoderHuffmanTree(_dyadic(lengths))
    coder = constriction.symbol.QueueDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    try:
        out = np.fromiter((coder.decode_symbol(tree) for _ in range(n)), dtype=np.int64, count=n)
    except (ValueError, RuntimeError) as exc:
        raise CodecError(f"Huffman payload cannot be decoded: {exc}") from exc
    nbits = int(lengths[out].sum())
    if (nbits + 7) // 8 != len(payload) or (nbits % 8 and payload[-1] >> (nbits % 8)):
        raise CodecError(f"Huffman payload has {len(payload)} bytes but its {n} symbols use {nbits} bits")
    return out


# ----------------------------------------------------------------------------------------------------------------
# ANS (constriction)


def _ans_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    probs = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(probs / probs.sum(), perfect=False)


def ans_encode(indices: np.ndarray, counts: np.ndarray) -> bytes:
    """ANS payload (little-endian uint32 words) of the symbol indices under the static model `counts`."""
    if len(counts) <= 1:
        return b""
    coder = constriction.stream.stack.AnsCoder()
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
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_ans_model(counts), n)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CodecError(f"ANS payload cannot be decoded: {exc}") from exc
    if not empty:
        raise CodecError("ANS payload holds more data than its symbols")
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# fixed width


def fixed_width(span: int) -> int:
    """Bits per value of a fixed-width code for values spanning max − min = `span`."""
    return int(span).bit_length()


def fixed_encode(values: np.ndarray, minimum: int, width: int) -> bytes:
    """values − minimum in `width` bits each, most significant bit first, zero-padded to a whole byte."""
    v = (np.asarray(values, dtype=np.int64) - minimum).astype(np.uint64)
    if width == 0 or v.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((v[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def fixed_decode(payload: bytes | memoryview, minimum: int, width: int, n: int) -> np.ndarray:
    """The n values `fixed_encode` wrote; the payload must be exactly their bytes."""
    need = (n * width + 7) // 8
    if len(payload) != need:
        raise CodecError(f"fixed-width payload has {len(payload)} bytes, {n} values of {width} bits need {need}")
    if width == 0 or n == 0:
        return np.full(n, minimum, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[: n * width].reshape(n, width)
    acc = np.zeros(n, dtype=np.uint64)
    for j in range(width):
        acc = (acc << np.uint64(1)) | bits[:, j].astype(np.uint64)
    return acc.astype(np.int64) + np.int64(minimum)  # wraps like the int64 arithmetic that made it
