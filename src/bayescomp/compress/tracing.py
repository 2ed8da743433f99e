"""The traced representation every model is compressed through: a torch.fx graph with each tensor's shape.

torch.fx is part of PyTorch and gives the graph, the module paths and (with `ShapeProp`) the shapes,
which is all the channel analysis needs. Group-sparse layers and every module with a rule in
`rules.MODULE_RULES` (a user's registered channel-wise module too) are kept as leaves — an `AttentionHeads`
among them (its forward's control flow on masks and ranks cannot be traced; the analysis treats it whole).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..convert import UnsupportedLayerError
from ..nn import GroupSparseLayer
from .rules import module_rule

#: the largest square image side tried when a chain is compressed without an example input
MAX_SIDE = 1024


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps modules with a rule as leaves and remembers where tracing failed."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_rule(m) is not None or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_bayescomp_path"):
                try:
                    exc._bayescomp_path = self.path_of_module(m)  # type: ignore[attr-defined]
                except Exception:  # pragma: no cover - path lookup never fails for submodules
                    pass
            raise


def trace(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> fx.GraphModule:
    """Symbolically trace `model` and record every tensor's shape for `example_input`.

    Raises `UnsupportedLayerError` naming the module whose forward cannot be traced, and `ValueError`
    when the example input does not fit the model.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        path = getattr(exc, "_bayescomp_path", "")
        where = f"{path} ({type(model.get_submodule(path)).__name__})" if path else type(model).__name__
        err = UnsupportedLayerError(
            f"{where}: torch.fx cannot trace this module ({type(exc).__name__}: {exc}); compression "
            "needs a forward without data-dependent control flow"
        )
        err.path = path  # type: ignore[attr-defined]  # the module to exclude (check's suggested fix)
        raise err from exc
    gm = fx.GraphModule(model, graph)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise ValueError(f"example_input does not fit the model: {type(exc).__name__}: {exc}") from exc
    return gm


def _first_layer(model: nn.Sequential) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (GroupSparseLayer, nn.Linear, nn.Conv2d, nn.Conv1d)):
            return m
    return None


@torch.no_grad()
def chain_example(model: nn.Module) -> Tensor:
    """A one-example input for an `nn.Sequential` chain compressed without `example_input`.

    Its first weighted layer fixes the channels; for a convolution, the image side is the smallest
    square one (for a 1-d convolution, the shortest sequence) the whole chain accepts (a flatten in front of a Linear layer admits only the sizes that
    give its input count, and the decision depends only on that count). Raises `UnsupportedLayerError`
    for any other model, asking for `example_input`.
    """
    first = _first_layer(model) if isinstance(model, nn.Sequential) else None
    if first is None:
        what = "has no Linear or convolution layer" if isinstance(model, nn.Sequential) else "is not an nn.Sequential"
        raise UnsupportedLayerError(
            f"{type(model).__name__}: this model {what}; pass example_input=, a batch it accepts, to compress it "
            "through its torch.fx graph"
        )
    device = next(first.parameters()).device
    dtype = next(first.parameters()).dtype
    if hasattr(first, "in_features"):
        return torch.zeros(1, first.in_features, device=device, dtype=dtype)
    spatial = len(first.kernel_size)  # 1: a sequence (Conv1d), 2: an image
    for side in range(1, MAX_SIDE + 1):
        x = torch.zeros(1, first.in_channels, *([side] * spatial), device=device, dtype=dtype)
        try:
            model(x)
        except Exception:  # noqa: BLE001 - a size the chain does not accept: try the next one
            continue
        return x
    raise UnsupportedLayerError(f"{type(model).__name__}: no input up to {MAX_SIDE} pixels a side fits this chain; "
                                "pass example_input=, a batch it accepts")
