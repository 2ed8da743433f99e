"""The one analysis: per tensor of the traced graph, which channels are constant and which must exist.

Two passes over the traced graph, acting on each node's rule kind (`rules.py`). Each tensor carries
its channels along its own axis (`channel_axes`: dimension 1 for a convolution's tensors, the last one for
a Linear layer's features on inputs of any rank), or is opaque (carried whole); each op reads each operand
along an axis, and an operand read along another axis than its own is read whole:

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

A parameter used directly in `forward` (a layer scale ``x * self.gamma``, a cls token, a positional
embedding) is a constant operand, sliced with the channels it meets. LayerNorm is a barrier: its mean
and variance mix every channel of its input, so it reads all of them (a constant channel is put back,
not dropped: it changes the statistics) and produces all of its outputs — the exact rule that needs no
re-derivation of the statistics; consumers then read the outputs they need (a `Select` behind it).

Anything else — an op without a rule, a layer called twice — raises `UnsupportedLayerError` naming the
node or module path.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..nn import GroupSparseLayer
from .channel_axes import Info, along, label, module_path, norm_dim, per_channel, shape_of, unsupported
from .masks import LayerMask, PruneError, check_keeps, on_device
from .rules import OpRule, function_rule, is_linear, method_rule, module_rule
from .shape_ops import ShapeOps, block_reads, block_spread
from .weights import effective_params

__all__ = ["Analysis", "Info", "analyse", "attention_masks", "conv_group_inputs", "decision_masks", "is_attention",
           "label", "module_path",
           "output_layers", "shape_of", "unsupported"]

#: softmax-like ops: (the argument position, its name, its default) of the dimension they normalise over
_NORMALISE_DIM = {"softmax": (1, "dim", None), "log_softmax": (1, "dim", None), "normalize": (2, "dim", 1)}


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


def _nan(n: int) -> Tensor:
    return torch.full((n,), math.nan, dtype=torch.float64)


class Analysis(ShapeOps):
    """The traced graph, each tensor's channel axis and constants, and what the shrunk network carries.

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
        if not self._is_tensor(value):
            raise unsupported(node, "expects a tensor operand here")
        return value

    def seen(self, x: fx.Node, view: int | None) -> Tensor:
        """Operand `x`'s constant per channel as an op reading it along `view` sees it (NaN = varies): its own
        where the view is its axis, a parameter's values along the view, NaN for an operand read whole."""
        info = self.info[x]
        if info.kind == "param":
            if view is None:
                c = per_channel(info.value.reshape(1, -1), 0) if info.value.numel() else _nan(1)
                return c if c.numel() == 1 else _nan(1)
            return per_channel(info.value, view)
        if view is not None and view == info.axis:
            return info.const
        return _nan(1 if view is None else shape_of(x)[view])

    def _forward(self) -> None:
        used_weighted: dict[str, fx.Node] = {}
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.output = node
                continue
            info = self._classify(node)
            self.info[node] = info
            if info.kind == "meta":
                continue
            if info.axis is not None and (info.shape is None or not 1 <= info.axis < len(info.shape)):
                info.axis = None  # pragma: no cover - every rule gives an axis ≥ 1 of a tensor
            if info.kind in ("weighted", "depthwise") or is_attention(info):
                if node.target in used_weighted:
                    raise unsupported(node, "the layer is called more than once (shared weights cannot be shrunk per call)")
                used_weighted[str(node.target)] = node
            info.need = torch.zeros(info.width, dtype=torch.bool)
            info.const = self._const(node, info)

    def _classify(self, node: fx.Node) -> Info:
        shape = shape_of(node)
        if node.op == "placeholder":
            if shape is None:
                raise unsupported(node, "model inputs must be tensors")
            return Info("input", shape=shape, axis=1 if len(shape) >= 2 else None)
        if node.op == "get_attr":
            value: Any = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if not isinstance(value, Tensor):
                raise unsupported(node, f"the forward uses the attribute {node.target!r}, which is not a tensor")
            return Info("param", shape=tuple(value.shape), value=value.detach().cpu())
        if node.op == "call_module" and getattr(module_rule(self.modules[str(node.target)]), "kind", None) in (
                "dense", "attention"):
            return self._dense(node, shape)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and self.info[node.args[0]].kind in ("dense", "whole") and self.info[node.args[0]].shape is None:
            # an item of a dense module's tuple (or of a split) is carried whole too; one that is not a tensor
            # (None) is a non-tensor value
            return Info("meta") if shape is None else Info("dense", [node.args[0]], shape, None, [None])
        if shape is None:
            rule = method_rule(node.target) if node.op == "call_method" else \
                function_rule(node.target) if node.op == "call_function" else None
            if rule is not None and rule.kind == "whole":  # a tuple of tensors (chunk, split, unbind): whole
                return self._whole(node, shape, rule)
            return self._meta(node)  # sizes and shapes (x.size(0), x.shape[0] * x.shape[1]): metadata
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

    def _channelwise(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule, x: fx.Node | None = None) -> Info:
        if x is None:
            x = self._tensor_input(node, node.args[0] if node.args else node.kwargs.get("input"))
            self._no_other_tensors(node, x)
        in_shape = shape_of(x)
        view = self.info[x].axis if rule.dim is None else norm_dim(rule.dim, len(in_shape))
        if view is not None and not (1 <= view < len(in_shape) and len(shape) == len(in_shape)):
            view = None  # pragma: no cover - a channel-wise op keeps the rank
        module = self.modules[str(node.target)] if node.op == "call_module" else None
        return Info("channelwise", [x], shape, view, [view], module=module, rule=rule)

    def _barrier(self, node: fx.Node, shape: tuple[int, ...], rule: OpRule, x: fx.Node | None = None) -> Info:
        """A barrier reads and produces all channels; a softmax or normalize over another axis is channel-wise."""
        if x is None:
            x = self._tensor_input(node, node.args[0] if node.args else node.kwargs.get("input"))
            self._no_other_tensors(node, x)
        axis, rank = self.info[x].axis, len(shape_of(x))
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        dim: Any = "all"
        if node.op == "call_module" and isinstance(self.modules[str(node.target)], (nn.Softmax, nn.LogSoftmax)):
            dim = self.modules[str(node.target)].dim
        elif node.op != "call_module" and name in _NORMALISE_DIM:
            pos, key, default = _NORMALISE_DIM[name]
            dim = node.args[pos] if len(node.args) > pos else node.kwargs.get(key, default)
        if axis is not None and isinstance(dim, int) and norm_dim(dim, rank) != axis:
            return self._channelwise(node, shape, OpRule("channelwise", dim=None), x)
        module = self.modules[str(node.target)] if node.op == "call_module" else None
        return Info("barrier", [x], shape, axis, [axis], module=module, rule=rule)

    def _dense(self, node: fx.Node, shape: tuple[int, ...] | None) -> Info:
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        for x in inputs:
            if self.info[x].kind == "meta":
                raise unsupported(node, "a dense module called with a size computed in the graph")
        module = self.modules[str(node.target)]
        return Info("dense", inputs, shape, None, [None] * len(inputs), module=module, rule=module_rule(module))

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
        if rule.kind == "embedding":
            return Info("embedding", [x], shape, len(shape) - 1, [None], module=mod, rule=rule)
        if rule.kind == "flatten":
            return self._flatten(node, shape, rule)
        if rule.kind == "channelwise":
            return self._channelwise(node, shape, rule, x)
        if rule.kind == "barrier":
            return self._barrier(node, shape, rule, x)
        raise unsupported(node, f"a module cannot have the rule kind {rule.kind!r}")

    def _weighted(self, node: fx.Node, mod: nn.Module, x: fx.Node, in_shape: tuple[int, ...],
                  shape: tuple[int, ...]) -> Info:
        own = self._own_keep(node, mod) if isinstance(mod, GroupSparseLayer) else None
        if is_linear(mod):  # features on the last axis, groups shared across every other (tokens, positions)
            if len(in_shape) < 2:
                raise unsupported(node, f"{type(mod).__name__} on a {len(in_shape)}-D input; it needs a batch dimension")
            return Info("weighted", [x], shape, len(shape) - 1, [len(in_shape) - 1], module=mod, own=own)
        if mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels:
            return Info("depthwise", [x], shape, 1, [1], module=mod, own=own)
        return Info("weighted", [x], shape, 1, [1], module=mod, own=own)  # groups > 1: see `conv_group_inputs`

    def _own_keep(self, node: fx.Node, mod: GroupSparseLayer) -> Tensor:
        return self.keeps[str(node.target)].detach().cpu()  # checked by `masks.check_keeps` (see `analyse`)

    @torch.no_grad()
    def _const(self, node: fx.Node, info: Info) -> Tensor:
        nan = _nan(info.width)
        kind = info.kind
        if info.axis is None or kind in ("input", "barrier", "dense", "whole", "embedding"):
            return nan
        ins = [self.seen(x, v) for x, v in zip(info.inputs, info.views, strict=True)]
        if kind == "weighted":
            if info.own is not None and not is_linear(info.module):
                return torch.where(info.own, nan, torch.zeros_like(nan))
            return nan
        if kind == "depthwise":
            mod = info.module
            own = info.own if info.own is not None else torch.ones(info.width, dtype=torch.bool)
            if getattr(mod, "_origin", 0.0):  # a zero input is −origin to it: its output would hang on the bits
                return torch.where(own, nan, torch.zeros_like(nan))
            _, bias = effective_params(mod, on_device(LayerMask(str(node.target), own, own, nan, info.own), mod))
            out = torch.where(ins[0] == 0, bias.detach().cpu().double(), nan)
            return torch.where(own, out, torch.zeros_like(nan))
        if info.rule is not None and info.rule.constant is not None:
            return info.rule.constant(info.module, ins[0])
        if kind == "flatten":
            return block_spread(ins[0], info.block)
        if kind == "shape":
            return ins[0].clone()
        if kind == "cat":
            if info.slices:
                return torch.cat(ins)
            first = ins[0]
            same = torch.ones_like(first, dtype=torch.bool)
            for c in ins[1:]:
                same &= c == first
            return torch.where(same, first, nan)
        if kind == "binary":
            return self._binary_const(node, info, ins, nan)
        # channel-wise: evaluate on an input uniform along every other axis (of the recorded shape)
        const, view = ins[0], info.views[0]
        if any(self.info[n].kind == "meta" for n in node.all_input_nodes):
            return nan  # a size computed in the graph (its value is not known here): taken to vary
        in_shape = shape_of(info.inputs[0])
        x = along(torch.nan_to_num(const, nan=0.0), view, len(in_shape)).expand(1, *in_shape[1:]).contiguous()
        out = self._apply(node, [x])
        if out.dim() <= info.axis or out.shape[info.axis] != const.numel():  # pragma: no cover - guarded by the op lists
            raise unsupported(node, "the op changes the number of channels")
        return torch.where(torch.isnan(const), nan, per_channel(out, info.axis))

    def _binary_const(self, node: fx.Node, info: Info, ins: list[Tensor], nan: Tensor) -> Tensor:
        operands, it = [], iter(ins)
        varying = torch.zeros(info.width, dtype=torch.bool)
        for a in (*node.args, *([node.kwargs["other"]] if "other" in node.kwargs else [])):
            if self._is_tensor(a):
                c = next(it).expand(info.width)
                varying |= torch.isnan(c)
                operands.append(torch.nan_to_num(c, nan=0.0))
            elif isinstance(a, fx.Node):  # a size computed in the graph: its value is not known here
                return nan
            else:
                operands.append(a)
        if node.target is torch.where:
            operands[0] = operands[0] != 0
        out = self._apply(node, operands).double()
        return torch.where(varying | ~torch.isfinite(out), nan, out)

    def _apply(self, node: fx.Node, operands: list[Any]) -> Tensor:
        """Run the node's own op on float64 stand-ins (constants) for its tensor operands."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            param = next(module.parameters(), None)
            x = operands[0] if param is None else operands[0].to(param.dtype)
            return module(x).double()
        if len(operands) >= 2:
            if node.op == "call_method":
                return getattr(operands[0], node.target)(*operands[1:])
            return node.target(*operands)
        x = operands[0]
        if node.op == "call_method":
            return getattr(x, node.target)(*node.args[1:], **node.kwargs)
        return node.target(x, *node.args[1:], **node.kwargs)

    # -- which channels must exist ------------------------------------------------------------------
    def _propagate(self, x: fx.Node, view: int | None, read: Tensor) -> None:
        """Mark what an op reading `read` of `x` along `view` needs of `x` (all of it where not aligned)."""
        info = self.info[x]
        if info.kind == "param" or not bool(read.any()):
            return
        if view is not None and view == info.axis:
            info.need |= read & info.varying
        else:
            info.need |= info.varying

    def _backward(self) -> None:
        outs: list[fx.Node] = []
        fx.node.map_arg(self.output.args, outs.append)
        for x in outs:
            if self.info[x].kind in ("meta", "param"):
                continue
            self.info[x].need |= self.info[x].varying
        for node in reversed(list(self.info)):
            info = self.info[node]
            if info.kind in ("meta", "param"):
                continue
            need, kind = info.need, info.kind
            alive = bool(need.any())
            if kind == "input":
                info.carried = torch.ones_like(need)
                continue
            widths = [1 if v is None else shape_of(x)[v] for x, v in zip(info.inputs, info.views, strict=True)]
            whole = [torch.full((w,), alive) for w in widths]
            if info.axis is None or kind in ("barrier", "dense", "whole") or (
                    kind in ("weighted", "depthwise") and info.own is None) or (
                    kind == "embedding" and info.module.max_norm is not None):
                # all or nothing; a plain layer (left dense by `exclude`) keeps all its inputs and outputs
                info.carried = torch.full_like(need, alive)
                info.reads = whole
            elif kind == "flatten":
                read = block_reads(need, widths[0], info.block)
                if self.info[info.inputs[0]].kind == "input":  # select after the flatten: any input shape
                    read = torch.ones_like(read)           # that flattens to the same count then works
                info.carried = block_spread(read, info.block)
                info.reads = [read]
            elif kind == "weighted":
                info.carried = need.clone()
                in_mask = torch.isnan(self.seen(info.inputs[0], info.views[0])).clone()
                if info.own is not None and is_linear(info.module):
                    in_mask &= info.own
                if getattr(info.module, "groups", 1) > 1:
                    in_mask &= conv_group_inputs(info.module, need)
                if not alive:
                    in_mask[:] = False
                elif not bool(in_mask.any()):
                    raise PruneError(f"pruning removes every input of layer {node.target}")
                info.reads = [in_mask]
            elif kind == "embedding":
                info.carried = need.clone()
                info.reads = whole
            elif kind == "cat" and info.slices:
                info.carried = need.clone()
                info.reads = [need[a:b].clone() for a, b in info.slices]
            else:  # depthwise, channelwise, shape, binary, cat along tokens: channel c reads channel c of each
                info.carried = need.clone()
                info.reads = [need.clone() if v is not None else w for v, w in zip(info.views, whole, strict=True)]
            for x, view, read in zip(info.inputs, info.views, info.reads, strict=True):
                self._propagate(x, view, read)


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
        if is_attention(info):
            out.update(attention_masks(an, node, thresholds))
            continue
        if info.kind not in ("weighted", "depthwise"):
            continue
        name = str(node.target)
        const = an.seen(info.inputs[0], info.views[0])
        reads = info.reads[0].clone()
        nan = torch.full_like(const, math.nan)
        fold = torch.where(~torch.isnan(const) & ~reads, const, nan) if info.kind == "weighted" else nan
        if not bool(info.carried.any()):
            reads[:] = False
        threshold = None if thresholds is None or info.own is None else thresholds.get(name)
        out[name] = LayerMask(name, reads, info.carried.clone(), fold, info.own, threshold)
    return out


def is_attention(info: Info) -> bool:
    """Whether a node is an `AttentionHeads` leaf (rule kind `attention`, analysed as `dense`)."""
    return info.kind == "dense" and info.rule is not None and info.rule.kind == "attention"


def attention_masks(an: Analysis, node: fx.Node, thresholds: Mapping[str, float] | None = None) -> dict[str, LayerMask]:
    """The `LayerMask` of each projection of an `AttentionHeads` node, named `<path>.q_proj` … `<path>.out_proj`.

    Its heads are out_proj's groups (`keeps`): q/k/v keep the rows of the kept heads, out_proj their columns and
    every output. q/k/v read every input feature (the shrunk module stores a pruned input group as a zero column,
    `heads.shrink_attention`); their `in_mask` is their own kept input groups, the weights that carry a value
    (the bits loop reads those). A module whose output nobody needs keeps nothing.
    """
    info = an.info[node]
    path, attn = str(node.target), info.module
    alive = bool(info.carried.any())
    heads = head_keep_of(attn, an.keeps.get(f"{path}.out_proj"))
    features = heads.repeat_interleave(attn.head_dim) & alive
    out: dict[str, LayerMask] = {}
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name, layer = f"{path}.{part}", getattr(attn, part)
        own = an.keeps[name].detach().cpu() if isinstance(layer, GroupSparseLayer) else None
        if part == "out_proj":
            in_mask, out_mask = features.clone(), torch.full((attn.embed_dim,), alive)
        else:
            in_mask = (own.clone() if own is not None else torch.ones(attn.embed_dim, dtype=torch.bool)) & alive
            out_mask = features.clone()
        threshold = None if thresholds is None or own is None else thresholds.get(name)
        nan = torch.full((in_mask.numel(),), math.nan, dtype=torch.float64)
        out[name] = LayerMask(name, in_mask, out_mask, nan, own, threshold)
    return out


def head_keep_of(attn: nn.Module, keep: Tensor | None) -> Tensor:
    """Bool per head of an `AttentionHeads`: its out_proj's group keep (None, a plain out_proj: every head)."""
    if keep is None:
        return torch.ones(attn.num_heads, dtype=torch.bool)
    keep = keep.detach().cpu()
    if keep.shape != (attn.num_heads,):
        raise PruneError(f"out_proj has {keep.numel()} groups for {attn.num_heads} heads: bayesianize the model with "
                         "bayescomp.bayesianize (it gives out_proj group_size = head_dim)")
    return keep


def analyse(model: nn.Module, gm: fx.GraphModule, keeps: Mapping[str, Tensor],
            thresholds: Mapping[str, float] | None = None) -> Analysis:
    """The analysis of a traced model (`tracing.trace`) under the group decision `keeps`.

    Raises `PruneError` when `keeps` does not fit the model or leaves a layer nothing to read.
    """
    check_keeps(model, keeps, thresholds)
    return Analysis(model, gm, keeps)
