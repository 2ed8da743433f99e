"""The shrunk model as a loadable file: a JSON architecture plus a state_dict, read with weights_only=True.

Loading never unpickles code: the architecture is rebuilt from a whitelist of plain PyTorch module
types and their constructor arguments (`io.layers`), then the tensors are loaded into it. Two kinds
of architecture are stored:

* a flat `nn.Sequential` chain (what `compress()` makes of a chain): a JSON list of layers
  (`model_spec`), file version 1;
* a `torch.fx.GraphModule` (what `compress()` makes of residual and concatenating networks): a JSON
  graph (`io.graphs.graph_spec`) of whitelisted modules, buffers and nodes, file version 2.

Either one that uses the token-model vocabulary (LayerNorm, Embedding, `AttentionHeads`, size arithmetic,
slices: `io.graphs.token_entries`) is file version 3, so a reader from before refuses it by its version; a
reader checks that a file's version is the one its architecture calls for (`architecture_version`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..base import atomic_write, load_error
from .graphs import FUNCTIONS, METHODS, build_graph, graph_spec, token_entries
from .layers import EXTRA_ARGS, LAYERS, STORED_ARGS, ModelFileError, build_from_spec, model_spec

FORMAT = "bayescomp-plain"
#: file version of a chain model (the layer list); graph models are written as GRAPH_VERSION, and either one
#: that uses the token-model vocabulary as TOKEN_VERSION
VERSION = 1
GRAPH_VERSION = 2
TOKEN_VERSION = 3
VERSIONS = (VERSION, GRAPH_VERSION, TOKEN_VERSION)


def architecture_version(key: str, arch: Any) -> int:
    """The file version an architecture is written as: "spec" (a chain) 1, "graph" 2, either with token entries 3."""
    if token_entries(arch):
        return TOKEN_VERSION
    return GRAPH_VERSION if key == "graph" else VERSION


def any_spec(model: nn.Module) -> tuple[int, str, Any]:
    """(file version, key, JSON-able architecture) of a chain or a GraphModule."""
    if isinstance(model, fx.GraphModule):
        key, arch = "graph", graph_spec(model)
    elif isinstance(model, nn.Sequential):
        key, arch = "spec", model_spec(model)
    else:
        raise ModelFileError(f"{type(model).__name__} cannot be stored: a model file holds an nn.Sequential chain or "
                         "the torch.fx.GraphModule that graph_compress makes")
    return architecture_version(key, arch), key, arch


def build_architecture(version: Any, holder: Any) -> nn.Module:
    """The model (arbitrary weights) a file's architecture describes: `holder` maps "spec" or "graph" (exactly one)
    to its JSON text. The file's `version` must be the one that architecture is written as (`ModelFileError`)."""
    keys = [k for k in ("spec", "graph") if k in holder]
    if len(keys) != 1:
        raise ModelFileError("the file must hold one architecture, a layer list (spec) or a graph")
    key = keys[0]
    arch = json.loads(holder[key])
    expected = architecture_version(key, arch)
    if version != expected:
        uses = token_entries(arch)
        what = f"uses {', '.join(uses)}" if uses else f"is a {'graph' if key == 'graph' else 'layer list'}"
        raise ModelFileError(f"format version {version} does not match its architecture, which {what} "
                             f"(version {expected})")
    return build_graph(arch) if key == "graph" else build_from_spec(arch)


def save_plain(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write the plain model (spec + tensors + JSON metadata) atomically: a chain or a compressed GraphModule."""
    version, key, spec = any_spec(model)
    state = {
        "format": FORMAT,
        "version": version,
        key: json.dumps(spec),
        "meta": json.dumps(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_plain(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The plain model (in eval mode) and its metadata from a file written by `save_plain`.

    An `nn.Sequential` for a chain, a `torch.fx.GraphModule` for a residual or concatenating network.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read model file {path}: {load_error(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a bayescomp plain model file")
    version = state.get("version")
    if version not in VERSIONS:
        raise ModelFileError(f"{path} has format version {version}; this bayescomp reads {', '.join(map(str, VERSIONS))}")
    try:
        model = build_architecture(version, state)
        if not isinstance(state["state_dict"], dict):
            raise ModelFileError("the tensors are not a state_dict")
        model.load_state_dict(state["state_dict"])
        meta = json.loads(state["meta"])
    except ModelFileError as exc:
        raise ModelFileError(f"model file {path}: {exc}") from exc
    except (KeyError, TypeError, RuntimeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"model file {path} is inconsistent: {exc}") from exc
    return model.eval(), meta


__all__ = ["EXTRA_ARGS", "FORMAT", "FUNCTIONS", "GRAPH_VERSION", "LAYERS", "METHODS", "STORED_ARGS", "TOKEN_VERSION",
           "VERSION", "VERSIONS",
           "ModelFileError", "any_spec", "architecture_version", "build_architecture", "build_from_spec", "build_graph",
           "graph_spec", "load_plain", "model_spec", "save_plain", "token_entries"]
