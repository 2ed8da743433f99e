"""The one surgery: emit the shrunk network from the analysis — sliced layers, and `Select`/`Realign`/
`AppendOnes` where channel sets differ.

The result is a plain `torch.fx.GraphModule` computing exactly what the masked Bayesian network
computes at evaluation: weights are the posterior means E[w] (masked, optionally rounded to the
layer's bits), biases the posterior-mean biases plus any constant inputs folded in (into the bias
for a Linear layer or an unpadded convolution; into one extra input channel of ones for a zero-padded
convolution, whose border taps see the padding's zeros). A grouped convolution is rebuilt through its dense
(block-diagonal) equivalent and packed back into groups of equal width (`Builder._emit_grouped`); a 1-d
convolution stays a `nn.Conv1d`. `as_sequential` turns a graph that is a line
of modules into the flat `nn.Sequential` a chain's user expects.

Channels run along each tensor's own axis (`channel_axes`): a `Select`/`Realign` on another axis than 1
is run between two transposes; an operand read whole and cut along another axis is selected after it;
a parameter the forward uses directly becomes a buffer cut to the channels it meets; sizes read from a
tensor whose channels were cut report its original width (`channel_axes.full_shape`), and a reshape's
size at the channel position is rewritten to the shrunk width.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..convert import UnsupportedLayerError
from ..nn import zero_padded
from .analysis import Analysis, Info, is_attention, label, shape_of, unsupported
from .channel_axes import along, full_shape, norm_dim
from .heads import PROJECTIONS, decided_attention
from .masks import LayerMask, PruneError, on_device
from .precision import round_to_bits
from .rules import copy_layer, is_linear
from .runtime import AppendOnes, Realign, Select
from .weights import constant_inputs, effective_params, fold_origin


class Builder:
    """Emit the shrunk graph: sliced layers, and Select/Realign/AppendOnes where channel sets differ."""

    def __init__(self, an: Analysis, masks: Mapping[str, LayerMask], bits: Mapping[str, int] | None) -> None:
        self.an = an
        self.masks = masks
        self.bits = bits
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, Any] = {}  # a node of the new graph, or a size known to be constant
        self.cache: dict[tuple, fx.Node] = {}
        param = next(an.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.new_layers: dict[str, nn.Module | None] = {}  # weighted layers in execution order; None: removed

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

    def _call(self, module: nn.Module, path: str, args: tuple, kwargs: dict | None = None) -> fx.Node:
        target = self._add_module(path, module.to(self.device))
        return self.graph.call_module(target, args, kwargs)

    def _along(self, module: nn.Module, path: str, x: fx.Node, axis: int) -> fx.Node:
        """Run a channel helper (`Select`, `Realign`: dimension 1) along `axis` (transposed there and back)."""
        if axis == 1:
            return self._call(module, path, (x,))
        x = self.graph.call_method("transpose", (x, 1, axis))
        return self.graph.call_method("transpose", (self._call(module, path, (x,)), 1, axis))

    def _param(self, src: fx.Node, view: int | None, reads: Tensor, tag: str) -> fx.Node:
        """A parameter the forward uses directly, cut to the channels `reads` along `view`, as a buffer."""
        value = self.an.info[src].value
        if view is not None and not bool(reads.all()):
            value = value.index_select(view, torch.nonzero(reads).flatten())
        name = f"_param_{tag}"
        self.root.register_buffer(name, value.clone().to(self.device))
        return self.graph.get_attr(name)

    def _materialize(self, src: fx.Node, view: int | None, reads: Tensor, consumer: fx.Node, slot: int,
                     broadcast: bool = False) -> fx.Node | None:
        """The new-graph value holding channels `reads` of `src` along `view` (in order), constants put back;
        `view` None, or another axis than `src`'s: `src` whole (then cut along `view`)."""
        info = self.an.info[src]
        if not bool(reads.any()):
            return None
        key = (src, view, reads.numpy().tobytes(), broadcast)
        if key in self.cache:
            return self.cache[key]
        tag = f"{consumer.name}_in{slot}"
        if info.kind == "param":
            value = self._param(src, view, reads, tag)
        elif info.axis is None or view != info.axis:
            value = self.env[src] if info.axis is None else \
                self._materialize(src, info.axis, torch.ones_like(info.carried), consumer, slot)
            if view is not None and not bool(reads.all()):
                index = torch.nonzero(reads).flatten()
                value = self._along(Select(index, reads.numel()), f"{tag}_select", value, view)
        else:
            value = self._aligned(src, info, reads, consumer, tag, broadcast)
        self.cache[key] = value
        return value

    def _aligned(self, src: fx.Node, info: Info, reads: Tensor, consumer: fx.Node, tag: str,
                 broadcast: bool) -> fx.Node:
        carried, axis = info.carried, info.axis
        fill = reads & ~carried
        phys = reads & carried
        if not bool(fill.any()):
            if torch.equal(reads, carried):
                return self.env[src]
            index = torch.nonzero(reads[carried]).flatten()
            return self._along(Select(index, int(carried.sum())), f"{tag}_select", self.env[src], axis)
        values = info.const[reads]
        if bool(torch.isnan(info.const[fill]).any()):  # pragma: no cover - the analysis guarantees this
            raise AssertionError(f"{label(consumer)}: a varying channel of {src.name} was not carried")
        if not bool(phys.any()) and broadcast:
            name = f"_const_{tag}"
            self.root.register_buffer(name, along(values.to(self.dtype), axis, len(info.shape)).to(self.device))
            return self.graph.get_attr(name)
        if not bool(carried.any()):
            raise PruneError(f"{label(consumer)}: every channel of its input is constant after pruning, but "
                             "its output still varies; this network cannot be shrunk at these thresholds")
        pos = torch.cumsum(carried.long(), 0) - 1  # position of each carried channel in the shrunk tensor
        sel = phys[reads]
        src_idx = pos[reads & carried]
        dst_idx = torch.nonzero(sel).flatten()
        fill_values = torch.where(sel, torch.zeros_like(values), values).to(self.dtype)
        return self._along(Realign(src_idx, dst_idx, fill_values), f"{tag}_realign", self.env[src], axis)

    def _meta(self, n: fx.Node) -> Any:
        """A size of the original graph in the new one: computed there from the same tensors, except that a
        tensor whose channels were cut reports its original width (`channel_axes.full_shape`)."""
        if n in self.env:
            return self.env[n]
        info = self.an.info[n]
        if info.kind != "meta":
            raise unsupported(n, "a size is read from a value that is not a tensor shape")  # pragma: no cover
        x = n.args[0] if n.all_input_nodes and n.args and isinstance(n.args[0], fx.Node) else None
        if x is not None and self.an.info[x].kind != "meta":  # a shape query on a tensor
            xi = self.an.info[x]
            if xi.kind == "param":
                value: Any = self._param(x, None, torch.ones(1, dtype=torch.bool), f"{n.name}_src")
            elif x not in self.env:
                raise unsupported(n, "reads the shape of a tensor that pruning removes entirely")
            else:
                value = self.env[x]
            cut = xi.axis is not None and xi.kind != "param" and not bool(xi.carried.all())
            if cut and n.target == "size" and len(n.args) > 1:
                if norm_dim(n.args[1], len(xi.shape)) == xi.axis:
                    self.env[n] = xi.shape[xi.axis]
                    return self.env[n]
            elif cut and (n.target == "size" or n.args[1:] == ("shape",)):
                self.env[n] = self.graph.call_function(full_shape, (value, xi.axis, xi.shape[xi.axis]))
                return self.env[n]
            args = (value, *n.args[1:])
        else:
            args = fx.node.map_arg(n.args, self._meta)
        kwargs = fx.node.map_arg(n.kwargs, self._meta)
        make = self.graph.call_method if n.op == "call_method" else self.graph.call_function
        self.env[n] = make(n.target, args, kwargs)
        return self.env[n]

    def _mapped(self, node: fx.Node, info: Info, broadcast: list[bool] | None = None) -> tuple[tuple, dict]:
        """The node's arguments in the new graph: each tensor operand as the op reads it, sizes as `_meta`."""
        def value(n: fx.Node) -> Any:
            if n in info.inputs:
                i = info.inputs.index(n)
                out = self._materialize(n, info.views[i], info.reads[i], node, i, bool(broadcast and broadcast[i]))
                if out is None:  # pragma: no cover - a live node reads at least one channel of each operand
                    raise AssertionError(f"{label(node)} reads nothing of {n.name}")
                return out
            return self._meta(n)

        return fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)

    def build(self) -> fx.GraphModule:
        an = self.an
        for node, info in an.info.items():
            if info.kind in ("meta", "param"):  # emitted where used (`_meta`, `_param`)
                continue
            if info.kind == "input":
                if node.args:
                    self.env[node] = self.graph.placeholder(node.target, default_value=node.args[0])
                else:
                    self.env[node] = self.graph.placeholder(node.target)
                continue
            if not bool(info.carried.any()):
                if info.kind in ("weighted", "depthwise"):
                    self._record_dead(node, info)
                elif is_attention(info):
                    self.new_layers.update(dict.fromkeys(f"{node.target}.{p}" for p in PROJECTIONS))
                continue
            emit = getattr(self, f"_emit_{info.kind}")
            self.env[node] = emit(node, info)

        def out_value(n: fx.Node) -> fx.Node:
            info = an.info[n]
            if info.kind == "meta":
                raise unsupported(an.output, f"the model returns the non-tensor value {n.name!r}")
            return self._materialize(n, info.axis, torch.ones(info.width, dtype=torch.bool), an.output, 0)

        self.graph.output(fx.node.map_arg(an.output.args[0], out_value))
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=f"Compressed{type(an.model).__name__}")
        return gm.eval()

    def _input(self, node: fx.Node, info: Info, i: int = 0, broadcast: bool = False) -> fx.Node:
        value = self._materialize(info.inputs[i], info.views[i], info.reads[i], node, i, broadcast)
        if value is None:  # pragma: no cover - a live node reads at least one channel
            raise AssertionError(f"{label(node)} reads nothing")
        return value

    def _record_dead(self, node: fx.Node, info: Info) -> None:
        self.new_layers[str(node.target)] = None

    def _emit_weighted(self, node: fx.Node, info: Info) -> fx.Node:
        m = info.module
        lm = self.masks[str(node.target)]
        weight, bias = effective_params(m, on_device(lm, m))
        if self.bits is not None and lm.name in self.bits:
            weight = round_to_bits(weight, self.bits[lm.name])
        groups = getattr(m, "groups", 1)
        if groups > 1:  # the dense equivalent: the steps below then treat it as an ungrouped convolution
            weight = block_diagonal(weight, groups)
        kernel, has_const = constant_inputs(weight, on_device(lm, m))
        linear = is_linear(m)
        padded = not linear and zero_padded(m) and getattr(m, "padding_mode", "zeros") == "zeros"
        ones_channel = has_const and padded
        if has_const and not ones_channel:
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
        if groups > 1:
            return self._emit_grouped(node, lm, m, w, b, x, ones_channel)
        if linear:
            new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=True)
        else:
            new = plain_conv(m, w.shape[1], w.shape[0], 1)
        return self._finish_layer(node, lm, new, w, b, x)

    def _emit_grouped(self, node: fx.Node, lm: LayerMask, m: nn.Module, w: Tensor, b: Tensor, x: fx.Node,
                      ones_channel: bool) -> fx.Node:
        """A grouped convolution (groups > 1, not depthwise) from its shrunk dense equivalent `w` (kept outputs ×
        the channels of `x`: its kept inputs, then the channel of ones if `ones_channel`).

        A grouped convolution needs the same input and output width in every group, while pruning leaves
        each convolution group its own kept outputs K_g and inputs R_g. The rebuilt layer keeps the groups
        with some kept output, each `max |K_g|` outputs wide and `max |R_g|` (+1 for the ones) inputs wide:
        a narrower group's extra input slots read one of its channels again (a `Select` in front) with
        zero weights, and its extra outputs are zero filters, dropped by a `Select` behind. Both are exact
        (0·x = 0), every stored weight is a kept one or a zero, and a layer whose pruning is even across
        groups — or which keeps a single group (then a plain convolution) — needs neither `Select`.
        """
        n_x = w.shape[1]
        out_group = torch.nonzero(lm.out_mask).flatten().cpu() // (m.out_channels // m.groups)
        in_group = torch.nonzero(lm.in_mask).flatten().cpu() // (m.in_channels // m.groups)
        live = torch.unique(out_group).tolist()
        outs = [torch.nonzero(out_group == g).flatten() for g in live]
        ins = [torch.nonzero(in_group == g).flatten() for g in live]
        if ones_channel:
            ins = [torch.cat([i, torch.tensor([n_x - 1])]) for i in ins]
        out_w = max(len(o) for o in outs)
        in_w = max(max(len(i) for i in ins), 1)
        kernel = w.shape[2:]
        new_w = w.new_zeros(len(live) * out_w, in_w, *kernel)
        new_b = b.new_zeros(len(live) * out_w)
        index, position = [], []
        for slot, (o, i) in enumerate(zip(outs, ins, strict=True)):
            rows = slot * out_w + torch.arange(len(o))
            position += rows.tolist()
            rows, o, i = rows.to(w.device), o.to(w.device), i.to(w.device)
            new_w[rows, : len(i)] = w[o][:, i]
            new_b[rows] = b[o]
            index += i.tolist() + [int(i[0]) if len(i) else 0] * (in_w - len(i))
        if index != list(range(n_x)):
            x = self._call(Select(torch.tensor(index), n_x), f"{lm.name}_gather", (x,))
        new = plain_conv(m, len(live) * in_w, len(live) * out_w, len(live))
        y = self._finish_layer(node, lm, new, new_w, new_b, x)
        if position != list(range(len(live) * out_w)):
            y = self._call(Select(torch.tensor(position), len(live) * out_w), f"{lm.name}_unpad", (y,))
        return y

    def _emit_depthwise(self, node: fx.Node, info: Info) -> fx.Node:
        m = info.module
        lm = self.masks[str(node.target)]
        weight, bias = effective_params(m, on_device(lm, m))
        if self.bits is not None and lm.name in self.bits:
            weight = round_to_bits(weight, self.bits[lm.name])
        bias = fold_origin(m, weight, bias)
        keep = lm.out_mask.to(weight.device)
        w, b = weight[keep], bias[keep]
        k = int(keep.sum())
        new = plain_conv(m, k, k, k)
        return self._finish_layer(node, lm, new, w, b, self._input(node, info))

    def _finish_layer(self, node: fx.Node, lm: LayerMask, new: nn.Module, w: Tensor, b: Tensor, x: fx.Node) -> fx.Node:
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            new.bias.copy_(b)
        self.new_layers[lm.name] = new
        return self._call(new, lm.name, (x,))

    def _emit_channelwise(self, node: fx.Node, info: Info) -> fx.Node:
        """The node's own op on the channels it carries (a module sliced), sizes rewritten where it has any."""
        args, kwargs = self._mapped(node, info)
        if node.op == "call_module":
            return self._call(self._sliced(node, info), str(node.target), args, kwargs)
        if info.resize is not None:
            args, kwargs = self._resized(node, info, args, kwargs)
        make = self.graph.call_method if node.op == "call_method" else self.graph.call_function
        return make(node.target, args, kwargs)

    _emit_barrier = _emit_shape = _emit_whole = _emit_embedding = _emit_channelwise

    def _resized(self, node: fx.Node, info: Info, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A reshape's (or expand's) sizes with the channel position set to the width the shrunk tensor has."""
        pos, mode = info.resize
        if mode == "keep":
            new = -1
        else:
            outer, inner = info.block
            new = outer * int(info.reads[0].sum()) * inner
        rest = list(args[1:])
        if node.op == "call_method" and len(rest) > 1 or (rest and not isinstance(rest[0], (tuple, list))):
            if rest[pos] != -1:
                rest[pos] = new
            return (args[0], *rest), kwargs
        if rest:
            sizes = list(rest[0])
            sizes[pos] = new if sizes[pos] != -1 else -1
            return (args[0], type(rest[0])(sizes), *rest[1:]), kwargs
        key = "shape" if "shape" in kwargs else "size"
        sizes = list(kwargs[key])
        sizes[pos] = new if sizes[pos] != -1 else -1
        return args, {**kwargs, key: tuple(sizes)}

    def _emit_dense(self, node: fx.Node, info: Info) -> fx.Node:
        """A module carried whole (or an item of its tuple output): every operand with all its channels."""
        def whole(x: fx.Node) -> fx.Node:
            return self._materialize(x, None, torch.ones(1, dtype=torch.bool), node, info.inputs.index(x))

        if node.op == "call_function":  # operator.getitem on a dense module's tuple
            return self.graph.call_function(node.target, fx.node.map_arg(node.args, whole))
        args, kwargs = fx.node.map_arg(node.args, whole), fx.node.map_arg(node.kwargs, whole)
        if is_attention(info):  # its own keep over heads: rebuilt with fewer heads, projections recorded
            path = str(node.target)
            new = decided_attention(info.module, path, self.masks, self.bits)
            self.new_layers.update({f"{path}.{p}": getattr(new, p) for p in PROJECTIONS})
            return self._call(new, path, args, kwargs)
        return self._call(copy_layer(info.module), str(node.target), args, kwargs)

    @staticmethod
    def _sliced(node: fx.Node, info: Info) -> nn.Module:
        """A channel-wise module cut to the channels it carries (its rule's slicer), or copied whole."""
        keep, module = info.carried, info.module
        if info.rule is not None and info.rule.slicer is not None and not bool(keep.all()):
            return info.rule.slicer(module, keep)
        if not bool(keep.all()) and (next(module.parameters(), None) is not None or next(module.buffers(), None) is not None):
            raise UnsupportedLayerError(f"{label(node)}: {type(module).__name__} holds tensors and loses channels; "
                                        "register it with a slicer (bayescomp.register_channelwise)")
        return copy_layer(module)

    def _emit_flatten(self, node: fx.Node, info: Info) -> fx.Node:
        x_shape = shape_of(info.inputs[0])
        classic = info.axis == 1 and info.views[0] == 1 and len(info.shape) == 2 and info.block[0] == 1
        if node.op == "call_module":
            return self._call(copy.deepcopy(info.module), str(node.target), (self._input(node, info),))
        if classic and len(x_shape) >= 2 and info.resize is not None:  # a reshape that is a flatten: as one
            return self.graph.call_function(torch.flatten, (self._input(node, info), 1))
        if node.target in ("flatten", torch.flatten):  # a method or a function: as the function
            args, kwargs = self._mapped(node, info)
            return self.graph.call_function(torch.flatten, args, kwargs)
        return self._emit_channelwise(node, info)

    def _emit_cat(self, node: fx.Node, info: Info) -> fx.Node:
        if not info.slices:  # along the tokens (or an opaque result): the op as it is
            return self._emit_channelwise(node, info)
        parts = [self._materialize(x, v, r, node, i)
                 for i, (x, v, r) in enumerate(zip(info.inputs, info.views, info.reads, strict=True))]
        parts = [p for p in parts if p is not None]
        if len(parts) == 1:
            return parts[0]
        return self.graph.call_function(torch.cat, (parts,), {"dim": info.axis})

    def _emit_binary(self, node: fx.Node, info: Info) -> fx.Node:
        # an operand that is wholly constant may be a broadcast constant, if a carried operand has the full shape
        def full_shaped(x: fx.Node) -> bool:
            s = shape_of(x)
            return len(s) == len(info.shape) and all(a == b for d, (a, b) in enumerate(zip(s, info.shape, strict=True))
                                                     if d != info.axis)

        full = [i for i, x in enumerate(info.inputs) if info.axis is not None and info.views[i] == self.an.info[x].axis
                and self.an.info[x].kind != "param" and bool((info.reads[i] & self.an.info[x].carried).any())
                and full_shaped(x)]
        broadcast = [bool(full) and i not in full and info.views[i] == self.an.info[x].axis
                     for i, x in enumerate(info.inputs)]
        args, kwargs = self._mapped(node, info, broadcast)
        make = self.graph.call_method if node.op == "call_method" else self.graph.call_function
        return make(node.target, args, kwargs)


def block_diagonal(weight: Tensor, groups: int) -> Tensor:
    """The (out, in, *kernel) weight of the ungrouped convolution that computes what a grouped one with
    `weight` (out, in/groups, *kernel) computes: output o reads the inputs of its group o // (out/groups)."""
    out, per_in = weight.shape[:2]
    dense = weight.new_zeros(out, per_in * groups, *weight.shape[2:])
    per_out = out // groups
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = weight[g * per_out:(g + 1) * per_out]
    return dense


def plain_conv(like: nn.Module, in_channels: int, out_channels: int, groups: int) -> nn.Module:
    """A plain convolution of `like`'s kind (1-d or 2-d) and geometry with the given widths and groups."""
    cls = nn.Conv1d if len(like.kernel_size) == 1 else nn.Conv2d
    return cls(in_channels, out_channels, like.kernel_size, like.stride, like.padding, like.dilation, groups,
               bias=True, padding_mode=getattr(like, "padding_mode", "zeros"))


#: the name suffix of a helper module in front of a layer, in a chain's `nn.Sequential`
_HELPER_SUFFIX = {Select: "select", AppendOnes: "ones", Realign: "realign"}


def as_sequential(gm: fx.GraphModule) -> nn.Sequential | None:
    """The flat `nn.Sequential` of a graph that is a line of modules (each reads the one before), else None.

    Each module is named by its path with dots as underscores; a helper in front of a layer by the
    layer's name and ``_select``, ``_ones`` or ``_realign``.
    """
    nodes = list(gm.graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    line, prev = [], nodes[0]
    for node in nodes[1:-1]:
        if node.op != "call_module" or node.args != (prev,) or node.kwargs:
            return None
        line.append((str(node.target), gm.get_submodule(str(node.target))))
        prev = node
    if nodes[-1].args != (prev,):
        return None
    seq, pending = nn.Sequential(), []
    for target, module in line:
        suffix = _HELPER_SUFFIX.get(type(module))
        if suffix is not None:
            pending.append((suffix, module))
            continue
        safe = target.replace(".", "_")
        for suffix, helper in pending:
            seq.add_module(_free_name(seq, f"{safe}_{suffix}"), helper)
        pending = []
        seq.add_module(safe, module)
    for suffix, helper in pending:
        seq.add_module(_free_name(seq, f"output_{suffix}"), helper)
    return seq.eval()


def _free_name(seq: nn.Module, name: str) -> str:
    """`name`, or `name_2`, `name_3`, ... where two helpers stand in front of one layer (a grouped convolution's
    `Select` behind it, then the next layer's own)."""
    k, free = 1, name
    while hasattr(seq, free):
        k += 1
        free = f"{name}_{k}"
    return free
