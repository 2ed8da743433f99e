"""Where each tensor of the traced graph carries its channels: the per-tensor *channel axis*.

A convolution's tensors carry channels on dimension 1, (N, C, H, W); a Linear layer's output carries its
features on the LAST dimension, so a Linear on (N, T, F) reads channels on dimension -1 and its groups —
the input features — are shared across tokens. Every tensor of the analysis has one axis (an int ≥ 1;
dimension 0 is the batch) or none: an *opaque* tensor, which no channel can be followed through (the
output of an attention product, of a reshape that splits the channel axis, of a dense module). An opaque
tensor is always carried whole.

Each consumer reads each operand *along an axis* (its view). Where the view is the operand's own axis,
channels are followed one by one (a channel nobody reads is not computed). Where it is not — an opaque
operand, a transposed view, a broadcast operand — the operand is read whole (every channel it has is
computed, the constant ones put back) and the consumer then picks the channels it reads along its view
(a `Select`). Exact in every case; only the pruning stops there.

This module holds the pure bookkeeping: how a shape op moves the axis (`unsqueeze_axis`,
`permute_axis`, `reshape_map`, `index_axis`, `reduce_axis`, `squeeze_axis`), which operand dimension
lines up with a result's axis under broadcasting (`broadcast_view`), and `full_shape`, which a shrunk
graph calls where the original model read the size of a tensor whose channels were cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..convert import UnsupportedLayerError
from .rules import OpRule


@dataclass
class Info:
    """What the analysis knows of one node of the traced graph."""

    kind: str  # input, param, meta (a size), depthwise, or a rule kind (rules.KINDS)
    inputs: list[fx.Node] = field(default_factory=list)  # tensor operands, in order
    shape: tuple[int, ...] | None = None
    axis: int | None = None  # the dimension holding its channels; None: opaque (one whole-tensor flag)
    views: list[int | None] = field(default_factory=list)  # per operand: the dimension read as its channels
    const: Tensor | None = None  # float64 per channel, NaN = varies
    need: Tensor | None = None  # channels some consumer reads physically
    carried: Tensor | None = None  # channels the shrunk network produces
    reads: list[Tensor] = field(default_factory=list)  # per operand: channels (along its view) the shrunk op reads
    module: nn.Module | None = None
    rule: OpRule | None = None
    own: Tensor | None = None  # a group-sparse layer's own keep-mask
    block: tuple[int, int] = (1, 1)  # flatten-like: (outer, inner), channel c at (o·C + c)·inner + i
    slices: list[tuple[int, int]] = field(default_factory=list)  # cat along the channels: each operand's range
    value: Tensor | None = None  # a parameter's tensor (param)
    resize: tuple[int, str] | None = None  # shape op: (position in its sizes, "count" or "keep") to rewrite

    @property
    def varying(self) -> Tensor:
        return torch.isnan(self.const)

    @property
    def width(self) -> int:
        """How many channel flags it has: its channel count, or 1 for an opaque tensor."""
        return 1 if self.axis is None else self.shape[self.axis]


def label(node: fx.Node) -> str:
    """A node's name for error messages: the module path, or the op and the module it runs in."""
    if node.op == "call_module":
        return f"{node.target}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    inside = next(reversed(stack.values()))[0] if stack else ""
    return f"node {node.name!r} ({target}{', in ' + inside if inside else ''})"


def module_path(node: fx.Node) -> str:
    """The path of the module a node is (call_module) or runs in ("" for the model's own forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def unsupported(node: fx.Node, why: str) -> UnsupportedLayerError:
    """The refusal of one node; `.path` is the module it is or runs in, for `check`'s suggested fix."""
    exc = UnsupportedLayerError(f"{label(node)}: {why}")
    exc.path = module_path(node)  # type: ignore[attr-defined]
    return exc


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a node's tensor (None: not a tensor)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def norm_dim(d: int, rank: int) -> int:
    """A dimension index made non-negative (``-1`` of a rank-3 tensor is 2)."""
    return d + rank if d < 0 else d


def unsqueeze_axis(axis: int, rank_out: int, dim: int) -> int:
    """The axis after inserting a dimension at `dim` (an index into the result, of rank `rank_out`)."""
    return axis + 1 if norm_dim(dim, rank_out) <= axis else axis


def squeeze_axis(axis: int, shape: tuple[int, ...], dims: list[int] | None) -> int | None:
    """The axis after removing the size-1 dimensions `dims` (None: every size-1 one); None when the axis goes."""
    rank = len(shape)
    gone = {d for d in range(rank) if shape[d] == 1} if dims is None else \
        {norm_dim(d, rank) for d in dims if shape[norm_dim(d, rank)] == 1}
    if axis in gone:
        return None
    return axis - sum(1 for d in gone if d < axis)


