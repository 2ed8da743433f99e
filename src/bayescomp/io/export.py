"""Export a compressed model for use without bayescomp: ONNX (the graph and weights) and safetensors (weights).

Both need optional packages (``pip install bayescomp[export]``): onnx for ONNX, safetensors for safetensors.
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

from ..train.checkpoint import atomic_write_bytes
from .plain import model_spec


class ExportError(RuntimeError):
    """An export that cannot be made (missing package, unsupported model)."""


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], opset: int = 17) -> Path:
    """Write `model` as an ONNX graph with a dynamic batch axis; input name "input", output "logits".

    `input_shape` is one example's shape, e.g. (1, 28, 28) for MNIST.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'bayescomp[export]'") from exc
    model = model.eval()
    example = torch.zeros(2, *input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def export_safetensors(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write the model's tensors as safetensors; the layer spec (io.plain) and `meta` go into its metadata."""
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise ExportError("safetensors export needs the safetensors package: pip install 'bayescomp[export]'") from exc
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "bayescomp-plain", "spec": json.dumps(model_spec(model)), "meta": json.dumps(meta or {})}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)
