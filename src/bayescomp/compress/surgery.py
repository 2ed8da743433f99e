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
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from ..convert import UnsupportedLayerError
from ..nn import zero_padded
from .analysis import Analysis, Info, label, shape_of, unsupported
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
        self.env: dict[fx.Node, fx.Node] = {}
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
                raise AssertionError(f"{label(consumer)}: a varying channel of {src.name} was not carried")
            if not bool(phys.any()) and broadcast:
                c = values.to(self.dtype).view(1, -1, *([1] * (len(info.shape) - 2)))
                name = f"_const_{tag}"
                self.root.register_buffer(name, c.to(self.device))
                value = self.graph.get_attr(name)
            elif not bool(carried.any()):
                raise PruneError(f"{label(consumer)}: every channel of its input is constant after pruning, but "
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
            if not bool(info.carried.any()):
                if info.kind in ("weighted", "depthwise"):
                    self._record_dead(node, info)
                continue
            emit = getattr(self, f"_emit_{info.kind}")
            self.env[node] = emit(node, info)

        def out_value(n: fx.Node) -> fx.Node:
            info = an.info[n]
            if info.kind == "meta":
                raise unsupported(an.output, f"the model returns the non-tensor value {n.name!r}")
            return self._materialize(n, torch.ones_like(info.carried), an.output, 0)

        self.graph.output(fx.node.map_arg(an.output.args[0], out_value))
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=f"Compressed{type(an.model).__name__}")
        return gm.eval()

    def _input(self, node: fx.Node, info: Info, i: int = 0, broadcast: bool = False) -> fx.Node:
        value = self._materialize(info.inputs[i], info.reads[i], node, i, broadcast)
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
        x = self._input(node, info)
        if node.op == "call_module":
            return self._call(self._sliced(node, info), str(node.target), (x,))
        if node.op == "call_method":
            return self.graph.call_method(node.target, (x, *node.args[1:]), dict(node.kwargs))
        return self.graph.call_function(node.target, (x, *node.args[1:]), dict(node.kwargs))

    _emit_barrier = _emit_channelwise

    def _emit_dense(self, node: fx.Node, info: Info) -> fx.Node:
        """A module carried whole (or an item of its tuple output): every operand with all its channels."""
        def whole(x: fx.Node) -> fx.Node:
            return self._materialize(x, torch.ones_like(self.an.info[x].carried), node, info.inputs.index(x))

        if node.op == "call_function":  # operator.getitem on a dense module's tuple
            return self.graph.call_function(node.target, fx.node.map_arg(node.args, whole))
        args, kwargs = fx.node.map_arg(node.args, whole), fx.node.map_arg(node.kwargs, whole)
        return self._call(copy_layer(info.module), str(node.target), args, kwargs)

    @staticmethod
    def _sliced(node: fx.Node, info: Info) -> nn.Module:
        """A channel-wise module cut to the channels it carries (its rule's slicer), or copied whole."""
        keep, module = info.carried, info.module
        if info.rule is not None and info.rule.slicer is not None:
            return info.rule.slicer(module, keep)
        if not bool(keep.all()) and (next(module.parameters(), None) is not None or next(module.buffers(), None) is not None):
            raise UnsupportedLayerError(f"{label(node)}: {type(module).__name__} holds tensors and loses channels; "
                                        "register it with a slicer (bayescomp.register_channelwise)")
        return copy_layer(module)

    def _emit_flatten(self, node: fx.Node, info: Info) -> fx.Node:
        x = self._input(node, info)
        if node.op == "call_module":
            return self._call(copy.deepcopy(info.module), str(node.target), (x,))
        return self.graph.call_function(torch.flatten, (x, 1))

    def _emit_cat(self, node: fx.Node, info: Info) -> fx.Node:
        parts = [self._materialize(x, r, node, i) for i, (x, r) in enumerate(zip(info.inputs, info.reads, strict=True))]
        parts = [p for p in parts if p is not None]
        if len(parts) == 1:
            return parts[0]
        return self.graph.call_function(torch.cat, (parts,), {"dim": 1})

    def _emit_binary(self, node: fx.Node, info: Info) -> fx.Node:
        args = list(node.args)
        kwargs = dict(node.kwargs)
        if "other" in kwargs:
            args.append(kwargs.pop("other"))
        # an operand that is wholly constant may be a broadcast constant, if a carried operand has the full shape
        full = [i for i, x in enumerate(info.inputs) if bool((info.reads[i] & self.an.info[x].carried).any())
                and shape_of(x)[2:] == info.shape[2:] and shape_of(x)[0] == info.shape[0]]
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
