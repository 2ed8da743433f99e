"""The layers a plain model file may hold: a whitelist of module types and the constructor arguments read
off an instance, and the JSON layer list of a flat `nn.Sequential` chain (`model_spec`).

The token-model layers (`TOKEN_LAYERS`: LayerNorm, Embedding and the `AttentionHeads` that compression makes
of an attention) came after the first files: an architecture that holds one is marked as such in the file
(the packed file's token flag, the model file's version 3), so that a reader from before refuses it clearly.

A stored ``MaxPool2d`` is rebuilt as `FastMaxPool2d` (the same values, faster on the CPU), and a
`FastMaxPool2d` is written as ``MaxPool2d``: the files do not tell them apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compress.heads import PROJECTIONS as ATTENTION_PROJECTIONS  # a per-projection `bias` list's order
from ..compress.runtime import AppendOnes, FastMaxPool2d, Realign, Select
from ..nn import AttentionHeads


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, from a newer version, or describes unknown layers."""


#: type name -> (class built on loading, constructor arguments read off an instance)
LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")),
    "Conv1d": (nn.Conv1d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "ELU": (nn.ELU, ("alpha",)),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, ()),
    "Tanh": (nn.Tanh, ()),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "Softsign": (nn.Softsign, ()),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p",)),
    "Dropout1d": (nn.Dropout1d, ("p",)),
    "Dropout2d": (nn.Dropout2d, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "MaxPool1d": (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "MaxPool2d": (FastMaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool1d": (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool1d": (nn.AdaptiveMaxPool1d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
    "Select": (Select, ("n_in",)),
    "AppendOnes": (AppendOnes, ()),
    # what graph_compress may emit besides the above: its channel-wise modules and barriers, and Realign
    "Sigmoid": (nn.Sigmoid, ()),
    "Hardswish": (nn.Hardswish, ()),
    "Hardsigmoid": (nn.Hardsigmoid, ()),
    "Mish": (nn.Mish, ()),
    "Softplus": (nn.Softplus, ("beta", "threshold")),
    "LogSigmoid": (nn.LogSigmoid, ()),
    "SELU": (nn.SELU, ()),
    "CELU": (nn.CELU, ("alpha",)),
    "ZeroPad2d": (nn.ZeroPad2d, ("padding",)),
    "ConstantPad2d": (nn.ConstantPad2d, ("padding", "value")),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
    "Realign": (Realign, ()),
    # token models (TOKEN_LAYERS): the compressed attention is an AttentionHeads with the heads it kept
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
    "Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                                 "scale_grad_by_freq", "sparse")),
    "AttentionHeads": (AttentionHeads, ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first",
                                        "total_heads")),
}
#: the layer types of token models: a file holding one is flagged (packed) or versioned (model file) as such
TOKEN_LAYERS = frozenset({"LayerNorm", "Embedding", "AttentionHeads"})

#: class -> the type name it is stored under: each class of LAYERS, and nn.MaxPool2d written like FastMaxPool2d
_STORED_AS: dict[type[nn.Module], str] = {cls: kind for kind, (cls, _) in LAYERS.items()} | {nn.MaxPool2d: "MaxPool2d"}

#: arguments written beyond the constructor arguments above (padding_mode only when it is not "zeros")
EXTRA_ARGS: dict[str, set[str]] = {
    "Linear": {"bias"},
    "Conv2d": {"bias", "padding_mode"},
    "Conv1d": {"bias", "padding_mode"},
    "Select": {"index_size"},
    "Realign": {"n_carried", "n_channels"},
    "LayerNorm": {"bias"},
    "AttentionHeads": {"bias"},
}
#: type name -> every argument a stored layer entry may have (readers refuse any other)
STORED_ARGS: dict[str, frozenset[str]] = {k: frozenset(a) | EXTRA_ARGS.get(k, set()) for k, (_, a) in LAYERS.items()}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def layer_entry(name: str, m: nn.Module) -> dict[str, Any]:
    """Name, type and constructor arguments of one whitelisted module; ModelFileError for any other."""
    kind = _STORED_AS.get(type(m))
    if kind is None:
        raise ModelFileError(f"{name}: {type(m).__name__} cannot be stored in a plain model file")
    args = {a: _jsonable(getattr(m, a)) for a in LAYERS[kind][1]}
    if kind in ("Linear", "Conv2d", "Conv1d", "LayerNorm"):
        args["bias"] = m.bias is not None
    if kind == "AttentionHeads":
        args["bias"] = _projection_biases(m)
    if kind in ("Conv2d", "Conv1d") and m.padding_mode != "zeros":
        args["padding_mode"] = m.padding_mode
    if kind == "Select":
        args["index_size"] = int(m.index.numel())
    if kind == "Realign":
        if m.src.numel() != m.dst.numel():
            raise ModelFileError(f"{name}: Realign with {m.src.numel()} sources but {m.dst.numel()} destinations")
        args.update(n_carried=int(m.src.numel()), n_channels=int(m.fill.numel()))
    return {"name": name, "type": kind, "args": args}


def _projection_biases(attn: AttentionHeads) -> bool | list[bool]:
    """Whether q/k/v/out_proj have a bias: one bool when they agree (the usual case), else one per projection (a
    shrunk projection may gain a bias where an input origin was folded into it)."""
    flags = [getattr(attn, p).bias is not None for p in ATTENTION_PROJECTIONS]
    return flags[0] if len(set(flags)) == 1 else flags


def _attention(name: str, args: dict[str, Any]) -> AttentionHeads:
    """The `AttentionHeads` named `name` from its stored arguments; `bias` a bool or one bool per projection."""
    bias = args.pop("bias", True)
    if isinstance(bias, bool):
        return AttentionHeads(**args, bias=bias)
    n = len(ATTENTION_PROJECTIONS)
    if not (isinstance(bias, list) and len(bias) == n and all(isinstance(b, bool) for b in bias)):
        raise ModelFileError(f"layer {name!r} (AttentionHeads): bias must be a bool or {n} bools, got {str(bias)[:80]}")
    attn = AttentionHeads(**args, bias=True)
    for part, has_bias in zip(ATTENTION_PROJECTIONS, bias, strict=True):
        if not has_bias:
            getattr(attn, part).register_parameter("bias", None)
    return attn


def build_layer(entry: Any) -> tuple[str, nn.Module]:
    """(name, module with arbitrary weights) from a layer entry; unknown types and arguments are refused."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or not isinstance(entry.get("args"), dict):
        raise ModelFileError(f"invalid layer description in model file: {str(entry)[:80]}")
    kind, args = entry["type"], dict(entry["args"])
    if kind not in LAYERS:
        raise ModelFileError(f"unknown layer type {kind!r} in model file")
    unexpected = set(args) - set(LAYERS[kind][1]) - EXTRA_ARGS.get(kind, set())
    if unexpected:  # only the arguments the writer writes: no device=, dtype= or other surprises
        raise ModelFileError(f"layer {entry.get('name')!r} ({kind}) has unexpected arguments {sorted(unexpected)}")
    cls = LAYERS[kind][0]
    if kind == "Select":
        return str(entry["name"]), Select(torch.zeros(int(args["index_size"]), dtype=torch.long), args.get("n_in"))
    if kind == "Realign":
        n, c = int(args["n_carried"]), int(args["n_channels"])
        index = torch.zeros(n, dtype=torch.long)
        return str(entry["name"]), Realign(index, index, torch.zeros(c))
    if kind == "AttentionHeads":
        return str(entry["name"]), _attention(str(entry["name"]), args)
    return str(entry["name"]), cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def model_spec(model: nn.Sequential) -> list[dict[str, Any]]:
    """The layer list of a flat plain `nn.Sequential`: name, type and constructor arguments."""
    return [layer_entry(name, m) for name, m in model.named_children()]


def build_from_spec(spec: list[dict[str, Any]]) -> nn.Sequential:
    """Rebuild the plain model (random weights) from its layer list; unknown types are refused."""
    model = nn.Sequential()
    try:
        for entry in spec:
            name, module = build_layer(entry)
            model.add_module(name, module)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"invalid layer description in model file: {exc}") from exc
    return model
