"""The packed model file (``.bcz``): pruned weights, sparse and entropy-coded at their inferred precision.

>>> info = save(result, "lenet5.bcz")          # doctest: +SKIP   result: a CompressedModel
>>> model = load("lenet5.bcz")                 # doctest: +SKIP   a plain nn.Sequential (or GraphModule), eval mode
>>> packed_report(result, "lenet5.bcz")        # doctest: +SKIP   cr_max, file_bytes, cr_file, entropy_bits, …

What goes in (byte layout in docs/format.md):

* the architecture as the JSON layer list of `io.plain.model_spec` (zlib-compressed), or for a
  residual/concatenating network compressed by `graph_compress` the JSON graph of `io.plain.graph_spec`
  (flag bit 0 set), plus a little metadata (per-layer bits, the original weight count);
* each weight of a quantised layer (one with a bit count T in `CompressedModel.bits`) as integers
  q = w·2^T in Deep Compression's sparse format: the non-zero q's and their relative-index gaps
  (with filler entries), two streams each coded with ANS, canonical Huffman or fixed width;
* every other tensor raw little-endian: float32 (biases, batch-norm parameters, weights of
  unquantised layers) or int64; a `Select`'s sorted index as a bitmask over its inputs;
* a CRC-32 of everything before it.

Nothing is unpickled: the model is rebuilt from a whitelist of plain layer types, functions and tensor
methods (`io.plain.build_from_spec`, `io.plain.build_graph`) and its tensors filled from the decoded
streams. The loader checks every length and count against the bytes that remain and against the
architecture's shapes before it allocates anything, caps the model at `MAX_ELEMENTS` numbers, and
reports any problem as a `PackedFileError` naming it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..compress.rates import CodedBits, cr_file, cr_max
from ..compress.shrink import Select
from ..base import atomic_write
from . import codec
from .codec import CodecError
from .plain import _LAYERS, EXTRA_ARGS, ModelFileError, build_from_spec, build_graph, graph_spec, model_spec

MAGIC = b"\x89BCZ\r\n\x1a\n"
VERSION = 1
EXTENSION = ".bcz"
#: flag bit 0: the architecture is a graph (`io.plain.graph_spec`), not a layer list. Readers from before
#: graphs could be stored know no flag, so they refuse such a file ("features this bayescomp does not know").
FLAG_GRAPH = 0x0001
#: flag bits defined by this version: a reader refuses a file with any other flag set
KNOWN_FLAGS = FLAG_GRAPH
#: default cap on the numbers (parameters and buffers) a loaded model may hold: 2^28 ≈ 268 M (1 GiB of float32)
MAX_ELEMENTS = 1 << 28
MAX_SPEC_BYTES = 1 << 20
MAX_LAYERS = 10_000
MAX_NDIM = 8
CODERS = ("auto", "ans", "huffman")

ENC_F32 = 0
ENC_I64 = 1
ENC_INDEX_SET = 2
ENC_SPARSE = 3
ENCODING_NAMES = {ENC_F32: "float32", ENC_I64: "int64", ENC_INDEX_SET: "index-set", ENC_SPARSE: "sparse"}

_HEADER = struct.Struct("<8sHHQ")  # magic, version, flags, file length
_TRAILER = 4  # CRC-32
_MIN_FILE = _HEADER.size + 4 + 4 + _TRAILER

# layer types that hold tensors, and an upper bound of how many numbers they hold (from their arguments)
_TENSORLESS = {
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU", "SiLU", "Tanh", "Hardtanh", "Softsign", "Identity",
    "Dropout", "Dropout1d", "Dropout2d", "Flatten", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AppendOnes",
    "Sigmoid", "Hardswish", "Hardsigmoid", "Mish", "Softplus", "LogSigmoid", "SELU", "CELU", "ZeroPad2d",
    "ConstantPad2d", "Softmax", "LogSoftmax",
}  # fmt: skip


class PackedFileError(ValueError):
    """A packed file that is missing, truncated, corrupt, from a newer format version, or inconsistent."""


# ----------------------------------------------------------------------------------------------------------------
# what is stored, and what it costs


@dataclass
class LayerCoding:
    """The sparse coding of one quantised weight: its integer entries and what they cost under each coder."""

    key: str  # state_dict key of the weight, e.g. "fc1.weight"
    layer: str  # the original layer name, e.g. "fc1" (or "features.0")
    shape: tuple[int, ...]
    bits: int
    index_bits: int
    values: np.ndarray = field(repr=False)
    gaps: np.ndarray = field(repr=False)
    nonzeros: int

    @property
    def entries(self) -> int:
        return int(self.values.size)

    @property
    def fillers(self) -> int:
        return self.entries - self.nonzeros

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "layer": self.layer,
            "shape": list(self.shape),
            "bits": self.bits,
            "index_bits": self.index_bits,
            "weights": int(np.prod(self.shape)),
            "nonzeros": self.nonzeros,
            "fillers": self.fillers,
            "huffman_weight_bits": codec.huffman_bits(self.values),
            "huffman_gap_bits": codec.huffman_bits(self.gaps),
            "entropy_weight_bits": codec.entropy_bits(self.values),
            "entropy_gap_bits": codec.entropy_bits(self.gaps),
        }


def _unpack(compressed: Any) -> tuple[nn.Module, dict[str, int], dict[str, Any]]:
    if isinstance(compressed, nn.Module):
        return compressed, {}, {}
    model = getattr(compressed, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a CompressedModel or a plain nn.Sequential, got {type(compressed).__name__}")
    return model, dict(getattr(compressed, "bits", None) or {}), dict(getattr(compressed, "report", None) or {})


def _quantised_keys(model: nn.Module, bits: Mapping[str, int]) -> dict[str, tuple[str, int]]:
    """state_dict key of each quantised weight → (original layer name, bits).

    In a chain the shrunk names are the original ones with '.'→'_'; a GraphModule keeps the original paths.
    """
    modules = dict(model.named_modules())
    out = {}
    for layer, b in bits.items():
        if b is None:
            continue
        path = layer if isinstance(model, fx.GraphModule) else layer.replace(".", "_")
        if not path or not isinstance(modules.get(path), (nn.Linear, nn.Conv2d)):
            raise ValueError(f"bits given for layer {layer!r}, but the model has no Linear/Conv2d named {path!r}")
        out[f"{path}.weight"] = (layer, int(b))
    return out


def layer_codings(compressed: Any, index_bits: Mapping[str, int] | None = None) -> list[LayerCoding]:
    """The sparse integer coding of every quantised weight of a CompressedModel, in model order.

    `index_bits` (state_dict key or layer name → bits) overrides Han's defaults (5 Linear, 8 Conv).
    Raises ValueError if a quantised layer's weights are not multiples of 2^−T.
    """
    model, bits, _ = _unpack(compressed)
    quantised = _quantised_keys(model, bits)
    index_bits = dict(index_bits or {})
    out = []
    for key, tensor in model.state_dict().items():
        if key not in quantised:
            continue
        layer, b = quantised[key]
        w = tensor.detach().cpu().numpy()
        ib = index_bits.get(key, index_bits.get(layer, codec.default_index_bits(w.ndim)))
        try:
            q = codec.quantize(w, b)
        except ValueError as exc:
            raise ValueError(f"layer {layer}: {exc}") from exc
        values, gaps = codec.sparse_encode(q, ib)
        out.append(LayerCoding(key, layer, tuple(w.shape), b, ib, values, gaps, int(np.count_nonzero(q))))
    return out


def coded_bits(compressed: Any, codings: list[LayerCoding] | None = None) -> list[CodedBits]:
    """Deep Compression bit counts per weighted layer (Huffman-coded weights and gaps; float layers at 32 bits)."""
    model, bits, _ = _unpack(compressed)
    codings = layer_codings(compressed) if codings is None else codings
    by_key = {c.key: c for c in codings}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        c = by_key.get(f"{name}.weight")
        if c is None:
            out.append(CodedBits(name, 32 * m.weight.numel(), 0))
        else:
            out.append(CodedBits(c.layer, codec.huffman_bits(c.values), codec.huffman_bits(c.gaps)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# writing


def _dims(shape: tuple[int, ...]) -> bytes:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors of more than {MAX_NDIM} dimensions are not supported")
    return struct.pack(f"<B{len(shape)}I", len(shape), *shape)


def _stream_bytes(stream: codec.Stream, values: np.ndarray) -> bytes:
    crc = zlib.crc32(np.ascontiguousarray(values, dtype="<i8").tobytes())
    return (
        struct.pack("<BIII", stream.coder, len(stream.table), len(stream.payload), crc) + stream.table + stream.payload
    )


def _index_set(t: torch.Tensor, module: nn.Module | None) -> bytes | None:
    """The bitmask of a Select's sorted index over its n_in inputs, if that is smaller than raw int64."""
    if not isinstance(module, Select) or module.n_in is None or t.dim() != 1:
        return None
    idx = t.numpy()
    n_in = int(module.n_in)
    if idx.size and (idx[0] < 0 or idx[-1] >= n_in or np.any(np.diff(idx) <= 0)):
        return None
    if (n_in + 7) // 8 >= 8 * idx.size or n_in >= 1 << 32:
        return None
    mask = np.zeros(n_in, dtype=np.uint8)
    mask[idx] = 1
    return struct.pack("<I", n_in) + np.packbits(mask).tobytes()


