"""Export a compressed model for use without bayescomp: ONNX (the graph and weights) and safetensors (weights).

Both need optional packages (``pip install bayescomp[export]``): onnx for ONNX, safetensors for safetensors.

A safetensors file holds the tensors, and in its string metadata the architecture as `io.plain` describes it:
``"spec"`` (the layer list, `model_spec`) for an `nn.Sequential` chain, or ``"graph"`` (`graph_spec`) for the
`torch.fx.GraphModule` of a residual or concatenating network; ``"version"`` is the matching model-file version.
`load_safetensors` rebuilds either from the whitelists, without unpickling anything.

ONNX export writes each `FastMaxPool2d` of a compressed model as the `nn.MaxPool2d` it computes the
values of: a standard MaxPool node, not its slices and maxima.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import BayescompError, atomic_write
from ..compress.runtime import with_pooling
from .plain import FORMAT, GRAPH_VERSION, VERSION, ModelFileError, any_spec, build_from_spec, build_graph


class ExportError(BayescompError, RuntimeError):
    """An export that cannot be made (missing package, unsupported model)."""


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], opset: int = 17) -> Path:
    """Write `model` as an ONNX graph with a dynamic batch axis; input name "input", output "logits".

    `input_shape` is one example's shape, e.g. (1, 28, 28) for MNIST. `FastMaxPool2d` modules are exported
    as plain max pooling (a copy of the model is exported; `model` itself is left as it is).
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'bayescomp[export]'") from exc
    model = with_pooling(model, fast=False).eval()
    example = torch.zeros(2, *input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def export_safetensors(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write the model's tensors as safetensors; the architecture (io.plain: a chain's layer list or a
    GraphModule's graph) and `meta` go into its metadata."""
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise ExportError("safetensors export needs the safetensors package: pip install 'bayescomp[export]'") from exc
    version, key, spec = any_spec(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "version": str(version), key: json.dumps(spec), "meta": json.dumps(meta or {})}
    atomic_write(path, save(tensors, metadata=metadata))
    return Path(path)


def load_safetensors(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The plain model (eval mode) and its `meta` from a file written by `export_safetensors`.

    An `nn.Sequential` for a chain, a `torch.fx.GraphModule` for a graph model; raises `ModelFileError`
    for a file that is not such an export or whose architecture does not fit its tensors.
    """
    try:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ExportError("reading safetensors needs the safetensors package: pip install 'bayescomp[export]'") from exc
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read safetensors file {path}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a bayescomp safetensors export")
    key = "graph" if "graph" in metadata else "spec"
    version = metadata.get("version", str(GRAPH_VERSION if key == "graph" else VERSION))  # early exports: none
    if version != str(GRAPH_VERSION if key == "graph" else VERSION):
        raise ModelFileError(f"{path}: model version {version[:20]!r} with a {key!r} architecture is not one this "
                             "bayescomp reads")
    try:
        if key not in metadata:
            raise ModelFileError("no architecture (spec or graph) in its metadata")
        spec = json.loads(metadata[key])
        model: nn.Module = build_graph(spec) if key == "graph" else build_from_spec(spec)
        model.load_state_dict(tensors)
        meta = json.loads(metadata.get("meta", "{}"))
    except ModelFileError as exc:
        raise ModelFileError(f"safetensors file {path}: {exc}") from exc
    except (KeyError, TypeError, RuntimeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"safetensors file {path} is inconsistent: {exc}") from exc
    return model.eval(), meta
