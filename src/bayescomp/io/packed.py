"""The packed model file (``.bcz``): pruned weights, sparse and entropy-coded at their inferred precision.

>>> info = save(result, "lenet5.bcz")          # doctest: +SKIP   result: a CompressedModel
>>> model = load("lenet5.bcz")                 # doctest: +SKIP   a plain nn.Sequential (or GraphModule), eval mode
>>> packed_report(result, "lenet5.bcz")        # doctest: +SKIP   cr_max, file_bytes, cr_file, entropy_bits, …

What goes in (byte layout in docs/format.md):

* the architecture as the JSON layer list of `io.plain.model_spec` (zlib-compressed), or for a
  residual/concatenating network compressed by `graph_compress` the JSON graph of `io.plain.graph_spec`
  (flag bit 0 set; flag bit 1 where it uses the token-model layers and ops: LayerNorm, Embedding,
  AttentionHeads, size arithmetic, slices), plus a little metadata (per-layer bits, the original weight count);
* each weight of a quantised layer (one with a bit count T in `CompressedModel.bits`) as integers
  q = w·2^T in Deep Compression's sparse format: the non-zero q's and their relative-index gaps
  (with filler entries), two streams each coded with ANS, Huffman or fixed width (`io.streams`);
* every other tensor raw little-endian: float32 (biases, batch-norm parameters, weights of
  unquantised layers) or int64; a `Select`'s sorted index as a bitmask over its inputs;
* a CRC-32 of everything before it.

This module writes the file and reports what it costs; `packed_reader` reads it (nothing is unpickled,
every length is checked first), `packed_layout` defines its bytes.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..base import atomic_write
from ..compress.rates import CodedBits, cr_file, cr_max
from ..compress.runtime import Select
from .codec import entropy_bits, huffman_bits
from .packed_layout import (
    CODERS,
    ENC_F32,
    ENC_I64,
    ENC_INDEX_SET,
    ENC_SPARSE,
    ENCODING_NAMES,
    EXTENSION,
    FLAG_GRAPH,
    FLAG_TOKENS,
    HEADER,
    MAGIC,
    MAX_ELEMENTS,
    MAX_NDIM,
    STREAM_HEADER,
    TRAILER_BYTES,
    VERSION,
    PackedFileError,
)
from .packed_reader import load, read_packed, unpack
from .plain import ModelFileError, graph_spec, model_spec, token_entries
from .sparse_index import default_index_bits, quantize, sparse_encode
from .streams import Stream, encode_stream

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
            "huffman_weight_bits": huffman_bits(self.values),
            "huffman_gap_bits": huffman_bits(self.gaps),
            "entropy_weight_bits": entropy_bits(self.values),
            "entropy_gap_bits": entropy_bits(self.gaps),
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
        if not path or not isinstance(modules.get(path), (nn.Linear, nn.Conv2d, nn.Conv1d)):
            raise ValueError(f"bits given for layer {layer!r}, but the model has no Linear/Conv2d/Conv1d named {path!r}")
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
        ib = index_bits.get(key, index_bits.get(layer, default_index_bits(w.ndim)))
        try:
            q = quantize(w, b)
        except ValueError as exc:
            raise ValueError(f"layer {layer}: {exc}") from exc
        values, gaps = sparse_encode(q, ib)
        out.append(LayerCoding(key, layer, tuple(w.shape), b, ib, values, gaps, int(np.count_nonzero(q))))
    return out


def coded_bits(compressed: Any, codings: list[LayerCoding] | None = None) -> list[CodedBits]:
    """Deep Compression bit counts per weighted layer (Huffman-coded weights and gaps; float layers at 32 bits)."""
    model, bits, _ = _unpack(compressed)
    codings = layer_codings(compressed) if codings is None else codings
    by_key = {c.key: c for c in codings}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            continue
        c = by_key.get(f"{name}.weight")
        if c is None:
            out.append(CodedBits(name, 32 * m.weight.numel(), 0))
        else:
            out.append(CodedBits(c.layer, huffman_bits(c.values), huffman_bits(c.gaps)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# writing


def _dims(shape: tuple[int, ...]) -> bytes:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors of more than {MAX_NDIM} dimensions are not supported")
    return struct.pack(f"<B{len(shape)}I", len(shape), *shape)


def _stream_bytes(stream: Stream, values: np.ndarray) -> bytes:
    crc = zlib.crc32(np.ascontiguousarray(values, dtype="<i8").tobytes())
    return (
        STREAM_HEADER.pack(stream.coder, len(stream.table), len(stream.payload), crc) + stream.table + stream.payload
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
            s_val = encode_stream(c.values, coder)
            s_gap = encode_stream(c.gaps, coder)
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
    head_len = HEADER.size + 4 + len(spec_blob) + 4
    total = head_len + len(body) + TRAILER_BYTES
    flags = (FLAG_GRAPH if graph else 0) | (FLAG_TOKENS if token_entries(spec) else 0)
    out = bytearray(HEADER.pack(MAGIC, VERSION, flags, total))
    out += struct.pack("<I", len(spec_blob)) + spec_blob + struct.pack("<I", len(records)) + body
    out += struct.pack("<I", zlib.crc32(out))
    assert len(out) == total
    return bytes(out), {"file_bytes": total, "spec_bytes": len(spec_blob), "records": records, "meta": meta}


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)))


def save(compressed: Any, path: str | os.PathLike, coder: str = "auto") -> dict[str, Any]:
    """Write the packed file of a CompressedModel (or a plain chain / GraphModule) atomically; returns `pack`'s summary."""
    data, info = pack(compressed, coder)
    atomic_write(path, data)
    return info


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
    "FLAG_TOKENS",
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
