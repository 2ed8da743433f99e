"""Compression of general networks (residual additions, concatenations, depthwise convolutions).

`compress()` handles `nn.Sequential` chains. `graph_compress()` handles any model that torch.fx can
trace symbolically: it finds which channels are tied together, decides which can go, and rebuilds
the network as a smaller plain `torch.fx.GraphModule` that computes exactly what the masked Bayesian
network computes at evaluation — the same contract as `shrink()`.

Why torch.fx and not Torch-Pruning
----------------------------------
Torch-Pruning's `DependencyGraph` groups coupled channels well (it was tried on ResNet-20: pruning
an output of `layer1.0.conv2` drags the whole stage's residual stream along), but it does not serve
here: (1) it *deletes channels by index*, so a pruned channel whose batch-norm output is a nonzero
constant β − γ·mean/√(var + eps) would simply vanish from a residual sum, changing the function —
bayescomp must fold such constants into the next layer's bias (or a ones-channel) instead;
(2) its coupling is all-or-nothing, while a channel of a sum may go only when it is constant in
*every* operand, and a constant operand of a varying sum must be re-added; (3) it does not know the
group-sparse layers (it refuses to build a group for them and warns about their parameters), so it
would need custom pruners that re-implement our surgery anyway; (4) it is a further dependency.
torch.fx is part of PyTorch and gives the graph, the module paths and the shapes (with
`ShapeProp`), which is all the dependency analysis needs; the decision logic below is ours.

The analysis (two passes over the traced graph, channels along dimension 1)
--------------------------------------------------------------------------
1. Forward, per tensor a *constant per channel* (NaN where the channel varies with the input):
   a pruned conv channel is 0 (its gate covers its bias); batch norm maps c to
   γ(c − mean)/√(var + eps) + β; element-wise activations and pooling are evaluated on the constant
   (a channel counts as constant only if the result is spatially uniform, so zero-padded average
   pooling is handled); an addition/product of constants is a constant, a sum with one varying
   operand varies; concatenation concatenates; flatten repeats each channel's constant.
2. Backward, *which channels must physically exist*: a consumer reads some channels of each input
   (a dense layer reads its varying, un-gated inputs and folds constant ones into its bias, as
   `shrink` does; a channel-wise op — batch norm, activation, pooling, depthwise convolution, add,
   mul — reads the channels it must produce; a concatenation reads the matching slices; a flatten
   whole channels). A channel is carried when some consumer reads it and it is not constant.
   Hence the tying rules: for an add, a channel of the sum disappears only if it is constant in
   every operand; through a depthwise convolution or a batch norm, input and output channels go
   together; for a cat, channel ranges map to the inputs.
3. Surgery: sliced `nn.Linear`/`nn.Conv2d`/`nn.BatchNorm*d`, with `Select` where a consumer reads
   fewer channels than its producer carries, `Realign` where it reads constant channels that are
   not carried (e.g. a varying sum with one constant operand channel: the constant is put back
   exactly), and `AppendOnes` where constants feed a zero-padded convolution.

Anything else — an op that mixes channels in an unknown way, a reshape that is not a flatten, a
parameter used directly in `forward`, a model torch.fx cannot trace — raises
`UnsupportedLayerError` naming the node or module path and why. Softmax, LayerNorm and GroupNorm
are accepted as barriers: they read every channel (constants put back) and produce all of theirs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..convert import UnsupportedLayerError
from ..nn import GroupSparseLayer, zero_padded
from .chain import CHANNEL_AFFINE, ZERO_PRESERVING
from .masks import LayerMask, PruneError, _module_const, group_masks, resolve_thresholds
from .precision import exponent_bits, layer_bits, round_to_bits
from .shrink import (
    AppendOnes,
    FastMaxPool2d,
    Select,
    _constant_inputs,
    _copy_layer,
    _slice_batch_norm,
    effective_params,
    fold_origin,
)
from .summary import summarize

# ---- what each op does to channels ------------------------------------------------------------------

#: modules whose output channel c depends only on input channel c
UNARY_MODULES: tuple[type[nn.Module], ...] = ZERO_PRESERVING + (
    nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.LogSigmoid, nn.SELU, nn.CELU,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
)
#: modules that mix channels in a known way: they read all their input channels and produce all theirs
BARRIER_MODULES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.GroupNorm)

_UNARY_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad, torch.relu, torch.sigmoid, torch.tanh,
    operator.neg,
}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
_REDUCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_BARRIER_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize}
_BARRIER_METHODS = {"softmax", "log_softmax"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv,
                     torch.add, torch.sub, torch.mul, torch.div, torch.true_divide}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


class Realign(nn.Module):
    """Rebuild a channel set: ``out[:, dst] = x[:, src]``; every other channel is its constant `fill`.

    Used where an op must see channels that the shrunk network does not carry because they are
    constant (e.g. one operand of a residual sum whose channel was pruned while the other varies).
    """

    def __init__(self, src: Tensor, dst: Tensor, fill: Tensor) -> None:
        super().__init__()
        self.register_buffer("src", torch.as_tensor(src, dtype=torch.long).clone())
        self.register_buffer("dst", torch.as_tensor(dst, dtype=torch.long).clone())
        self.register_buffer("fill", fill.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = [x.shape[0], self.fill.numel(), *x.shape[2:]]
        out = self.fill.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2))).expand(shape).contiguous()
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{self.src.numel()} carried + {self.fill.numel() - self.src.numel()} constant channels"


# ---- tracing ----------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps group-sparse layers (and FastMaxPool2d, a pooling with a shape-dependent
    forward) as leaves and remembers where tracing failed."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (GroupSparseLayer, FastMaxPool2d)) or super().is_leaf_module(m, module_qualified_name)

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
    """Symbolically trace `model` (group-sparse layers as leaves) and record every tensor's shape.

    Raises `UnsupportedLayerError` naming the module whose forward cannot be traced.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        path = getattr(exc, "_bayescomp_path", "")
        where = f"{path} ({type(model.get_submodule(path)).__name__})" if path else type(model).__name__
        raise UnsupportedLayerError(
            f"{where}: torch.fx cannot trace this module ({type(exc).__name__}: {exc}); graph compression "
            "needs a forward without data-dependent control flow"
        ) from exc
    gm = fx.GraphModule(model, graph)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise ValueError(f"example_input does not fit the model: {type(exc).__name__}: {exc}") from exc
    return gm


