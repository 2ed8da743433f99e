"""The shrunk model as a loadable file: a JSON layer spec plus a state_dict, read with weights_only=True.

Loading never unpickles code: the architecture is rebuilt from a whitelist of plain PyTorch module
types and their constructor arguments, then the tensors are loaded into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.shrink import AppendOnes, Select
from ..train.checkpoint import atomic_write

FORMAT = "bayescomp-plain"
VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, corrupt, from a newer version, or describes unknown layers."""


#: type name -> (class, constructor arguments read off an instance)
_LAYERS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")),
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
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool1d": (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool1d": (nn.AdaptiveMaxPool1d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
    "Select": (Select, ("n_in",)),
    "AppendOnes": (AppendOnes, ()),
}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def model_spec(model: nn.Sequential) -> list[dict[str, Any]]:
    """The layer list of a flat plain `nn.Sequential`: name, type and constructor arguments."""
    spec = []
    for name, m in model.named_children():
        kind = type(m).__name__
        if kind not in _LAYERS or type(m) is not _LAYERS[kind][0]:
            raise ModelFileError(f"{name}: {kind} cannot be stored in a plain model file")
        args = {a: _jsonable(getattr(m, a)) for a in _LAYERS[kind][1]}
        if kind in ("Linear", "Conv2d"):
            args["bias"] = m.bias is not None
        if kind == "Select":
            args["index_size"] = int(m.index.numel())
        spec.append({"name": name, "type": kind, "args": args})
    return spec


def build_from_spec(spec: list[dict[str, Any]]) -> nn.Sequential:
    """Rebuild the plain model (random weights) from its layer list; unknown types are refused."""
    model = nn.Sequential()
    try:
        for entry in spec:
            kind, args = entry["type"], dict(entry["args"])
            if kind not in _LAYERS:
                raise ModelFileError(f"unknown layer type {kind!r} in model file")
            cls = _LAYERS[kind][0]
            if kind == "Select":
                module: nn.Module = Select(torch.zeros(int(args["index_size"]), dtype=torch.long), args.get("n_in"))
            else:
                module = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
            model.add_module(str(entry["name"]), module)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"invalid layer description in model file: {exc}") from exc
    return model


def save_plain(path: str | os.PathLike, model: nn.Sequential, meta: dict[str, Any] | None = None) -> None:
    """Write the plain model (spec + tensors + JSON metadata) atomically."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "spec": json.dumps(model_spec(model)),
        "meta": json.dumps(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_plain(path: str | os.PathLike) -> tuple[nn.Sequential, dict[str, Any]]:
    """The plain model (in eval mode) and its metadata from a file written by `save_plain`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read model file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a bayescomp plain model file")
    if state.get("version") != VERSION:
        raise ModelFileError(f"{path} has format version {state.get('version')}; this bayescomp reads {VERSION}")
    try:
        model = build_from_spec(json.loads(state["spec"]))
        model.load_state_dict(state["state_dict"])
        meta = json.loads(state["meta"])
    except (KeyError, RuntimeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"model file {path} is inconsistent: {exc}") from exc
    return model.eval(), meta