def pack(compressed: Any, coder: str = "auto", index_bits: Mapping[str, int] | None = None) -> tuple[bytes, dict]:
    """The packed file's bytes and a summary of what went where.

    `coder`: "auto" (each stream with whichever of ANS, Huffman and fixed width is smallest, tables
    included), "ans" or "huffman" (every stream with that coder).
    """
    if coder not in CODERS:
        raise ValueError(f"coder must be one of {CODERS}, got {coder!r}")
    if coder == "ans" and not codec.ans_available():
        raise ValueError("coder='ans' needs the 'constriction' package (pip install constriction)")
    model, bits, report = _unpack(compressed)
    codings = {c.key: c for c in layer_codings(compressed, index_bits)}
    try:
        graph = isinstance(model, fx.GraphModule)
        spec = graph_spec(model) if graph else model_spec(model)
    except ModelFileError as exc:
        raise ValueError(f"this model cannot be packed: {exc}") from exc
    meta = {
        "bits": {k: int(v) for k, v in bits.items() if v is not None},
        "architecture": report.get("architecture"),
        "weights_total": int(report.get("weights_total") or _weights(model)),
        "coder": coder,
    }
    doc = {"graph" if graph else "spec": spec, "meta": meta}
    spec_blob = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
    modules = dict(model.named_modules())
    body = bytearray()
    records: list[dict[str, Any]] = []
    state = model.state_dict()
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        start = len(body)
        name = key.encode()
        body += struct.pack("<H", len(name)) + name
        rec: dict[str, Any] = {"key": key}
        if key in codings:
            c = codings[key]
            s_val = codec.encode_stream(c.values, coder)
            s_gap = codec.encode_stream(c.gaps, coder)
            body += struct.pack("<B", ENC_SPARSE) + _dims(c.shape)
            body += struct.pack("<BBI", c.bits, c.index_bits, c.entries)
            body += _stream_bytes(s_val, c.values) + _stream_bytes(s_gap, c.gaps)
            rec.update(c.summary())
            rec["streams"] = {
                "weights": {
                    "coder": s_val.coder_name,
                    "table_bytes": len(s_val.table),
                    "payload_bytes": len(s_val.payload),
                },
                "gaps": {
                    "coder": s_gap.coder_name,
                    "table_bytes": len(s_gap.table),
                    "payload_bytes": len(s_gap.payload),
                },
            }
        elif t.is_floating_point():
            body += struct.pack("<B", ENC_F32) + _dims(tuple(t.shape)) + t.float().numpy().astype("<f4").tobytes()
        elif t.dtype == torch.int64:
            bitmask = _index_set(t, modules.get(key.rpartition(".")[0]))
            if bitmask is not None:
                body += struct.pack("<B", ENC_INDEX_SET) + _dims(tuple(t.shape)) + bitmask
            else:
                body += struct.pack("<B", ENC_I64) + _dims(tuple(t.shape)) + t.numpy().astype("<i8").tobytes()
        else:
            raise ValueError(f"{key}: tensors of dtype {t.dtype} cannot be stored in a packed file")
        rec["encoding"] = ENCODING_NAMES[body[start + 2 + len(name)]]
        rec["bytes"] = len(body) - start
        records.append(rec)
    head_len = _HEADER.size + 4 + len(spec_blob) + 4
    total = head_len + len(body) + _TRAILER
    out = bytearray(_HEADER.pack(MAGIC, VERSION, FLAG_GRAPH if graph else 0, total))
    out += struct.pack("<I", len(spec_blob)) + spec_blob + struct.pack("<I", len(records)) + body
    out += struct.pack("<I", zlib.crc32(out))
    assert len(out) == total
    return bytes(out), {"file_bytes": total, "spec_bytes": len(spec_blob), "records": records, "meta": meta}


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def save(compressed: Any, path: str | os.PathLike, coder: str = "auto") -> dict[str, Any]:
    """Write the packed file of a CompressedModel (or a plain chain / GraphModule) atomically; returns `pack`'s summary."""
    data, info = pack(compressed, coder)
    atomic_write(path, data)
    return info