# ---- per-node analysis --------------------------------------------------------------------------------

@dataclass
class _Info:
    kind: str  # input, weighted, depthwise, affine, unary, binary, cat, flatten, barrier, meta
    inputs: list[fx.Node] = field(default_factory=list)  # tensor operands, in order
    shape: tuple[int, ...] | None = None
    const: Tensor | None = None  # float64 per channel, NaN = varies
    need: Tensor | None = None  # channels some consumer reads physically
    carried: Tensor | None = None  # channels the shrunk network produces
    reads: list[Tensor] = field(default_factory=list)  # per operand: channels the shrunk op reads
    module: nn.Module | None = None
    own: Tensor | None = None  # a group-sparse layer's own keep-mask
    block: int = 1  # flatten: features per channel
    slices: list[tuple[int, int]] = field(default_factory=list)  # cat: channel range of each operand

    @property
    def varying(self) -> Tensor:
        return torch.isnan(self.const)


def _label(node: fx.Node) -> str:
    """A node's name for error messages: the module path, or the op and the module it runs in."""
    if node.op == "call_module":
        return f"{node.target}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    inside = next(reversed(stack.values()))[0] if stack else ""
    return f"node {node.name!r} ({target}{', in ' + inside if inside else ''})"


def _unsupported(node: fx.Node, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"{_label(node)}: {why}")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _on_device(lm: LayerMask, module: nn.Module) -> LayerMask:
    """The decision (kept on the CPU) with its tensors on the layer's device, for the surgery helpers."""
    device = next(module.parameters()).device
    return dataclasses.replace(
        lm, in_mask=lm.in_mask.to(device), out_mask=lm.out_mask.to(device), in_const=lm.in_const.to(device),
        group_keep=None if lm.group_keep is None else lm.group_keep.to(device),
    )


