"""How the analysis classifies the ops that move, merge or combine channel axes (`channel_axes`): reshapes,
unsqueeze/squeeze/transpose/permute/expand, indexing, reductions, element-wise ops of several tensors,
concatenation and whole-tensor products. A mixin of `analysis.Analysis`: each method takes a node (and
its recorded shape and rule) and returns its `Info`, with the result's channel axis and, per operand,
the axis the op reads it along.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .channel_axes import (
    Info,
    broadcast_view,
    index_axis,
    norm_dim,
    permute_axis,
    reduce_axis,
    reshape_map,
    shape_of,
    squeeze_axis,
    transpose_axis,
    unsqueeze_axis,
    unsupported,
)
from .rules import OpRule


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _varargs(node: fx.Node, name: str) -> Any:
    """The sizes or dims of a method called as ``x.view(a, b)`` or ``x.view((a, b))`` (or torch.f(x, dims))."""
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    if not rest:
        value = node.kwargs.get(name)
        return None if value is None else list(value) if isinstance(value, (tuple, list)) else [value]
    return list(rest)


class ShapeOps:
    """Classification of the ops that move or combine channel axes (mixed into `analysis.Analysis`)."""

    info: dict[fx.Node, Info]
    modules: dict[str, Any]

    def _tensor_input(self, node: fx.Node, value: Any) -> fx.Node:  # pragma: no cover - defined by Analysis
        raise NotImplementedError

    def _is_tensor(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.info[value].kind != "meta"

    def _no_other_tensors(self, node: fx.Node, x: fx.Node) -> None:
        others: list[fx.Node] = []
        fx.node.map_arg((node.args[1:], node.kwargs), others.append)
        if any(self._is_tensor(o) for o in others):
            raise unsupported(node, "a second tensor operand is not supported for this op")

    def _opaque(self, node: fx.Node, shape: tuple[int, ...], inputs: list[fx.Node], kind: str = "whole") -> Info:
        """An op whose result no channel can be followed into: it reads every operand whole."""
        return Info(kind, inputs, shape, None, [None] * len(inputs))

    def _whole(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        return self._opaque(node, shape, [x for x in inputs if self._is_tensor(x)])

    def _reduction(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        x = self._tensor_input(node, node.args[0])
        self._no_other_tensors(node, x)
        rank = len(shape_of(x))
        dims = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        axis = self.info[x].axis
        if dims is None or axis is None:
            return self._opaque(node, shape, [x])
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            raise unsupported(node, f"a reduction over the dimensions {dims} computed in the graph")
        if 0 in [norm_dim(d, rank) for d in dims]:
            raise unsupported(node, f"a reduction over dimensions {dims} mixes the examples of a batch")
        out = reduce_axis(axis, rank, dims, keepdim)
        if out is None:  # over the channels themselves: every channel read, the result opaque
            return self._opaque(node, shape, [x])
        return Info("channelwise", [x], shape, out, [axis], rule=rule)

    def _binary(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        args = list(node.args) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
        kwargs = {k: v for k, v in node.kwargs.items() if k != "other"}
        if kwargs or len(args) not in ((3,) if node.target is torch.where else (2,)):
            raise unsupported(node, f"arguments {sorted(kwargs)} are not supported for an element-wise op")
        inputs = []
        for a in args:
            if self._is_tensor(a):
                inputs.append(a)
            elif not isinstance(a, (int, float, bool, fx.Node)):
                raise unsupported(node, f"operand of type {type(a).__name__} is not supported")
        if not inputs:  # pragma: no cover - fx does not record ops on plain numbers
            raise unsupported(node, "no tensor operand")
        axis = None
        # a computed tensor of the result's shape decides first, then a broadcast one, then a parameter
        for x in sorted(inputs, key=lambda n: (self.info[n].kind == "param", shape_of(n) != shape)):
            a, s = self.info[x].axis, shape_of(x)
            if a is not None and s[a] == shape[a + len(shape) - len(s)]:
                axis = a + len(shape) - len(s)
                break
        if axis is None:
            return self._opaque(node, shape, inputs, "binary")
        return Info("binary", inputs, shape, axis, [broadcast_view(shape_of(x), shape, axis) for x in inputs])

    def _cat(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(dim, int):
            raise unsupported(node, f"concatenation along the dimension {dim!r} computed in the graph")
        inputs = [self._tensor_input(node, t) for t in tensors]
        dim = norm_dim(dim, len(shape))
        axis = next((self.info[x].axis for x in inputs if self.info[x].kind != "param"
                     and self.info[x].axis is not None), None)
        if axis is None or dim == 0:
            return self._opaque(node, shape, inputs, "cat")
        slices, start = [], 0
        if dim == axis:
            for t in inputs:
                c = shape_of(t)[axis]
                slices.append((start, start + c))
                start += c
        return Info("cat", inputs, shape, axis, [axis] * len(inputs), slices=slices)

    def _flatten(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        """flatten, view, reshape: the axis kept whole, made blocks of features, or lost (an opaque result)."""
        x = self._tensor_input(node, node.args[0] if node.args else node.kwargs.get("input"))
        self._no_other_tensors(node, x)
        in_shape, axis = shape_of(x), self.info[x].axis
        found = None if axis is None else reshape_map(in_shape, shape, axis)
        module = self.modules[str(node.target)] if node.op == "call_module" else None
        if found is None:
            info = self._opaque(node, shape, [x], "flatten")
            info.module = module
            return info
        b, outer, inner = found
        info = Info("flatten", [x], shape, b, [axis], module=module, block=(outer, inner))
        if node.op != "call_module" and node.target not in ("flatten", torch.flatten):
            sizes = _varargs(node, "shape")
            if sizes is None or len(sizes) != len(shape):  # sizes given as one computed shape: not rewritable
                return self._opaque(node, shape, [x], "flatten")
            info.resize = (b, "count")
        return info

    def _shape(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        """unsqueeze, squeeze, transpose, permute, expand, indexing: the axis moves, the channels stay."""
        x = self._tensor_input(node, node.args[0] if node.args else node.kwargs.get("input"))
        in_shape, axis = shape_of(x), self.info[x].axis
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.target is operator.getitem:
            index = node.args[1]
            items = list(index) if isinstance(index, tuple) else [index]
            tensors = [i for i in items if self._is_tensor(i)]
            if tensors:  # advanced indexing: read whole
                return self._opaque(node, shape, [x, *tensors])
            out = None if axis is None else index_axis(len(in_shape), index, axis, self._is_tensor)
            return Info("shape", [x], shape, out, [axis if out is not None else None])
        self._no_other_tensors(node, x)
        if axis is None:
            return self._opaque(node, shape, [x], "shape")
        resize = None
        if name == "unsqueeze":
            out = unsqueeze_axis(axis, len(shape), _arg(node, 1, "dim"))
        elif name == "squeeze":
            dims = _varargs(node, "dim")
            out = squeeze_axis(axis, in_shape, dims)
        elif name == "transpose":
            out = transpose_axis(axis, len(in_shape), _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        elif name == "permute":
            out = permute_axis(axis, _varargs(node, "dims"))
        elif name == "expand":
            out = axis + len(shape) - len(in_shape)
            resize = (out, "keep")
        else:  # pragma: no cover - every SHAPE rule is listed above
            raise unsupported(node, f"no axis rule for {name!r}")
        if out is None:
            return self._opaque(node, shape, [x], "shape")
        return Info("shape", [x], shape, out, [axis], resize=resize)

    def _meta(self, node: fx.Node) -> Info:
        """A size (``x.shape[0] * x.shape[1]``, ``x.size(-1) // heads``): metadata, not a tensor op."""
        shape_query = (node.op == "call_method" and node.target in ("size", "dim")) or (
            node.op == "call_function" and node.target is getattr and node.args[1:] in (("shape",), ("ndim",)))
        inputs = node.all_input_nodes
        from_meta = node.op == "call_function" and all(self.info[a].kind == "meta" for a in inputs)
        if not (shape_query or from_meta):
            raise unsupported(node, "an op that does not return a single tensor is not supported (a tuple of "
                                    "tensors, e.g. from split or chunk: use separate layers or indexing)")
        return Info("meta", list(inputs))


def block_reads(need: torch.Tensor, channels: int, block: tuple[int, int]) -> torch.Tensor:
    """The input channels a flatten-like block map reads: those with a needed feature in some block."""
    outer, inner = block
    return need.view(outer, channels, inner).any(dim=2).any(dim=0)


def block_spread(per_channel: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-channel values (or flags) laid out as the features of a flatten-like block map."""
    outer, inner = block
    return per_channel.view(1, -1, 1).expand(outer, -1, inner).reshape(-1)