# ----------------------------------------------------------------------------------------------------------------
# reading


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

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct("<" + fmt)
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
    if kind not in _LAYERS:
        raise PackedFileError(f"architecture: layer type {kind!r} is not supported in packed files")
    extra = set(args) - set(_LAYERS[kind][1]) - EXTRA_ARGS.get(kind, set())
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
    if kind == "Conv2d":
        n_in, n_out = (
            _int_arg(args.get("in_channels"), f"{name}.in_channels"),
            _int_arg(args.get("out_channels"), f"{name}.out_channels"),
        )
        ks = args.get("kernel_size")
        ks = list(ks) if isinstance(ks, list) else [ks, ks]
        if len(ks) != 2:
            raise PackedFileError(f"architecture: {name}.kernel_size must have 2 entries")
        return n_in * n_out * _int_arg(ks[0], f"{name}.kernel_size") * _int_arg(ks[1], f"{name}.kernel_size") + n_out
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return 4 * _int_arg(args.get("num_features"), f"{name}.num_features") + 1
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


def _build(spec: Any, graph: bool = False) -> nn.Module:
    try:
        with torch.random.fork_rng(devices=[]):  # layer initialisation must not disturb the caller's RNG
            return build_graph(spec) if graph else build_from_spec(spec)
    except Exception as exc:  # noqa: BLE001 - untrusted arguments can make any constructor fail
        raise PackedFileError(f"architecture cannot be built: {type(exc).__name__}: {exc}") from exc