class _Analysis:
    """The traced graph, each tensor's channel constants, and what the shrunk network carries."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, keeps: Mapping[str, Tensor]) -> None:
        self.model = model
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.keeps = keeps
        self.info: dict[fx.Node, _Info] = {}
        self.output: fx.Node | None = None
        self._forward()
        self._backward()

    # -- classification and constants ---------------------------------------------------------------
    def _tensor_input(self, node: fx.Node, value: Any) -> fx.Node:
        if not isinstance(value, fx.Node) or self.info[value].kind == "meta":
            raise _unsupported(node, "expects a tensor operand here")
        return value

    def _check_rest(self, node: fx.Node, rest: tuple, kwargs: dict) -> None:
        if _has_node(rest) or _has_node(kwargs):
            raise _unsupported(node, "an argument other than the input tensor is computed in the graph "
                                     "(e.g. from a tensor's shape); this cannot be rebuilt for a shrunk tensor")

    def _forward(self) -> None:
        used_weighted: dict[str, fx.Node] = {}
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.output = node
                continue
            info = self._classify(node)
            if info.kind != "meta":
                if info.shape is None or len(info.shape) < 2:
                    raise _unsupported(node, f"gives a tensor of shape {info.shape}; channels must run along dimension 1")
                info.need = torch.zeros(info.shape[1], dtype=torch.bool)
            if info.kind in ("weighted", "depthwise"):
                if node.target in used_weighted:
                    raise _unsupported(node, "the layer is called more than once (shared weights cannot be shrunk per call)")
                used_weighted[str(node.target)] = node
            self.info[node] = info
            if info.kind != "meta":
                info.const = self._const(node, info)

    def _classify(self, node: fx.Node) -> _Info:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is None:
                raise _unsupported(node, "model inputs must be tensors")
            return _Info("input", shape=shape)
        if node.op == "get_attr":
            raise _unsupported(node, f"the forward uses the tensor attribute {node.target!r} directly; "
                                     "only registered layers can be shrunk")
        if shape is None:  # sizes and shapes (x.size(0), x.shape[0]): only reshapes may use them
            shape_query = (node.op == "call_method" and node.target == "size") or (
                node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            from_meta = node.op == "call_function" and node.target is operator.getitem and all(
                self.info[a].kind == "meta" for a in node.all_input_nodes)
            if not (shape_query or from_meta):
                raise _unsupported(node, "an op that does not return a single tensor is not supported")
            return _Info("meta")
        if node.op == "call_module":
            return self._classify_module(node, shape)
        args, kwargs = node.args, node.kwargs
        target = node.target
        if node.op == "call_method":
            if target in _UNARY_METHODS or target in _BARRIER_METHODS:
                self._check_rest(node, args[1:], kwargs)
                kind = "unary" if target in _UNARY_METHODS else "barrier"
                return _Info(kind, [self._tensor_input(node, args[0])], shape)
            if target in _REDUCTION_METHODS:
                return self._reduction(node, shape)
            if target in _BINARY_METHODS:
                return self._binary(node, shape)
            if target in _FLATTEN_METHODS:
                return self._flatten(node, shape)
            raise _unsupported(node, f"tensor method {target!r} is not supported (it may mix or reorder channels)")
        if target in _UNARY_FUNCTIONS or target in _BARRIER_FUNCTIONS:
            self._check_rest(node, args[1:], kwargs)
            kind = "unary" if target in _UNARY_FUNCTIONS else "barrier"
            return _Info(kind, [self._tensor_input(node, args[0])], shape)
        if target in _REDUCTIONS:
            return self._reduction(node, shape)
        if target in _BINARY_FUNCTIONS:
            return self._binary(node, shape)
        if target in _CAT_FUNCTIONS:
            return self._cat(node, shape)
        if target is torch.flatten or target is torch.reshape:
            return self._flatten(node, shape)
        raise _unsupported(node, "this op is not supported: bayescomp does not know how it maps channels")

    def _classify_module(self, node: fx.Node, shape: tuple[int, ...]) -> _Info:
        mod = self.modules[str(node.target)]
        if node.kwargs or len(node.args) != 1:
            raise _unsupported(node, f"{type(mod).__name__} called with more than one argument")
        x = self._tensor_input(node, node.args[0])
        in_shape = _shape(x)
        kind_name = type(mod).__name__
        if isinstance(mod, GroupSparseLayer) or type(mod) in (nn.Linear, nn.Conv2d):
            linear = hasattr(mod, "in_features")
            own = None
            if isinstance(mod, GroupSparseLayer):
                own = self._own_keep(node, mod)
            if linear:
                if len(in_shape) != 2:
                    raise _unsupported(node, f"{kind_name} on a {len(in_shape)}-D input; only (batch, features) inputs are supported")
                return _Info("weighted", [x], shape, module=mod, own=own)
            groups = mod.groups
            if groups == 1:
                return _Info("weighted", [x], shape, module=mod, own=own)
            if groups == mod.in_channels == mod.out_channels:
                return _Info("depthwise", [x], shape, module=mod, own=own)
            raise _unsupported(node, f"grouped convolution (groups={groups}, {mod.in_channels}→{mod.out_channels} "
                                     "channels) mixes channels within groups; only depthwise (groups = channels) is supported")
        if isinstance(mod, CHANNEL_AFFINE):
            return _Info("affine", [x], shape, module=mod)
        if isinstance(mod, UNARY_MODULES):
            return _Info("unary", [x], shape, module=mod)
        if isinstance(mod, nn.Flatten):
            rank = len(in_shape)
            if _dim(mod.start_dim, rank) != 1 or _dim(mod.end_dim, rank) != rank - 1:
                raise _unsupported(node, f"Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}); only flattening "
                                         "from dimension 1 to the last is supported")
            return _Info("flatten", [x], shape, module=mod, block=math.prod(in_shape[2:]))
        if isinstance(mod, BARRIER_MODULES):
            return _Info("barrier", [x], shape, module=mod)
        raise _unsupported(node, f"{kind_name} is not supported: bayescomp does not know how it maps channels")

    def _own_keep(self, node: fx.Node, mod: GroupSparseLayer) -> Tensor:
        name = str(node.target)
        if name not in self.keeps:
            raise PruneError(f"no keep-mask given for layer {name}")
        k = self.keeps[name]
        if not isinstance(k, Tensor) or k.dtype != torch.bool or tuple(k.shape) != (mod.n_groups,):
            raise PruneError(f"{name}: keep-mask must be a bool tensor of shape ({mod.n_groups},)")
        return k.detach().cpu()

    def _reduction(self, node: fx.Node, shape: tuple[int, ...]) -> _Info:
        x = self._tensor_input(node, node.args[0])
        rank = len(_shape(x))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            raise _unsupported(node, "a reduction over all dimensions mixes channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims) or any(_dim(d, rank) < 2 for d in dims):
            raise _unsupported(node, f"a reduction over dimensions {dims} mixes channels or examples; "
                                     "only reductions over dimensions ≥ 2 are supported")
        self._check_rest(node, node.args[1:], node.kwargs)
        return _Info("unary", [x], shape)

    def _binary(self, node: fx.Node, shape: tuple[int, ...]) -> _Info:
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if "other" in kwargs and len(args) == 1:
            args.append(kwargs.pop("other"))
        if kwargs or len(args) != 2:
            raise _unsupported(node, f"arguments {sorted(kwargs)} are not supported for an element-wise op")
        inputs = []
        for a in args:
            if isinstance(a, fx.Node):
                t = self._tensor_input(node, a)
                s = _shape(t)
                if len(s) != len(shape) or s[1] != shape[1]:
                    raise _unsupported(node, f"operand of shape {list(s)} broadcasts over the channel dimension "
                                             f"of the result {list(shape)}")
                inputs.append(t)
            elif not isinstance(a, (int, float, bool)):
                raise _unsupported(node, f"operand of type {type(a).__name__} is not supported")
        if not inputs:  # pragma: no cover - fx does not record ops on plain numbers
            raise _unsupported(node, "no tensor operand")
        return _Info("binary", inputs, shape)

    def _cat(self, node: fx.Node, shape: tuple[int, ...]) -> _Info:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int) or _dim(dim, len(shape)) != 1:
            raise _unsupported(node, f"concatenation along dimension {dim}; only the channel dimension (1) is supported")
        inputs = [self._tensor_input(node, t) for t in tensors]
        slices, start = [], 0
        for t in inputs:
            c = _shape(t)[1]
            slices.append((start, start + c))
            start += c
        return _Info("cat", inputs, shape, slices=slices)

    def _flatten(self, node: fx.Node, shape: tuple[int, ...]) -> _Info:
        x = self._tensor_input(node, node.args[0])
        in_shape = _shape(x)
        ok = len(shape) == 2 and len(in_shape) >= 2 and shape[0] == in_shape[0] and shape[1] == math.prod(in_shape[1:])
        if node.target in ("flatten",) or node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            ok = ok and isinstance(start, int) and _dim(start, len(in_shape)) == 1 and _dim(end, len(in_shape)) == len(in_shape) - 1
        if not ok:
            raise _unsupported(node, f"reshape {list(in_shape)} → {list(shape)} is not a flatten from dimension 1; "
                                     "channels cannot be followed through it")
        return _Info("flatten", [x], shape, block=math.prod(in_shape[2:]))

    @torch.no_grad()
    def _const(self, node: fx.Node, info: _Info) -> Tensor:
        c_out = info.shape[1]
        nan = torch.full((c_out,), math.nan, dtype=torch.float64)
        kind = info.kind
        if kind in ("input", "barrier"):
            return nan
        ins = [self.info[x].const for x in info.inputs]
        if kind == "weighted":
            if info.own is not None and not hasattr(info.module, "in_features"):
                return torch.where(info.own, nan, torch.zeros_like(nan))
            return nan
        if kind == "depthwise":
            mod = info.module
            own = info.own if info.own is not None else torch.ones(c_out, dtype=torch.bool)
            if getattr(mod, "_origin", 0.0):  # a zero input is −origin to it: its output would hang on the bits
                return torch.where(own, nan, torch.zeros_like(nan))
            _, bias = effective_params(mod, _on_device(LayerMask(str(node.target), own, own, nan, info.own), mod))
            out = torch.where(ins[0] == 0, bias.detach().cpu().double(), nan)
            return torch.where(own, out, torch.zeros_like(nan))
        if kind == "affine":
            return _module_const(info.module, ins[0])
        if kind == "flatten":
            return ins[0].repeat_interleave(info.block)
        if kind == "cat":
            return torch.cat(ins)
        if kind == "binary":
            operands = []
            it = iter(ins)
            for a in node.args if "other" not in node.kwargs else (*node.args, node.kwargs["other"]):
                operands.append(next(it) if isinstance(a, fx.Node) else a)
            out = self._apply(node, operands)
            varying = torch.zeros(c_out, dtype=torch.bool)
            for c in ins:
                varying |= torch.isnan(c)
            return torch.where(varying | ~torch.isfinite(out), nan, out)
        # unary: evaluate on a spatially uniform input of the recorded shape
        const = ins[0]
        in_shape = _shape(info.inputs[0])
        x = torch.nan_to_num(const, nan=0.0).view(1, -1, *([1] * (len(in_shape) - 2)))
        x = x.expand(1, *in_shape[1:]).contiguous()
        out = self._apply(node, [x])
        if out.dim() < 2 or out.shape[1] != const.numel():  # pragma: no cover - guarded by the op lists
            raise _unsupported(node, "the op changes the number of channels")
        flat = out.reshape(1, out.shape[1], -1)[0]
        if flat.shape[1] == 0:
            return nan
        uniform = (flat.amax(1) == flat.amin(1)) & torch.isfinite(flat[:, 0])
        return torch.where(torch.isnan(const) | ~uniform, nan, flat[:, 0])

    def _apply(self, node: fx.Node, operands: list[Any]) -> Tensor:
        """Run the node's own op on float64 stand-ins (constants) for its tensor operands."""
        if node.op == "call_module":
            return self.modules[str(node.target)](operands[0])
        if len(operands) == 2 or node.target in _BINARY_FUNCTIONS or node.target in _BINARY_METHODS:
            a, b = operands[0], operands[1]
            if node.op == "call_method":
                return getattr(a, node.target)(b)
            return node.target(a, b)
        x = operands[0]
        if node.op == "call_method":
            return getattr(x, node.target)(*node.args[1:], **node.kwargs)
        return node.target(x, *node.args[1:], **node.kwargs)

    # -- which channels must exist ------------------------------------------------------------------
    def _backward(self) -> None:
        outs: list[fx.Node] = []
        fx.node.map_arg(self.output.args, outs.append)
        for x in outs:
            if self.info[x].kind == "meta":
                continue
            self.info[x].need |= self.info[x].varying
        for node in reversed(list(self.info)):
            info = self.info[node]
            if info.kind == "meta":
                continue
            need = info.need
            kind = info.kind
            if kind == "input":
                info.carried = torch.ones_like(need)
                continue
            if kind == "flatten":
                c_in = self.info[info.inputs[0]].need.numel()
                read = need.view(c_in, info.block).any(dim=1)
                info.carried = read.repeat_interleave(info.block)
                info.reads = [read]
            elif kind == "barrier":
                alive = bool(need.any())
                info.carried = torch.full_like(need, alive)
                info.reads = [torch.full_like(self.info[x].need, alive) for x in info.inputs]
            elif kind == "weighted":
                info.carried = need.clone()
                x = self.info[info.inputs[0]]
                in_mask = x.varying.clone()
                if info.own is not None and hasattr(info.module, "in_features"):
                    in_mask &= info.own
                if not bool(need.any()):
                    in_mask[:] = False
                elif not bool(in_mask.any()):
                    raise PruneError(f"pruning removes every input of layer {node.target}")
                info.reads = [in_mask]
            elif kind == "cat":
                info.carried = need.clone()
                info.reads = [need[a:b].clone() for a, b in info.slices]
            else:  # depthwise, affine, unary, binary: channel c of the output reads channel c of each input
                info.carried = need.clone()
                info.reads = [need.clone() for _ in info.inputs]
            for x, read in zip(info.inputs, info.reads, strict=True):
                self.info[x].need |= read & self.info[x].varying