def permute_axis(axis: int, order: list[int]) -> int:
    """The axis after ``permute(order)``: the position where the old axis lands."""
    rank = len(order)
    return [norm_dim(d, rank) for d in order].index(axis)


def transpose_axis(axis: int, rank: int, d0: int, d1: int) -> int:
    """The axis after swapping dimensions `d0` and `d1`."""
    a, b = norm_dim(d0, rank), norm_dim(d1, rank)
    return b if axis == a else a if axis == b else axis


def reduce_axis(axis: int, rank: int, dims: list[int], keepdim: bool) -> int | None:
    """The axis after a reduction over `dims`; None when the reduction runs over the axis itself."""
    dims = [norm_dim(d, rank) for d in dims]
    if axis in dims:
        return None
    return axis if keepdim else axis - sum(1 for d in dims if d < axis)


def reshape_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> tuple[int, int, int] | None:
    """How a reshape (view, reshape, flatten) carries the channel axis: ``(b, outer, inner)`` when the
    result's dimension `b` holds, for each of `outer` blocks, the C channels each repeated `inner` times
    (channel c at positions ``(o·C + c)·inner + i``: a flatten-like block map; ``outer = inner = 1`` when
    the axis is kept as it is); None when the axis is split or merged with the batch dimension (then the
    tensor is carried whole). Row-major layout makes this exact: the dimensions in front of `b` hold the
    same elements as those in front of the merged range.
    """
    rank = len(in_shape)
    ranges = [(axis, axis)] + [(s, e) for s in range(1, axis + 1) for e in range(axis, rank) if (s, e) != (axis, axis)]
    for start, end in ranges:
        before = math.prod(in_shape[:start])
        size = math.prod(in_shape[start:end + 1])
        for b in range(1, len(out_shape)):
            if math.prod(out_shape[:b]) == before and out_shape[b] == size:
                return b, math.prod(in_shape[start:axis]), math.prod(in_shape[axis + 1:end + 1])
    return None


def index_axis(rank: int, index: Any, axis: int, is_tensor: Any) -> int | None:
    """The axis after ``x[index]`` (ints, full or partial slices, None, Ellipsis); None when the index
    picks within the channel axis or uses a tensor (advanced indexing): the result is then opaque.
    `is_tensor(item)` tells an index tensor from an int computed in the graph."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(is_tensor(i) or isinstance(i, (list, bool, Tensor)) for i in items):
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if sum(1 for i in items if i is Ellipsis) > 1:
        return None
    expanded: list[Any] = []
    for i in items:
        expanded += [slice(None)] * (rank - used) if i is Ellipsis else [i]
    pos_in = pos_out = 0
    for i in expanded:
        if i is None:
            pos_out += 1
            continue
        if pos_in == axis:
            return pos_out if isinstance(i, slice) and i == slice(None) else None
        pos_in += 1
        if isinstance(i, slice):
            pos_out += 1
    return pos_out + (axis - pos_in)


def broadcast_view(operand_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The dimension of an operand that lines up with the result's channel `axis` under broadcasting
    (right-aligned), or None when the operand is broadcast along it (missing, or of size 1 against more)."""
    q = axis - (len(out_shape) - len(operand_shape))
    if q < 0 or operand_shape[q] != out_shape[axis]:
        return None
    return q


def along(values: Tensor, axis: int, rank: int) -> Tensor:
    """A per-channel vector shaped to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def per_channel(t: Tensor, axis: int) -> Tensor:
    """Each channel's value where it is the same everywhere along the other dimensions, else NaN (float64)."""
    flat = t.detach().double().movedim(axis, 0).reshape(t.shape[axis], -1)
    if flat.shape[1] == 0:
        return torch.full((t.shape[axis],), math.nan, dtype=torch.float64)
    uniform = (flat.amax(1) == flat.amin(1)) & torch.isfinite(flat[:, 0])
    return torch.where(uniform, flat[:, 0], torch.full_like(flat[:, 0], math.nan))


def full_shape(x: Tensor, axis: int, channels: int) -> torch.Size:
    """The shape the original model saw: `x`'s, with its channel axis of the original width `channels`.

    A shrunk graph calls this where the original read the shape of a tensor whose channels were cut, so
    that sizes computed from it (``B, T, C = x.shape``; ``C // heads``) keep their original values."""
    shape = list(x.shape)
    shape[axis] = channels
    return torch.Size(shape)
