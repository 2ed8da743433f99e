"""Reading the packed model file (``.bcz``): every length, count and shape checked before anything is allocated.

Nothing is unpickled: the model is rebuilt from a whitelist of plain layer types, functions and tensor
methods (`io.plain.build_from_spec`, `io.plain.build_graph`) and its tensors filled from the decoded
streams. The loader checks every length and count against the bytes that remain and against the
architecture's shapes before it allocates anything, caps the model at `MAX_ELEMENTS` numbers, and
reports any problem as a `PackedFileError` naming it. The byte layout is in `packed_layout`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .codec import CodecError
from .packed_layout import (
    ENC_F32,
    ENC_I64,
    ENC_INDEX_SET,
    ENC_SPARSE,
    ENCODING_NAMES,
    FLAG_GRAPH,
    FLAG_TOKENS,
    HEADER,
    KNOWN_FLAGS,
    MAGIC,
    MAX_ELEMENTS,
    MAX_LAYERS,
    MAX_NDIM,
    MAX_SPEC_BYTES,
    MIN_FILE_BYTES,
    STREAM_HEADER,
    TRAILER_BYTES,
    VERSION,
    PackedFileError,
)
from .plain import STORED_ARGS, build_from_spec, build_graph, token_entries
from .sparse_index import MAX_INDEX_BITS, dequantize, sparse_decode
from .streams import CODER_NAMES, decode_stream

# layer types that hold tensors, and an upper bound of how many numbers they hold (from their arguments)
_TENSORLESS = {
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU", "SiLU", "Tanh", "Hardtanh", "Softsign", "Identity",
    "Dropout", "Dropout1d", "Dropout2d", "Flatten", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AppendOnes",
    "Sigmoid", "Hardswish", "Hardsigmoid", "Mish", "Softplus", "LogSigmoid", "SELU", "CELU", "ZeroPad2d",
    "ConstantPad2d", "Softmax", "LogSoftmax",
}  # fmt: skip


class _Reader:
    """Bounds-checked reads from [pos, end) of a buffer."""

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            raise PackedFileError(f"{what}: needs {n} bytes but only {self.left} remain (truncated or corrupt file)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str | struct.Struct, what: str) -> tuple:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, what))


def _int_arg(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 40:
        raise PackedFileError(f"architecture: {what} must be a non-negative integer, got {value!r}")
    return value


def _spec_elements(entry: Any) -> int:
    """Upper bound of the numbers a layer of the spec allocates, from its arguments alone."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("type"), str):
        raise PackedFileError("architecture: every layer needs a name and a type")
    kind, args, name = entry["type"], entry.get("args"), entry["name"]
    if not isinstance(args, dict):
        raise PackedFileError(f"architecture: layer {name!r} has no argument table")
    if kind not in STORED_ARGS:
        raise PackedFileError(f"architecture: layer type {kind!r} is not supported in packed files")
    extra = set(args) - STORED_ARGS[kind]
    if extra:  # only the arguments model_spec writes: no device=, dtype= or other surprises
        raise PackedFileError(f"architecture: layer {name!r} has unexpected arguments {sorted(extra)}")
    if kind in _TENSORLESS:
        return 0
    if kind == "Linear":
        n_in, n_out = (
            _int_arg(args.get("in_features"), f"{name}.in_features"),
            _int_arg(args.get("out_features"), f"{name}.out_features"),
        )
        return n_in * n_out + n_out
    if kind in ("Conv2d", "Conv1d"):
        n_in, n_out = (
            _int_arg(args.get("in_channels"), f"{name}.in_channels"),
            _int_arg(args.get("out_channels"), f"{name}.out_channels"),
        )
        nd = 2 if kind == "Conv2d" else 1
        ks = args.get("kernel_size")
        ks = list(ks) if isinstance(ks, list) else [ks] * nd
        if len(ks) != nd:
            raise PackedFileError(f"architecture: {name}.kernel_size must have {nd} {'entry' if nd == 1 else 'entries'}")
        return n_in * n_out * math.prod(_int_arg(k, f"{name}.kernel_size") for k in ks) + n_out
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return 4 * _int_arg(args.get("num_features"), f"{name}.num_features") + 1
    if kind == "LayerNorm":
        shape = args.get("normalized_shape")
        dims = shape if isinstance(shape, list) else [shape]
        if len(dims) > MAX_NDIM:
            raise PackedFileError(f"architecture: {name}.normalized_shape has more than {MAX_NDIM} dimensions")
        return 2 * math.prod(_int_arg(d, f"{name}.normalized_shape") for d in dims)
    if kind == "Embedding":
        return _int_arg(args.get("num_embeddings"), f"{name}.num_embeddings") * _int_arg(
            args.get("embedding_dim"), f"{name}.embedding_dim")
    if kind == "AttentionHeads":  # q/k/v: embed → heads·head_dim, out_proj back, biases, the head index
        embed, heads = (_int_arg(args.get(a), f"{name}.{a}") for a in ("embed_dim", "num_heads"))
        inner = heads * _int_arg(args.get("head_dim"), f"{name}.head_dim")
        return 4 * embed * inner + 3 * inner + embed + heads
    if kind == "GroupNorm":
        return 2 * _int_arg(args.get("num_channels"), f"{name}.num_channels")
    if kind == "Realign":
        return 2 * _int_arg(args.get("n_carried"), f"{name}.n_carried") + _int_arg(
            args.get("n_channels"), f"{name}.n_channels")
    if kind == "Select":
        if args.get("n_in") is not None:
            _int_arg(args.get("n_in"), f"{name}.n_in")
        return _int_arg(args.get("index_size"), f"{name}.index_size")
    raise PackedFileError(f"architecture: layer type {kind!r} is not supported in packed files")