# ---- surgery ------------------------------------------------------------------------------------------

class _Builder:
    """Emit the shrunk graph: sliced layers, and Select/Realign/AppendOnes where channel sets differ."""

    def __init__(self, an: _Analysis, bits: Mapping[str, int] | None, thresholds: Mapping[str, float]) -> None:
        self.an = an
        self.bits = bits
        self.thresholds = thresholds
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.cache: dict[tuple, fx.Node] = {}
        param = next(an.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.masks: dict[str, LayerMask] = {}
        self.new_layers: dict[str, nn.Module | None] = {}
        self.order: list[str] = []

    def _add_module(self, path: str, module: nn.Module) -> str:
        parts = path.split(".")
        parent = self.root
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        base, k = parts[-1], 0
        while hasattr(parent, parts[-1]):
            k += 1
            parts[-1] = f"{base}_{k}"
        parent.add_module(parts[-1], module)
        return ".".join(parts)

    def _call(self, module: nn.Module, path: str, args: tuple) -> fx.Node:
        target = self._add_module(path, module.to(self.device))
        return self.graph.call_module(target, args)

    def _materialize(self, src: fx.Node, reads: Tensor, consumer: fx.Node, slot: int,
                     broadcast: bool = False) -> fx.Node | None:
        """The new-graph value holding channels `reads` of `src` (in order), constants put back."""
        info = self.an.info[src]
        if not bool(reads.any()):
            return None
        key = (src, reads.numpy().tobytes(), broadcast)
        if key in self.cache:
            return self.cache[key]
        carried = info.carried
        fill = reads & ~carried
        phys = reads & carried
        tag = f"{consumer.name}_in{slot}"
        if not bool(fill.any()):
            if torch.equal(reads, carried):
                return self.env[src]
            index = torch.nonzero(reads[carried]).flatten()
            value = self._call(Select(index, int(carried.sum())), f"{tag}_select", (self.env[src],))
        else:
            values = info.const[reads]
            if bool(torch.isnan(info.const[fill]).any()):  # pragma: no cover - the analysis guarantees this
                raise AssertionError(f"{_label(consumer)}: a varying channel of {src.name} was not carried")
            if not bool(phys.any()) and broadcast:
                c = values.to(self.dtype).view(1, -1, *([1] * (len(info.shape) - 2)))
                name = f"_const_{tag}"
                self.root.register_buffer(name, c.to(self.device))
                value = self.graph.get_attr(name)
            elif not bool(carried.any()):
                raise PruneError(f"{_label(consumer)}: every channel of its input is constant after pruning, but "
                                 "its output still varies; this network cannot be shrunk at these thresholds")
            else:
                pos = torch.cumsum(carried.long(), 0) - 1  # position of each carried channel in the shrunk tensor
                sel = phys[reads]
                src_idx = pos[reads & carried]
                dst_idx = torch.nonzero(sel).flatten()
                fill_values = torch.where(sel, torch.zeros_like(values), values).to(self.dtype)
                value = self._call(Realign(src_idx, dst_idx, fill_values), f"{tag}_realign", (self.env[src],))
        self.cache[key] = value
        return value

    def build(self) -> fx.GraphModule:
        an = self.an
        for node, info in an.info.items():
            if info.kind == "meta":
                continue
            if info.kind == "input":
                if node.args:
                    self.env[node] = self.graph.placeholder(node.target, default_value=node.args[0])
                else:
                    self.env[node] = self.graph.placeholder(node.target)
                continue
            if info.kind in ("weighted", "depthwise"):
                self.order.append(str(node.target))
            if not bool(info.carried.any()):
                if info.kind in ("weighted", "depthwise"):
                    self._record_dead(node, info)
                continue
            emit = getattr(self, f"_emit_{info.kind}")
            self.env[node] = emit(node, info)

        def out_value(n: fx.Node) -> fx.Node:
            info = an.info[n]
            if info.kind == "meta":
                raise _unsupported(an.output, f"the model returns the non-tensor value {n.name!r}")
            return self._materialize(n, torch.ones_like(info.carried), an.output, 0)

        self.graph.output(fx.node.map_arg(an.output.args[0], out_value))
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=f"Compressed{type(an.model).__name__}")
        return gm.eval()

    def _input(self, node: fx.Node, info: _Info, i: int = 0, broadcast: bool = False) -> fx.Node:
        value = self._materialize(info.inputs[i], info.reads[i], node, i, broadcast)
        if value is None:  # pragma: no cover - a live node reads at least one channel
            raise AssertionError(f"{_label(node)} reads nothing")
        return value

    def _layer_mask(self, node: fx.Node, info: _Info) -> LayerMask:
        name = str(node.target)
        x = self.an.info[info.inputs[0]]
        reads = info.reads[0]
        if info.kind == "weighted":
            fold = torch.where(~x.varying & ~reads, x.const, torch.full_like(x.const, math.nan))
        else:
            fold = torch.full_like(x.const, math.nan)
        threshold = self.thresholds.get(name) if info.own is not None else None
        lm = LayerMask(name, reads.clone(), info.carried.clone(), fold, info.own, threshold)
        self.masks[name] = lm
        return lm

    def _record_dead(self, node: fx.Node, info: _Info) -> None:
        lm = self._layer_mask(node, info)
        lm.in_mask[:] = False
        self.new_layers[lm.name] = None

    def _emit_weighted(self, node: fx.Node, info: _Info) -> fx.Node:
        m = info.module
        lm = self._layer_mask(node, info)
        weight, bias = effective_params(m, _on_device(lm, m))
        if self.bits is not None and lm.name in self.bits:
            weight = round_to_bits(weight, self.bits[lm.name])
        kernel, has_const = _constant_inputs(weight, _on_device(lm, m))
        linear = hasattr(m, "in_features")
        padded = not linear and zero_padded(m) and getattr(m, "padding_mode", "zeros") == "zeros"
        ones_channel = bool(has_const) and padded
        if bool(has_const) and not ones_channel:
            bias = bias + (kernel if kernel.dim() == 1 else kernel.flatten(1).sum(1))
        bias = fold_origin(m, weight, bias)
        out_mask = lm.out_mask.to(weight.device)
        in_mask = lm.in_mask.to(weight.device)
        w = weight[out_mask][:, in_mask]
        b = bias[out_mask]
        x = self._input(node, info)
        if ones_channel:
            x = self._call(AppendOnes(), f"{node.name}_ones", (x,))
            extra = kernel[out_mask].unsqueeze(1)
            if self.bits is not None and lm.name in self.bits:
                extra = round_to_bits(extra, self.bits[lm.name])
            w = torch.cat([w, extra], dim=1)
        if linear:
            new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=True)
        else:
            new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1, bias=True,
                            padding_mode=getattr(m, "padding_mode", "zeros"))
        return self._finish_layer(node, lm, new, w, b, x)

    def _emit_depthwise(self, node: fx.Node, info: _Info) -> fx.Node:
        m = info.module
        lm = self._layer_mask(node, info)
        weight, bias = effective_params(m, _on_device(lm, m))
        if self.bits is not None and lm.name in self.bits:
            weight = round_to_bits(weight, self.bits[lm.name])
        bias = fold_origin(m, weight, bias)
        keep = lm.out_mask.to(weight.device)
        w, b = weight[keep], bias[keep]
        k = int(keep.sum())
        new = nn.Conv2d(k, k, m.kernel_size, m.stride, m.padding, m.dilation, k, bias=True,
                        padding_mode=getattr(m, "padding_mode", "zeros"))
        return self._finish_layer(node, lm, new, w, b, self._input(node, info))

    def _finish_layer(self, node: fx.Node, lm: LayerMask, new: nn.Module, w: Tensor, b: Tensor, x: fx.Node) -> fx.Node:
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            new.bias.copy_(b)
        self.new_layers[lm.name] = new
        return self._call(new, lm.name, (x,))

    def _emit_affine(self, node: fx.Node, info: _Info) -> fx.Node:
        return self._call(_slice_batch_norm(info.module, info.carried), str(node.target), (self._input(node, info),))

    def _emit_unary(self, node: fx.Node, info: _Info) -> fx.Node:
        x = self._input(node, info)
        if node.op == "call_module":
            return self._call(_copy_layer(info.module), str(node.target), (x,))
        if node.op == "call_method":
            return self.graph.call_method(node.target, (x, *node.args[1:]), dict(node.kwargs))
        return self.graph.call_function(node.target, (x, *node.args[1:]), dict(node.kwargs))

    _emit_barrier = _emit_unary

    def _emit_flatten(self, node: fx.Node, info: _Info) -> fx.Node:
        return self.graph.call_function(torch.flatten, (self._input(node, info), 1))

    def _emit_cat(self, node: fx.Node, info: _Info) -> fx.Node:
        parts = [self._materialize(x, r, node, i) for i, (x, r) in enumerate(zip(info.inputs, info.reads, strict=True))]
        parts = [p for p in parts if p is not None]
        if len(parts) == 1:
            return parts[0]
        return self.graph.call_function(torch.cat, (parts,), {"dim": 1})

    def _emit_binary(self, node: fx.Node, info: _Info) -> fx.Node:
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if "other" in kwargs:
            args.append(kwargs.pop("other"))
        # an operand that is wholly constant may be a broadcast constant, if a carried operand has the full shape
        full = [i for i, x in enumerate(info.inputs) if bool((info.reads[i] & self.an.info[x].carried).any())
                and _shape(x)[2:] == info.shape[2:] and _shape(x)[0] == info.shape[0]]
        values, k = [], 0
        for a in args:
            if isinstance(a, fx.Node):
                values.append(self._input(node, info, k, broadcast=bool(full) and k not in full))
                k += 1
            else:
                values.append(a)
        if node.op == "call_method":
            return self.graph.call_method(node.target, tuple(values))
        return self.graph.call_function(node.target, tuple(values))


