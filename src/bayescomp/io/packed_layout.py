"""The byte layout of the packed model file (``.bcz``): magic, version, flags, tensor encodings, limits.

A file is: the header (magic, format version, flags, file length; `HEADER`), the zlib-compressed JSON
architecture and metadata (length-prefixed), the tensor count and one record per tensor, then a CRC-32 of
everything before it (`TRAILER_BYTES`). A record is the tensor's name (length-prefixed UTF-8), its encoding
(one of `ENCODING_NAMES`), its shape, and the data: raw little-endian float32 or int64, a bitmask of a sorted
index over its universe, or (a quantised weight) the mantissa bits, index bits and entry count followed by the
two coded streams of the sparse index (`io.streams`), each with its coder id, table and payload lengths and
a CRC-32 of the decoded values. Full description: docs/format.md.
"""

from __future__ import annotations

import struct

from ..base import BayescompError

MAGIC = b"\x89BCZ\r\n\x1a\n"
VERSION = 1
EXTENSION = ".bcz"
#: flag bit 0: the architecture is a graph (`io.plain.graph_spec`), not a layer list. Readers from before
#: graphs could be stored know no flag, so they refuse such a file ("features this bayescomp does not know").
FLAG_GRAPH = 0x0001
#: flag bit 1: the architecture uses the token-model vocabulary (LayerNorm, Embedding, AttentionHeads, size
#: arithmetic, slices: `io.graphs.token_entries`); set exactly then. Readers from before know no such flag, so they
#: refuse the file by it instead of failing on the first entry they do not know.
FLAG_TOKENS = 0x0002
#: flag bits defined by this version: a reader refuses a file with any other flag set
KNOWN_FLAGS = FLAG_GRAPH | FLAG_TOKENS
#: default cap on the numbers (parameters and buffers) a loaded model may hold: 2^28 ≈ 268 M (1 GiB of float32)
MAX_ELEMENTS = 1 << 28
MAX_SPEC_BYTES = 1 << 20
MAX_LAYERS = 10_000
MAX_NDIM = 8
#: what `pack` may code the weight streams with (`io.streams`): per stream the smallest, or one coder throughout
CODERS = ("auto", "ans", "huffman")

ENC_F32 = 0
ENC_I64 = 1
ENC_INDEX_SET = 2
ENC_SPARSE = 3
ENCODING_NAMES = {ENC_F32: "float32", ENC_I64: "int64", ENC_INDEX_SET: "index-set", ENC_SPARSE: "sparse"}

#: magic, version, flags, file length
HEADER = struct.Struct("<8sHHQ")
#: the CRC-32 at the end
TRAILER_BYTES = 4
#: a stream's header: coder id, table bytes, payload bytes, CRC-32 of the decoded values
STREAM_HEADER = struct.Struct("<BIII")
MIN_FILE_BYTES = HEADER.size + 4 + 4 + TRAILER_BYTES


class PackedFileError(BayescompError, ValueError):
    """A packed file that is missing, truncated, corrupt, from a newer format version, or inconsistent."""
