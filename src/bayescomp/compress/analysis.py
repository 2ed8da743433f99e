"""The one analysis: per tensor of the traced graph, which channels are constant and which must exist.

Two passes over the traced graph (channels along dimension 1), acting on each node's rule kind
(`rules.py`):

1. Forward, per tensor a *constant per channel* (NaN where the channel varies with the input):
   a pruned conv channel is 0 (its gate covers its bias); batch norm maps c to
   γ(c − mean)/√(var + eps) + β; other channel-wise ops are evaluated on the constant (a channel
   counts as constant only if the result is spatially uniform, so zero-padded average pooling is
   handled); an addition/product of constants is a constant, a sum with one varying operand varies;
   concatenation concatenates; flatten repeats each channel's constant.
2. Backward, *which channels must physically exist*: a consumer reads some channels of each input
   (a weighted layer reads its varying, un-gated inputs and folds constant ones into its bias — a grouped
   convolution only those of its convolution groups with a needed output; a
   channel-wise op — batch norm, activation, pooling, depthwise convolution, add, mul — reads the
   channels it must produce; a concatenation reads the matching slices; a flatten whole channels).
   A channel is carried when some consumer reads it and it is not constant. Hence the tying rules:
   for an add, a channel of the sum disappears only if it is constant in every operand; through a
   depthwise convolution or a batch norm, input and output channels go together; for a cat, channel
   ranges map to the inputs. For a chain this is the classic rule: a pruned input of layer l+1
   removes the matching output of layer l, through flatten, batch norm, activations and pooling.

Why not Torch-Pruning: it deletes channels by index, so a pruned channel whose batch-norm output is a
nonzero constant would vanish from a residual sum (bayescomp folds it instead); its coupling is
all-or-nothing, while a channel of a sum may go only when constant in every operand; and it does not
know the group-sparse layers. Its rule registry is the model for `rules.py`.

Anything else — an op without a rule, a reshape that is not a flatten, a parameter used directly in
`forward`, a layer called twice — raises `UnsupportedLayerError` naming the node or module path.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..convert import UnsupportedLayerError
from ..nn import GroupSparseLayer
from .masks import LayerMask, PruneError, check_keeps, on_device
from .rules import OpRule, function_rule, is_linear, method_rule, module_rule
from .weights import effective_params


@dataclass
class Info:
    """What the analysis knows of one node of the traced graph."""

    kind: str  # input, meta (a size), depthwise, or a rule kind (rules.KINDS; a reduction is channelwise)
    inputs: list[fx.Node] = field(default_factory=list)  # tensor operands, in order
    shape: tuple[int, ...] | None = None
    const: Tensor | None = None  # float64 per channel, NaN = varies
    need: Tensor | None = None  # channels some consumer reads physically
    carried: Tensor | None = None  # channels the shrunk network produces
    reads: list[Tensor] = field(default_factory=list)  # per operand: channels the shrunk op reads
    module: nn.Module | None = None
    rule: OpRule | None = None
    own: Tensor | None = None  # a group-sparse layer's own keep-mask
    block: int = 1  # flatten: features per channel
    slices: list[tuple[int, int]] = field(default_factory=list)  # cat: channel range of each operand

    @property
    def varying(self) -> Tensor:
        return torch.isnan(self.const)


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


def output_layers(gm: fx.GraphModule) -> list[str]:
    """The weighted layers whose outputs reach the model's output without passing another weighted layer."""
    modules = dict(gm.named_modules())
    found: list[str] = []
    seen: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            rule = module_rule(modules[str(node.target)])
            if rule is not None and rule.kind == "weighted":
                found.append(str(node.target))
                continue
        stack.extend(node.all_input_nodes)
    return found


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class Analysis:
    """The traced graph, each tensor's channel constants, and what the shrunk network carries.

    `keeps` must have passed `masks.check_keeps`; build it with `analyse`.
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule, keeps: Mapping[str, Tensor]) -> None:
        self.model = model
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.keeps = keeps
        self.info: dict[fx.Node, Info] = {}
        self.output: fx.Node | None = None
        self._forward()
        self._backward()

    # -- classification and constants ---------------------------------------------------------------
    def _tensor_input(self, node: fx.Node, value: Any) -> fx.Node:
        if not isinstance(value, fx.Node) or self.info[value].kind == "meta":
            raise unsupported(node, "expects a tensor operand here")
        return value

    def _check_rest(self, node: fx.Node, rest: tuple, kwargs: dict) -> None:
        if _has_node(rest) or _has_node(kwargs):
            raise unsupported(node, "an argument other than the input tensor is computed in the graph "
                                     "(e.g. from a tensor's shape); this cannot be rebuilt for a shrunk tensor")

    def _forward(self) -> None:
        used_weighted: dict[str, fx.Node] = {}
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.output = node
                continue
            info = self._classify(node)
            if info.kind == "dense" and info.shape is None:  # a tuple: one flag, alive or not
                info.need = torch.zeros(1, dtype=torch.bool)
            elif info.kind != "meta":
                if info.shape is None or len(info.shape) < 2:
                    raise unsupported(node, f"gives a tensor of shape {info.shape}; channels must run along dimension 1")
                info.need = torch.zeros(info.shape[1], dtype=torch.bool)
            if info.kind in ("weighted", "depthwise"):
                if node.target in used_weighted:
                    raise unsupported(node, "the layer is called more than once (shared weights cannot be shrunk per call)")
                used_weighted[str(node.target)] = node
            self.info[node] = info
            if info.kind != "meta":
                info.const = self._const(node, info)

    def _classify(self, node: fx.Node) -> Info:
        shape = shape_of(node)
        if node.op == "placeholder":
            if shape is None:
                raise unsupported(node, "model inputs must be tensors")
            return Info("input", shape=shape)
        if node.op == "get_attr":
            raise unsupported(node, f"the forward uses the tensor attribute {node.target!r} directly; "
                                     "only registered layers can be shrunk")
        if node.op == "call_module" and getattr(module_rule(self.modules[str(node.target)]), "kind", None) == "dense":
            return self._dense(node, shape)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and self.info[node.args[0]].kind == "dense" and self.info[node.args[0]].shape is None:
            # an item of a dense module's tuple is dense too; one that is not a tensor (None) is a non-tensor value
            return Info("meta") if shape is None else Info("dense", [node.args[0]], shape)  # an item of a dense module's tuple: dense too
        if shape is None:  # sizes and shapes (x.size(0), x.shape[0]): only reshapes may use them
            shape_query = (node.op == "call_method" and node.target == "size") or (
                node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            from_meta = node.op == "call_function" and node.target is operator.getitem and all(
                self.info[a].kind == "meta" for a in node.all_input_nodes)
            if not (shape_query or from_meta):
                raise unsupported(node, "an op that does not return a single tensor is not supported")
            return Info("meta")
        if node.op == "call_module":
            return self._classify_module(node, shape)
        if node.op == "call_method":
            rule = method_rule(node.target)
            if rule is None:
                raise unsupported(node, f"tensor method {node.target!r} is not supported (it may mix or reorder channels)")
        else:
            rule = function_rule(node.target)
            if rule is None:
                raise unsupported(node, "this op is not supported: bayescomp does not know how it maps channels")
        return getattr(self, f"_{rule.kind}")(node, shape, rule)

    def _channelwise(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        self._check_rest(node, node.args[1:], node.kwargs)
        return Info(rule.kind, [self._tensor_input(node, node.args[0])], shape, rule=rule)

    _barrier = _channelwise

    def _dense(self, node: fx.Node, shape: tuple[int, ...] | None) -> Info:
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        for x in inputs:
            if self.info[x].kind == "meta":
                raise unsupported(node, "a dense module called with a size computed in the graph")
        return Info("dense", inputs, shape, module=self.modules[str(node.target)])

    def _classify_module(self, node: fx.Node, shape: tuple[int, ...]) -> Info:
        mod = self.modules[str(node.target)]
        rule = module_rule(mod)
        kind_name = type(mod).__name__
        if rule is None:
            raise unsupported(node, f"{kind_name} is not supported: bayescomp does not know how it maps channels "
                                    "(declare a channel-wise module with bayescomp.register_channelwise)")
        if node.kwargs or len(node.args) != 1:
            raise unsupported(node, f"{kind_name} called with more than one argument")
        x = self._tensor_input(node, node.args[0])
        in_shape = shape_of(x)
        if rule.kind == "weighted":
            return self._weighted(node, mod, x, in_shape, shape)
        if rule.kind == "flatten":
            rank = len(in_shape)
            if _dim(mod.start_dim, rank) != 1 or _dim(mod.end_dim, rank) != rank - 1:
                raise unsupported(node, f"Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}); only flattening "
                                        "from dimension 1 to the last is supported")
            return Info("flatten", [x], shape, module=mod, block=math.prod(in_shape[2:]))
        if rule.kind not in ("channelwise", "barrier"):
            raise unsupported(node, f"a module cannot have the rule kind {rule.kind!r}")
        return Info(rule.kind, [x], shape, module=mod, rule=rule)

    def _weighted(self, node: fx.Node, mod: nn.Module, x: fx.Node, in_shape: tuple[int, ...],
                  shape: tuple[int, ...]) -> Info:
        own = self._own_keep(node, mod) if isinstance(mod, GroupSparseLayer) else None
        if is_linear(mod):
            if len(in_shape) != 2:
                raise unsupported(node, f"{type(mod).__name__} on a {len(in_shape)}-D input; only (batch, features) "
                                        "inputs are supported")
            return Info("weighted", [x], shape, module=mod, own=own)
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
            return Info("depthwise", [x], shape, module=mod, own=own)
        return Info("weighted", [x], shape, module=mod, own=own)  # groups > 1: see `conv_group_inputs`

    def _own_keep(self, node: fx.Node, mod: GroupSparseLayer) -> Tensor:
        return self.keeps[str(node.target)].detach().cpu()  # checked by `masks.check_keeps` (see `analyse`)

    def _reduction(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        x = self._tensor_input(node, node.args[0])
        rank = len(shape_of(x))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            raise unsupported(node, "a reduction over all dimensions mixes channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims) or any(_dim(d, rank) < 2 for d in dims):
            raise unsupported(node, f"a reduction over dimensions {dims} mixes channels or examples; "
                                     "only reductions over dimensions ≥ 2 are supported")
        self._check_rest(node, node.args[1:], node.kwargs)
        return Info("channelwise", [x], shape, rule=rule)

    def _binary(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if "other" in kwargs and len(args) == 1:
            args.append(kwargs.pop("other"))
        if kwargs or len(args) != 2:
            raise unsupported(node, f"arguments {sorted(kwargs)} are not supported for an element-wise op")
        inputs = []
        for a in args:
            if isinstance(a, fx.Node):
                t = self._tensor_input(node, a)
                s = shape_of(t)
                if len(s) != len(shape) or s[1] != shape[1]:
                    raise unsupported(node, f"operand of shape {list(s)} broadcasts over the channel dimension "
                                             f"of the result {list(shape)}")
                inputs.append(t)
            elif not isinstance(a, (int, float, bool)):
                raise unsupported(node, f"operand of type {type(a).__name__} is not supported")
        if not inputs:  # pragma: no cover - fx does not record ops on plain numbers
            raise unsupported(node, "no tensor operand")
        return Info("binary", inputs, shape)

    def _cat(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int) or _dim(dim, len(shape)) != 1:
            raise unsupported(node, f"concatenation along dimension {dim}; only the channel dimension (1) is supported")
        inputs = [self._tensor_input(node, t) for t in tensors]
        slices, start = [], 0
        for t in inputs:
            c = shape_of(t)[1]
            slices.append((start, start + c))
            start += c
        return Info("cat", inputs, shape, slices=slices)

    def _flatten(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule) -> Info:
        x = self._tensor_input(node, node.args[0])
        in_shape = shape_of(x)
        ok = len(shape) == 2 and len(in_shape) >= 2 and shape[0] == in_shape[0] and shape[1] == math.prod(in_shape[1:])
        if node.target in ("flatten",) or node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            ok = ok and isinstance(start, int) and _dim(start, len(in_shape)) == 1 and _dim(end, len(in_shape)) == len(in_shape) - 1
        if not ok:
            raise unsupported(node, f"reshape {list(in_shape)} → {list(shape)} is not a flatten from dimension 1; "
                                     "channels cannot be followed through it")
        return Info("flatten", [x], shape, block=math.prod(in_shape[2:]))

    @torch.no_grad()
    def _const(self, node: fx.Node, info: Info) -> Tensor:
        if info.kind == "dense":
            return torch.full((info.need.numel(),), math.nan, dtype=torch.float64)
        c_out = info.shape[1]
        nan = torch.full((c_out,), math.nan, dtype=torch.float64)
        kind = info.kind
        if kind in ("input", "barrier"):
            return nan
        ins = [self.info[x].const for x in info.inputs]
        if kind == "weighted":
            if info.own is not None and not is_linear(info.module):
                return torch.where(info.own, nan, torch.zeros_like(nan))
            return nan
        if kind == "depthwise":
            mod = info.module
            own = info.own if info.own is not None else torch.ones(c_out, dtype=torch.bool)
            if getattr(mod, "_origin", 0.0):  # a zero input is −origin to it: its output would hang on the bits
                return torch.where(own, nan, torch.zeros_like(nan))
            _, bias = effective_params(mod, on_device(LayerMask(str(node.target), own, own, nan, info.own), mod))
            out = torch.where(ins[0] == 0, bias.detach().cpu().double(), nan)
            return torch.where(own, out, torch.zeros_like(nan))
        if info.rule is not None and info.rule.constant is not None:
            return info.rule.constant(info.module, ins[0])
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
        # channel-wise: evaluate on a spatially uniform input of the recorded shape
        const = ins[0]
        in_shape = shape_of(info.inputs[0])
        x = torch.nan_to_num(const, nan=0.0).view(1, -1, *([1] * (len(in_shape) - 2)))
        x = x.expand(1, *in_shape[1:]).contiguous()
        out = self._apply(node, [x])
        if out.dim() < 2 or out.shape[1] != const.numel():  # pragma: no cover - guarded by the op lists
            raise unsupported(node, "the op changes the number of channels")
        flat = out.reshape(1, out.shape[1], -1)[0]
        if flat.shape[1] == 0:
            return nan
        uniform = (flat.amax(1) == flat.amin(1)) & torch.isfinite(flat[:, 0])
        return torch.where(torch.isnan(const) | ~uniform, nan, flat[:, 0])

    def _apply(self, node: fx.Node, operands: list[Any]) -> Tensor:
        """Run the node's own op on float64 stand-ins (constants) for its tensor operands."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            param = next(module.parameters(), None)
            x = operands[0] if param is None else operands[0].to(param.dtype)
            return module(x).double()
        if len(operands) == 2:
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
                if self.info[info.inputs[0]].kind == "input":  # select after the flatten: any input shape
                    read = torch.ones_like(read)           # that flattens to the same count then works
                info.carried = read.repeat_interleave(info.block)
                info.reads = [read]
            elif kind in ("barrier", "dense") or (kind in ("weighted", "depthwise") and info.own is None):
                # all or nothing; a plain layer (left dense by `exclude`) keeps all its inputs and outputs
                alive = bool(need.any())
                info.carried = torch.full_like(need, alive)
                info.reads = [torch.full_like(self.info[x].need, alive) for x in info.inputs]
            elif kind == "weighted":
                info.carried = need.clone()
                x = self.info[info.inputs[0]]
                in_mask = x.varying.clone()
                if info.own is not None and is_linear(info.module):
                    in_mask &= info.own
                if getattr(info.module, "groups", 1) > 1:
                    in_mask &= conv_group_inputs(info.module, need)
                if not bool(need.any()):
                    in_mask[:] = False
                elif not bool(in_mask.any()):
                    raise PruneError(f"pruning removes every input of layer {node.target}")
                info.reads = [in_mask]
            elif kind == "cat":
                info.carried = need.clone()
                info.reads = [need[a:b].clone() for a, b in info.slices]
            else:  # depthwise, channelwise, binary: channel c of the output reads channel c of each input
                info.carried = need.clone()
                info.reads = [need.clone() for _ in info.inputs]
            for x, read in zip(info.inputs, info.reads, strict=True):
                self.info[x].need |= read & self.info[x].varying