# ---- the public entry point ----------------------------------------------------------------------------

def _kept_weight_mask(module: nn.Module, lm: LayerMask, weight: Tensor) -> Tensor:
    """Entries of the full weight that the shrunk layer stores (gated-on, kept rows and columns)."""
    shape = [-1] + [1] * (weight.dim() - 1)
    keep = lm.out_mask.view(shape)
    if lm.group_keep is not None and not hasattr(module, "in_features"):
        keep = keep & lm.group_keep.view(shape)
    if getattr(module, "groups", 1) == 1:
        keep = keep & lm.in_mask.view(1, -1, *([1] * (weight.dim() - 2)))
    return keep.expand_as(weight)


@torch.no_grad()
def graph_compress(
    model: nn.Module,
    thresholds: float | Mapping[str, float] | None = None,
    *,
    example_input: Tensor | tuple[Tensor, ...],
    keeps: Mapping[str, Tensor] | None = None,
    round_weights: bool = True,
    bits_reduce: str = "mean",
    variance_scale: float = 1.0,
    bit_accounting: str = "code",
) -> Any:
    """Prune, quantise and shrink a trained Bayesian model of any torch.fx-traceable shape.

    - `example_input`: a batch (or tuple of inputs) the model accepts; it fixes the shapes used to
      follow channels through flatten and pooling. The shrunk model accepts any input the original does
      with the same non-batch shape after each flatten.
    - `thresholds`: as for `compress`; `keeps`: {layer name: bool mask over its groups}, an explicit
      decision to use instead (e.g. an edited `group_masks(model)`).
    - `round_weights`, `bits_reduce`, `variance_scale`, `bit_accounting`: as for `compress`.

    Returns a `CompressedModel` whose `.model` is a plain `torch.fx.GraphModule` and whose report has
    the fields of `compress()`'s. The input model is not modified.
    """
    from . import CompressedModel  # here, not at import time: the package imports this module

    was_training = model.training
    model.eval()
    try:
        resolved = resolve_thresholds(model, thresholds)
        decision = dict(keeps) if keeps is not None else group_masks(model, resolved)
        gm = trace(model, example_input)
        an = _Analysis(model, gm, decision)
        # the decision first (masks, without rounding), then the precision of the kept weights
        probe = _Builder(an, None, resolved)
        probe_model = probe.build()
        bits: dict[str, int] = {}
        max_abs = 0.0
        for name in probe.order:
            lm, m = probe.masks[name], an.modules[name]
            if probe.new_layers[name] is None:
                continue
            weight, _ = effective_params(m, _on_device(lm, m))
            keep = _kept_weight_mask(m, _on_device(lm, m), weight)
            if isinstance(m, GroupSparseLayer) and bool(keep.any()):
                bits[name] = layer_bits(m.posterior_variance()[keep], bits_reduce, variance_scale)
                max_abs = max(max_abs, weight[keep].abs().max().item())
        e_bits = exponent_bits(max_abs)
        if round_weights:
            builder = _Builder(an, bits, resolved)
            plain = builder.build()
        else:
            builder, plain = probe, probe_model
        report = _report(an, builder, bits, e_bits, resolved, bit_accounting)
        report.update(rounded=round_weights, bits_reduce=bits_reduce, variance_scale=variance_scale)
        return CompressedModel(plain, report, builder.masks, bits)
    finally:
        model.train(was_training)