def _read_stream(r: _Reader, n: int, what: str) -> tuple[np.ndarray, str]:
    coder, table_len, payload_len, crc = r.unpack("BIII", f"{what} header")
    table = r.take(table_len, f"{what} table")
    payload = r.take(payload_len, f"{what} payload")
    try:
        values = codec.decode_stream(coder, table, payload, n)
    except CodecError as exc:
        raise PackedFileError(f"{what}: {exc}") from exc
    if zlib.crc32(np.ascontiguousarray(values, dtype="<i8").tobytes()) != crc:
        raise PackedFileError(f"{what}: decoded values fail their checksum (corrupt stream or incompatible coder)")
    return values, codec.CODER_NAMES[coder]


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
        if bits > 62 or not 1 <= index_bits <= codec.MAX_INDEX_BITS:
            raise PackedFileError(f"{key}: {bits} mantissa bits / {index_bits} index bits out of range")
        if entries > numel:
            raise PackedFileError(f"{key}: {entries} sparse entries for {numel} weights")
        values, coder_v = _read_stream(r, entries, f"{key}: weight stream")
        gaps, coder_g = _read_stream(r, entries, f"{key}: gap stream")
        try:
            q = codec.sparse_decode(values, gaps, numel, index_bits)
        except CodecError as exc:
            raise PackedFileError(f"{key}: {exc}") from exc
        if q.size and (int(q.min()) <= -(1 << 62) or int(q.max()) >= 1 << 62):
            raise PackedFileError(f"{key}: quantised weight out of range")
        value = torch.from_numpy(codec.dequantize(q, bits))
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
    if size < _HEADER.size:
        raise PackedFileError(f"truncated file: {size} bytes, shorter than the header")
    _, version, flags, length = _HEADER.unpack(buf[: _HEADER.size])
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
    if size < _MIN_FILE:
        raise PackedFileError(f"file of {size} bytes is too short to be a packed file")
    (crc,) = struct.unpack("<I", buf[size - _TRAILER :])
    if zlib.crc32(buf[: size - _TRAILER]) != crc:
        raise PackedFileError("checksum mismatch: the file is corrupt")
    if flags & ~KNOWN_FLAGS:
        raise PackedFileError(f"file uses features this bayescomp does not know (flags {flags:#06x})")
    r = _Reader(buf, _HEADER.size, size - _TRAILER)
    (spec_len,) = r.unpack("I", "architecture length")
    graph = bool(flags & FLAG_GRAPH)
    spec, meta = _read_spec(r.take(spec_len, "architecture"), max_elements, graph)
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