def _read_spec(blob: memoryview, max_elements: int, graph: bool) -> tuple[Any, dict[str, Any]]:
    """The architecture (a layer list, or a graph description if `graph`) and the metadata, checked and bounded."""
    try:
        d = zlib.decompressobj()
        text = d.decompress(blob, MAX_SPEC_BYTES)
        if d.unconsumed_tail:
            raise PackedFileError(f"architecture description is larger than {MAX_SPEC_BYTES} bytes")
        if not d.eof or d.unused_data:
            raise PackedFileError("architecture description is truncated or has trailing bytes")
        doc = json.loads(text.decode("utf-8"))
    except PackedFileError:
        raise
    except (zlib.error, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackedFileError(f"architecture description is corrupt: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("meta", {}), dict):
        raise PackedFileError("architecture description has the wrong structure")
    if graph != ("graph" in doc) or graph == ("spec" in doc):
        raise PackedFileError("architecture description does not match the file's graph flag")
    if graph:
        return _check_graph(doc["graph"], max_elements), doc.get("meta", {})
    spec = doc["spec"]
    if not isinstance(spec, list):
        raise PackedFileError("architecture description has the wrong structure")
    if len(spec) > MAX_LAYERS:
        raise PackedFileError(f"architecture lists {len(spec)} layers (at most {MAX_LAYERS})")
    total, names = 0, set()
    for entry in spec:
        total += _spec_elements(entry)
        if entry["name"] in names or not entry["name"] or "." in entry["name"]:
            raise PackedFileError(f"architecture: invalid or repeated layer name {entry['name']!r}")
        names.add(entry["name"])
        if total > max_elements:
            raise PackedFileError(
                f"architecture claims more than {max_elements} numbers (layer {entry['name']!r}); "
                "refusing to allocate it (raise max_elements to load a model this large)"
            )
    return spec, doc.get("meta", {})


def _check_graph(spec: Any, max_elements: int) -> dict[str, Any]:
    """Bound a graph description before anything is built: layer count, layer and buffer sizes.

    (The node count is bounded by the 1 MiB cap on the description.)
    """
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), list) for k in ("modules", "buffers", "nodes")):
        raise PackedFileError("architecture: the graph description has the wrong structure")
    if len(spec["modules"]) + len(spec["buffers"]) > MAX_LAYERS:
        raise PackedFileError(f"architecture lists more than {MAX_LAYERS} layers and tensors")
    total = 0
    entries = [(e, False) for e in spec["modules"]] + [(e, True) for e in spec["buffers"]]
    for entry, is_buffer in entries:
        if is_buffer:
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not isinstance(shape, list) or len(shape) > MAX_NDIM:
                raise PackedFileError("architecture: every buffer needs a shape of at most 8 dimensions")
            n = 1
            for dim in shape:
                n *= _int_arg(dim, f"{str(entry.get('name'))[:80]}.shape")
            total += n
        else:
            total += _spec_elements(entry)
        if total > max_elements:
            raise PackedFileError(
                f"architecture claims more than {max_elements} numbers ({str(entry.get('name'))[:80]!r}); "
                "refusing to allocate it (raise max_elements to load a model this large)"
            )
    return spec