@torch.no_grad()
def graph_shrinker(
    model: nn.Module,
    keeps: Mapping[str, Tensor],
    *,
    example_input: Tensor | tuple[Tensor, ...],
) -> Callable[[Mapping[str, int] | None], fx.GraphModule]:
    """The graph counterpart of `shrink(model, masks, bits)`, for rebuilding one decision at many precisions.

    Traces and analyses `model` once under the decision `keeps` ({layer name: bool mask over its groups},
    e.g. `group_masks(model, thresholds)`), and returns ``build(bits)``: the plain GraphModule with each
    layer's weights rounded to ``bits[layer]`` mantissa bits (a layer left out is not rounded; None: no
    rounding). ``build(compressed.bits)`` is the model `graph_compress(model, keeps=keeps, ...)` returns.
    """
    was_training = model.training
    model.eval()
    try:
        an = _Analysis(model, trace(model, example_input), keeps)
    finally:
        model.train(was_training)

    @torch.no_grad()
    def build(bits: Mapping[str, int] | None) -> fx.GraphModule:
        return _Builder(an, None if bits is None else dict(bits), {}).build()

    return build


def _report(an: _Analysis, builder: _Builder, bits: Mapping[str, int], e_bits: int, thresholds: Mapping[str, float],
            accounting: str) -> dict[str, Any]:
    """The fields of `compress()`'s report (shared `summary.summarize`; every rate from `rates.rates`)."""
    rows = []
    for name in builder.order:
        new = builder.new_layers[name]
        rows.append((name, an.modules[name], builder.masks[name], 0 if new is None else new.weight.numel()))
    return summarize(rows, bits, e_bits, thresholds, accounting)


__all__ = ["BARRIER_MODULES", "Realign", "UNARY_MODULES", "graph_compress", "graph_shrinker", "trace"]
