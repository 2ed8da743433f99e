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
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import BayescompError, atomic_write
from ..compress.runtime import with_pooling
from .plain import FORMAT, VERSIONS, ModelFileError, any_spec, architecture_version, build_architecture


class ExportError(BayescompError, RuntimeError):
    """An export that cannot be made (missing package, unsupported model)."""


Example = torch.Tensor | tuple[torch.Tensor, ...]
log = logging.getLogger("bayescomp")


def _inputs(example_input: Example) -> tuple[torch.Tensor, ...]:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError("example_input must be a tensor or a tuple of tensors (one batch the model accepts)")
    return args


def _names(given: Sequence[str] | None, n: int, one: str, many: str) -> list[str]:
    if given is None:
        return [one] if n == 1 else [f"{many}{i}" for i in range(n)]
    if len(given) != n:
        raise ExportError(f"{len(given)} names given for {n} {many}s")
    return list(given)


def onnx_max_diff(model: nn.Module, path: str | os.PathLike, args: tuple[torch.Tensor, ...],
                  input_names: Sequence[str]) -> float | None:
    """Max |ONNX − PyTorch| over all outputs on `args`, run with onnxruntime (None: onnxruntime not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(input_names, args, strict=True)})
    with torch.no_grad():
        want = model(*args)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    return max(float((torch.as_tensor(g) - w.detach().cpu()).abs().max()) for g, w in zip(got, want, strict=True))


def export_onnx(model: Any, example_input: Example | str | os.PathLike, path: Any = "model.onnx", opset: int = 17, *,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                check: bool = True, atol: float = 1e-5) -> Path:
    """Write a compressed model (a `CompressedModel` or any plain `nn.Module`) as ONNX; return the path.

    `example_input`: one batch the model accepts, a tensor or a tuple of tensors (one per input). Inputs
    are named "input" (or "input0", "input1", ...), outputs "logits" (or "output0", ...), unless
    `input_names`/`output_names` say otherwise; the batch axis (dimension 0) is dynamic. With `check`
    and onnxruntime installed, the ONNX graph is run on `example_input` and its outputs must equal the
    PyTorch model's within `atol` (else `ExportError`); the difference is logged. `FastMaxPool2d`
    modules are written as plain max pooling; `model` itself is left as it is.

    The earlier form ``export_onnx(model, path, input_shape)`` (one example's shape, e.g. (1, 28, 28))
    still works: it exports on a zero batch of two.
    """
    if isinstance(example_input, (str, os.PathLike)):  # the earlier form: (model, path, input_shape)
        example_input, path = torch.zeros(2, *path), example_input
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'bayescomp[export]'") from exc
    model = getattr(model, "model", model)  # a CompressedModel's plain model
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx takes a CompressedModel or an nn.Module, not {type(model).__name__}")
    args = _inputs(example_input)
    model = with_pooling(model, fast=False).eval()
    with torch.no_grad():
        out = model(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    ins = _names(input_names, len(args), "input", "input")
    outs = _names(output_names, n_out, "logits", "output")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, args, buffer, dynamo=False, input_names=ins, output_names=outs,
                          dynamic_axes={n: {0: "batch"} for n in (*ins, *outs)}, opset_version=opset)
    atomic_write(path, buffer.getvalue())
    if check:
        diff = onnx_max_diff(model, path, args, ins)
        if diff is None:
            log.info("exported %s (not checked: onnxruntime is not installed)", path)
        elif not diff <= atol:
            Path(path).unlink(missing_ok=True)
            raise ExportError(f"the ONNX export differs from the PyTorch model by {diff:.3g} (> {atol:g}); not written")
        else:
            log.info("exported %s; onnxruntime outputs equal PyTorch's within %.3g", path, diff)
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
    version = metadata.get("version")
    if version is not None and version not in {str(v) for v in VERSIONS}:
        raise ModelFileError(f"{path}: model version {version[:20]!r} is not one this bayescomp reads")
    try:
        if "spec" not in metadata and "graph" not in metadata:
            raise ModelFileError("no architecture (spec or graph) in its metadata")
        key = "graph" if "graph" in metadata else "spec"
        # early exports have no version: the one their architecture calls for
        expected = architecture_version(key, json.loads(metadata[key]))
        model = build_architecture(expected if version is None else int(version), metadata)
        model.load_state_dict(tensors)
        meta = json.loads(metadata.get("meta", "{}"))
    except ModelFileError as exc:
        raise ModelFileError(f"safetensors file {path}: {exc}") from exc
    except (KeyError, TypeError, RuntimeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"safetensors file {path} is inconsistent: {exc}") from exc
    return model.eval(), meta