def _check_token_flag(spec: Any, flagged: bool) -> None:
    """The token flag (bit 1) is set exactly when the architecture uses the token-model vocabulary."""
    used = token_entries(spec)
    if used and not flagged:
        raise PackedFileError(f"architecture uses {', '.join(used)} but the file's token flag (0x{FLAG_TOKENS:04x}) "
                              "is not set")
    if flagged and not used:
        raise PackedFileError(f"the file's token flag (0x{FLAG_TOKENS:04x}) is set but its architecture uses no "
                              "token-model layer or op")


def _build(spec: Any, graph: bool = False) -> nn.Module:
    try:
        with torch.random.fork_rng(devices=[]):  # layer initialisation must not disturb the caller's RNG
            return build_graph(spec) if graph else build_from_spec(spec)
    except Exception as exc:  # noqa: BLE001 - untrusted arguments can make any constructor fail
        raise PackedFileError(f"architecture cannot be built: {type(exc).__name__}: {exc}") from exc


def _read_stream(r: _Reader, n: int, what: str) -> tuple[np.ndarray, str]:
    coder, table_len, payload_len, crc = r.unpack(STREAM_HEADER, f"{what} header")
    table = r.take(table_len, f"{what} table")
    payload = r.take(payload_len, f"{what} payload")
    try:
        values = decode_stream(coder, table, payload, n)
    except CodecError as exc:
        raise PackedFileError(f"{what}: {exc}") from exc
    if zlib.crc32(np.ascontiguousarray(values, dtype="<i8").tobytes()) != crc:
        raise PackedFileError(f"{what}: decoded values fail their checksum (corrupt stream or incompatible coder)")
    return values, CODER_NAMES[coder]