# ----------------------------------------------------------------------------------------------------------------
# report


def packed_report(compressed: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Rates and sizes of the packed file at `path` written from `compressed`, for report.json.

    * cr_max: the paper's "maximum compression" (Deep Compression accounting, `rates.cr_max`);
    * file_bytes, cr_file: the real file and its rate (`rates.cr_file`);
    * entropy_bits: Shannon information of the stored weight and gap symbols (the floor for any
      static coder, tables excluded); coded_bits: the payload bits the file actually spends on them;
    * coder: the mode the file was written with, stream_coders: how many streams each coder won;
    * verified: whether the file decodes to exactly the tensors of `compressed.model`.
    """
    model, _, report = _unpack(compressed)
    loaded, meta = read_packed(path)
    codings = layer_codings(compressed)
    layers = [c.summary() for c in codings]
    weights_total = int(report.get("weights_total") or meta.get("weights_total") or _weights(model))
    bits = coded_bits(compressed, codings)
    file_bytes = int(meta["file_bytes"])
    counts: dict[str, int] = {}
    for rec in meta["records"]:
        for name in rec.get("coders", ()):
            counts[name] = counts.get(name, 0) + 1
    ours, theirs = model.state_dict(), loaded.state_dict()
    verified = ours.keys() == theirs.keys() and all(
        torch.equal(ours[k].detach().cpu().to(theirs[k].dtype), theirs[k]) for k in ours
    )
    return {
        "format": "bcz",
        "format_version": VERSION,
        "coder": meta.get("coder"),
        "stream_coders": counts,
        "file_bytes": file_bytes,
        "cr_file": cr_file(weights_total, file_bytes),
        "cr_max": cr_max(weights_total, bits),
        "max_bits": sum(b.weight_bits + b.gap_bits for b in bits),
        "entropy_bits": sum(layer["entropy_weight_bits"] + layer["entropy_gap_bits"] for layer in layers),
        "huffman_bits": sum(layer["huffman_weight_bits"] + layer["huffman_gap_bits"] for layer in layers),
        "weights_total": weights_total,
        "verified": bool(verified),
        "layers": layers,
    }


__all__ = [
    "EXTENSION",
    "FLAG_GRAPH",
    "MAGIC",
    "MAX_ELEMENTS",
    "VERSION",
    "LayerCoding",
    "PackedFileError",
    "coded_bits",
    "layer_codings",
    "load",
    "pack",
    "packed_report",
    "read_packed",
    "save",
    "unpack",
]