def conv_group_inputs(conv: nn.Module, need: Tensor) -> Tensor:
    """Per input channel of a grouped convolution, whether its convolution group computes a needed output:
    output o belongs to group o // (out/groups) and reads only that group's inputs, so the inputs of a group
    whose outputs all go are not read."""
    live = need.view(conv.groups, -1).any(dim=1)
    return live.repeat_interleave(conv.in_channels // conv.groups)


def decision_masks(an: Analysis, thresholds: Mapping[str, float] | None = None) -> dict[str, LayerMask]:
    """The `LayerMask` of every weighted layer, in execution order: the inputs it reads, the outputs it keeps,
    the constant each removed input carries (folded by the surgery), its own group keep-mask and threshold.

    A layer whose outputs nobody needs reads nothing and keeps nothing.
    """
    out: dict[str, LayerMask] = {}
    for node, info in an.info.items():
        if info.kind not in ("weighted", "depthwise"):
            continue
        name = str(node.target)
        x = an.info[info.inputs[0]]
        reads = info.reads[0].clone()
        nan = torch.full_like(x.const, math.nan)
        fold = torch.where(~x.varying & ~reads, x.const, nan) if info.kind == "weighted" else nan
        if not bool(info.carried.any()):
            reads[:] = False
        threshold = None if thresholds is None or info.own is None else thresholds.get(name)
        out[name] = LayerMask(name, reads, info.carried.clone(), fold, info.own, threshold)
    return out


def analyse(model: nn.Module, gm: fx.GraphModule, keeps: Mapping[str, Tensor],
            thresholds: Mapping[str, float] | None = None) -> Analysis:
    """The analysis of a traced model (`tracing.trace`) under the group decision `keeps`.

    Raises `PruneError` when `keeps` does not fit the model or leaves a layer nothing to read.
    """
    check_keeps(model, keeps, thresholds)
    return Analysis(model, gm, keeps)