def _read_record(r: _Reader, state: dict[str, torch.Tensor], seen: set[str], stats: list[dict[str, Any]]) -> None:
    start = r.pos
    (name_len,) = r.unpack("H", "tensor name length")
    try:
        key = bytes(r.take(name_len, "tensor name")).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackedFileError("tensor name is not UTF-8") from exc
    if key not in state:
        raise PackedFileError(f"tensor {key!r} does not belong to the stored architecture")
    if key in seen:
        raise PackedFileError(f"tensor {key!r} is stored twice")
    seen.add(key)
    encoding, ndim = r.unpack("BB", f"{key}: encoding")
    if ndim > MAX_NDIM:
        raise PackedFileError(f"{key}: {ndim} dimensions")
    shape = r.unpack(f"{ndim}I", f"{key}: shape")
    target = state[key]
    if tuple(shape) != tuple(target.shape):
        raise PackedFileError(f"{key}: stored shape {tuple(shape)} but the architecture says {tuple(target.shape)}")
    numel = target.numel()
    floating = target.is_floating_point()
    if (encoding in (ENC_F32, ENC_SPARSE) and not floating) or (
        encoding in (ENC_I64, ENC_INDEX_SET) and target.dtype != torch.int64
    ):
        raise PackedFileError(
            f"{key}: encoding {ENCODING_NAMES.get(encoding, encoding)} does not fit a {target.dtype} tensor"
        )
    rec: dict[str, Any] = {"key": key, "encoding": ENCODING_NAMES.get(encoding)}
    if encoding == ENC_F32:
        arr = np.frombuffer(r.take(4 * numel, f"{key}: float32 data"), dtype="<f4")
        value = torch.from_numpy(arr.astype(np.float32))
    elif encoding == ENC_I64:
        arr = np.frombuffer(r.take(8 * numel, f"{key}: int64 data"), dtype="<i8")
        value = torch.from_numpy(arr.astype(np.int64))
    elif encoding == ENC_INDEX_SET:
        (universe,) = r.unpack("I", f"{key}: index universe")
        mask = np.unpackbits(np.frombuffer(r.take((universe + 7) // 8, f"{key}: index bitmask"), dtype=np.uint8))
        idx = np.flatnonzero(mask[:universe])
        if idx.size != numel or np.any(mask[universe:]):
            raise PackedFileError(f"{key}: index bitmask holds {idx.size} indices, the tensor has {numel}")
        value = torch.from_numpy(idx.astype(np.int64))
    elif encoding == ENC_SPARSE:
        bits, index_bits, entries = r.unpack("BBI", f"{key}: sparse header")
        if bits > 62 or not 1 <= index_bits <= MAX_INDEX_BITS:
            raise PackedFileError(f"{key}: {bits} mantissa bits / {index_bits} index bits out of range")
        if entries > numel:
            raise PackedFileError(f"{key}: {entries} sparse entries for {numel} weights")
        values, coder_v = _read_stream(r, entries, f"{key}: weight stream")
        gaps, coder_g = _read_stream(r, entries, f"{key}: gap stream")
        try:
            q = sparse_decode(values, gaps, numel, index_bits)
        except CodecError as exc:
            raise PackedFileError(f"{key}: {exc}") from exc
        if q.size and (int(q.min()) <= -(1 << 62) or int(q.max()) >= 1 << 62):
            raise PackedFileError(f"{key}: quantised weight out of range")
        value = torch.from_numpy(dequantize(q, bits))
        rec.update(bits=bits, index_bits=index_bits, entries=entries, coders=[coder_v, coder_g])
    else:
        raise PackedFileError(f"{key}: unknown tensor encoding {encoding}")
    with torch.no_grad():
        target.copy_(value.reshape(target.shape).to(target.dtype))
    rec["bytes"] = r.pos - start
    stats.append(rec)


def unpack(
    data: bytes | bytearray | memoryview, *, max_elements: int = MAX_ELEMENTS
) -> tuple[nn.Module, dict[str, Any]]:
    """The plain model (eval mode) and the file's metadata from packed bytes; `PackedFileError` if anything is wrong.

    The model is an `nn.Sequential` for a chain, a `torch.fx.GraphModule` for a graph file (flag bit 0).
    """
    buf = memoryview(bytes(data))
    size = len(buf)
    if size < len(MAGIC):
        if bytes(buf) == MAGIC[:size]:
            raise PackedFileError(f"truncated file: {size} bytes, shorter than the header")
        raise PackedFileError("not a bayescomp packed file (bad magic bytes)")
    if bytes(buf[: len(MAGIC)]) != MAGIC:
        raise PackedFileError("not a bayescomp packed file (bad magic bytes)")
    if size < HEADER.size:
        raise PackedFileError(f"truncated file: {size} bytes, shorter than the header")
    _, version, flags, length = HEADER.unpack(buf[: HEADER.size])
    if version > VERSION:
        raise PackedFileError(
            f"packed file format version {version} is newer than this bayescomp reads ({VERSION}); upgrade bayescomp"
        )
    if version < 1:
        raise PackedFileError(f"invalid packed file format version {version}")
    if size < length:
        raise PackedFileError(f"truncated file: {size} of {length} bytes")
    if size > length:
        raise PackedFileError(f"file has {size - length} bytes after its end ({length} bytes)")
    if size < MIN_FILE_BYTES:
        raise PackedFileError(f"file of {size} bytes is too short to be a packed file")
    (crc,) = struct.unpack("<I", buf[size - TRAILER_BYTES :])
    if zlib.crc32(buf[: size - TRAILER_BYTES]) != crc:
        raise PackedFileError("checksum mismatch: the file is corrupt")
    if flags & ~KNOWN_FLAGS:
        raise PackedFileError(f"file uses features this bayescomp does not know (flags {flags:#06x})")
    r = _Reader(buf, HEADER.size, size - TRAILER_BYTES)
    (spec_len,) = r.unpack("I", "architecture length")
    graph = bool(flags & FLAG_GRAPH)
    spec, meta = _read_spec(r.take(spec_len, "architecture"), max_elements, graph)
    _check_token_flag(spec, bool(flags & FLAG_TOKENS))
    model = _build(spec, graph)
    state = model.state_dict()
    (n_records,) = r.unpack("I", "tensor count")
    if n_records != len(state):
        raise PackedFileError(f"file stores {n_records} tensors, the architecture has {len(state)}")
    seen: set[str] = set()
    stats: list[dict[str, Any]] = []
    for _ in range(n_records):
        _read_record(r, state, seen, stats)
    if r.left:
        raise PackedFileError(f"{r.left} unexpected bytes after the last tensor")
    meta = dict(meta)
    meta.update(file_bytes=size, format_version=version, records=stats)
    return model.eval(), meta


def read_packed(path: str | os.PathLike, *, max_elements: int = MAX_ELEMENTS) -> tuple[nn.Module, dict[str, Any]]:
    """`unpack` the file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise PackedFileError(f"packed file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackedFileError(f"cannot read packed file {path}: {exc}") from exc
    try:
        return unpack(data, max_elements=max_elements)
    except PackedFileError as exc:
        raise PackedFileError(f"{path}: {exc}") from None


def load(path: str | os.PathLike, *, max_elements: int = MAX_ELEMENTS) -> nn.Module:
    """The plain model (eval mode) stored in a packed file; `PackedFileError` names any problem.

    An `nn.Sequential` for a chain, a `torch.fx.GraphModule` for a residual or concatenating network.
    """
    return read_packed(path, max_elements=max_elements)[0]


__all__ = ["load", "read_packed", "unpack"]
