"""The op-rule table: how each op of a traced network treats channels (along each tensor's channel axis,
`channel_axes`: dimension 1 for convolutions, the last one for a Linear layer's features).

Every node of the traced graph is classified by one lookup here — a module by its type (the first
class of its MRO that has a rule), a function by identity, a tensor method by name — and the
analysis (`analysis.py`) and the surgery (`surgery.py`) act on the rule's *kind*:

==============  =====================================================================================
kind            what it does to channels
==============  =====================================================================================
weighted        mixes channels with a weight (Linear on the last axis of any rank, Conv1d/2d on dimension
                1, their group-sparse twins); its inputs are pruned, constant inputs folded into its
                bias, its outputs sliced
channelwise     output channel c depends only on input channel c (activations, pooling, dropout,
                batch norm, padding, upsampling); sliced with the channels it carries. Its `dim` is the
                axis it reads channels along: 1 (pooling, batch norm), or None for an element-wise op,
                which follows whatever axis its input carries channels on
barrier         mixes channels in a known way (softmax, layer/group norm): reads and produces all. A
                softmax (or normalize) over another axis than the channels' is channel-wise
reduction       a reduction over dimensions other than the batch's: channel-wise (global average
                pooling, a mean over tokens); over the channel axis itself: `whole`
binary          element-wise with other tensors or numbers (add, sub, mul, div, where): channels tied;
                an operand broadcast along the channel axis (a layer-scale parameter) is sliced
cat             concatenation: along the channel axis, channel ranges map to the operands; along
                another axis (a cls token in front of the tokens), channel c of each operand
flatten         flatten, view, reshape: the channel axis is followed where it stays whole or becomes
                blocks of features (flatten-like); a reshape that splits it gives an opaque tensor
shape           moves the channel axis without touching channels: unsqueeze, squeeze, transpose,
                permute, expand, indexing (``x[:, 0]``, a token); indexing within the channels: opaque
whole           reads every operand whole and gives an opaque tensor (matmul: an attention product), or
                a tuple of them (chunk, split, unbind: a fused q/k/v projection split in three)
embedding       nn.Embedding: reads token ids, gives features on the last axis; its columns are sliced
attention       an `AttentionHeads` leaf (`bayescomp.nn.attention`): reads every channel of its query/key/value
                inputs and produces every one of its outputs (carried like `dense`), but has its own keep over
                heads (out_proj's groups) and is rebuilt with fewer heads (`heads.shrink_attention`)
dense           a module carried through whole and unchanged (a layer kind bayescomp does not shrink, or
                one `bayesianize(exclude=...)` left dense): reads every channel of every tensor operand,
                produces every channel; it may take several inputs and return a tuple
==============  =====================================================================================

A plain (not group-sparse) Linear/Conv2d in a Bayesian model keeps the rule `weighted` but is treated as
dense by the analysis: all its inputs and outputs stay, its weights are copied as they are.

Adding an op is one entry in `MODULE_RULES`, `FUNCTION_RULES` or `METHOD_RULES`; a user's own
channel-wise module is added with `register_channelwise`.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import AttentionHeads, GroupSparseLayer
from .runtime import FastMaxPool2d

KINDS = ("weighted", "channelwise", "barrier", "reduction", "binary", "cat", "flatten", "shape", "whole", "embedding",
         "attention", "dense")

#: the attribute `bayesianize` sets on a module it leaves dense (`exclude=`); its rule is then DENSE
DENSE_MARK = "_bayescomp_dense"

#: (module, per-channel constants in, float64, NaN = varies) -> constants out
ConstantRule = Callable[[nn.Module, Tensor], Tensor]
#: (module, bool mask of the channels kept) -> a new module computing those channels only
Slicer = Callable[[nn.Module, Tensor], nn.Module]


@dataclass(frozen=True)
class OpRule:
    """How one op treats channels: its `kind` (see the module doc) and, for channel-wise modules, how
    constants pass through it (None: run the op on a spatially uniform input), how it is sliced
    (None: copied as is, which needs a module without per-channel tensors), and (channel-wise ops) the
    axis it reads channels along: an int (1: (N, C, ...); -1: (N, ..., C)), or None for an element-wise
    op, which follows its input's channel axis."""

    kind: str
    constant: ConstantRule | None = None
    slicer: Slicer | None = None
    dim: int | None = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; kinds are {', '.join(KINDS)}")


@torch.no_grad()
def batch_norm_constant(module: nn.Module, const: Tensor) -> Tensor:
    """γ(c − mean)/√(var + eps) + β per channel at evaluation (every channel varies under batch statistics)."""
    if not module.track_running_stats or module.running_mean is None:
        return torch.full_like(const, math.nan)
    scale = 1.0 / torch.sqrt(module.running_var.detach().cpu().double() + module.eps)
    out = (const - module.running_mean.detach().cpu().double()) * scale
    if module.affine:
        out = out * module.weight.detach().cpu().double() + module.bias.detach().cpu().double()
    return out


def slice_batch_norm(bn: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of a batch norm with the channels `keep` only."""
    new = copy.deepcopy(bn)
    if bool(keep.all()):
        return new
    new.num_features = int(keep.sum())
    for attr in ("weight", "bias"):
        p = getattr(bn, attr)
        if p is not None:
            setattr(new, attr, nn.Parameter(p.detach()[keep.to(p.device)].clone()))
    for attr in ("running_mean", "running_var"):
        buf = getattr(bn, attr)
        if buf is not None:
            setattr(new, attr, buf[keep.to(buf.device)].clone())
    return new


def slice_embedding(emb: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of an `nn.Embedding` with the feature columns `keep` only (every token keeps its row)."""
    new = copy.deepcopy(emb)
    if bool(keep.all()):
        return new
    new.embedding_dim = int(keep.sum())
    new.weight = nn.Parameter(emb.weight.detach()[:, keep.to(emb.weight.device)].clone())
    return new


def copy_layer(module: nn.Module) -> nn.Module:
    """What a compressed model holds for a module copied as is: a copy, a plain `nn.MaxPool2d` as
    `FastMaxPool2d` (the same values, faster on the CPU)."""
    return FastMaxPool2d.like(module) if type(module) is nn.MaxPool2d else copy.deepcopy(module)


WEIGHTED = OpRule("weighted")
CHANNELWISE = OpRule("channelwise")
BARRIER = OpRule("barrier")
REDUCTION = OpRule("reduction")
BINARY = OpRule("binary")
CAT = OpRule("cat")
FLATTEN = OpRule("flatten")
DENSE = OpRule("dense")
BATCH_NORM = OpRule("channelwise", constant=batch_norm_constant, slicer=slice_batch_norm)
ELEMENTWISE = OpRule("channelwise", dim=None)
SHAPE = OpRule("shape")
WHOLE = OpRule("whole")
EMBEDDING = OpRule("embedding", slicer=lambda m, keep: slice_embedding(m, keep))
ATTENTION = OpRule("attention")

#: module type -> rule (subclasses inherit their base's rule)
MODULE_RULES: dict[type[nn.Module], OpRule] = {
    GroupSparseLayer: WEIGHTED, nn.Linear: WEIGHTED, nn.Conv2d: WEIGHTED, nn.Conv1d: WEIGHTED,
    nn.Embedding: EMBEDDING, AttentionHeads: ATTENTION,
    nn.BatchNorm1d: BATCH_NORM, nn.BatchNorm2d: BATCH_NORM,
    nn.Flatten: FLATTEN,
    **dict.fromkeys((nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.GroupNorm), BARRIER),
    **dict.fromkeys((
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Softsign,
        nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.LogSigmoid, nn.SELU, nn.CELU,
        nn.Dropout, nn.AlphaDropout, nn.Identity,
    ), ELEMENTWISE),
    **dict.fromkeys((
        nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
        nn.ZeroPad1d, nn.ConstantPad1d,
    ), CHANNELWISE),
    **dict.fromkeys((
        nn.EmbeddingBag, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.PReLU, nn.MultiheadAttention,
    ), DENSE),
}  # fmt: skip

#: call_function targets -> rule (every one of them may appear in a compressed graph: see io.graphs.FUNCTIONS)
FUNCTION_RULES: dict[Callable, OpRule] = {
    **dict.fromkeys((
        F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
        F.hardtanh, F.softplus, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, torch.relu, torch.sigmoid, torch.tanh,
        operator.neg,
    ), ELEMENTWISE),
    **dict.fromkeys((
        F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad,
    ), CHANNELWISE),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize), BARRIER),
    **dict.fromkeys((torch.mean, torch.sum, torch.amax, torch.amin), REDUCTION),
    **dict.fromkeys((operator.add, operator.sub, operator.mul, operator.truediv,
                     torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.where,
                     operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne), BINARY),
    **dict.fromkeys((torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute, operator.getitem), SHAPE),
    **dict.fromkeys((torch.matmul, operator.matmul, torch.bmm, F.scaled_dot_product_attention,
                     torch.chunk, torch.split, torch.unbind), WHOLE),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), CAT),
    **dict.fromkeys((torch.flatten, torch.reshape), FLATTEN),
}  # fmt: skip

#: call_method targets (tensor methods) -> rule
METHOD_RULES: dict[str, OpRule] = {
    **dict.fromkeys(("relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to"), ELEMENTWISE),
    **dict.fromkeys(("softmax", "log_softmax"), BARRIER),
    **dict.fromkeys(("mean", "sum", "amax", "amin"), REDUCTION),
    **dict.fromkeys(("add", "sub", "mul", "div"), BINARY),
    **dict.fromkeys(("flatten", "view", "reshape"), FLATTEN),
    **dict.fromkeys(("unsqueeze", "squeeze", "transpose", "permute", "expand"), SHAPE),
    **dict.fromkeys(("matmul", "bmm", "chunk", "split", "unbind"), WHOLE),
}


def type_rule(cls: type[nn.Module]) -> OpRule | None:
    """The rule of a module type: that of the first class in its MRO with one (None: unknown)."""
    return next((MODULE_RULES[base] for base in cls.__mro__ if base in MODULE_RULES), None)


def module_rule(module: nn.Module) -> OpRule | None:
    """The rule of a module (None: unknown); DENSE for one `bayesianize` left dense."""
    if getattr(module, DENSE_MARK, False):
        return DENSE
    return type_rule(type(module))


def function_rule(target: Callable) -> OpRule | None:
    try:
        return FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable target
        return None


def method_rule(name: str) -> OpRule | None:
    return METHOD_RULES.get(name)


def register_channelwise(cls: type[nn.Module], *, slicer: Slicer | None = None,
                         constant: ConstantRule | None = None, dim: int | None = 1) -> None:
    """Declare a module type channel-wise: its output channel c depends only on input channel c, channels
    running along `dim` — 1 for (N, C, ...) tensors, -1 for (N, ..., C) ones (a transformer's features), None
    for an element-wise module, which follows whatever axis its input carries channels on.

    Compression then follows channels through it (and torch.fx keeps it as a leaf, whatever its
    forward does). `slicer(module, keep)` returns a new module that computes only the channels where
    the bool tensor `keep` is True; leave it None for a module without per-channel tensors (it is
    copied). `constant(module, c)` maps per-channel constants (float64, NaN = varies) to its output's;
    None runs the module on a spatially uniform input of each constant, which is right for any
    module that computes in evaluation mode without batch statistics.

    >>> class Scale(nn.Module):                     # y[:, c] = s[c] · x[:, c]
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.s = nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.s.view(1, -1, *([1] * (x.dim() - 2)))
    >>> def slice_scale(m, keep):
    ...     new = Scale(int(keep.sum()))
    ...     new.s.data.copy_(m.s.data[keep])
    ...     return new
    >>> register_channelwise(Scale, slicer=slice_scale)

    A compressed model holding such a module runs in PyTorch; a model file (`bayescomp.save`) stores
    only the modules of its whitelist and refuses it by name.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_channelwise takes an nn.Module subclass, not {cls!r}")
    known = type_rule(cls)
    if known is not None and known.kind == "weighted":
        raise ValueError(f"{cls.__name__} is a weighted layer; it cannot be declared channel-wise")
    if dim is not None and not isinstance(dim, int):
        raise TypeError(f"register_channelwise: dim must be an int or None, not {dim!r}")
    MODULE_RULES[cls] = OpRule("channelwise", constant=constant, slicer=slicer, dim=dim)


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and its group-sparse twins (groups over inputs), False for convolutions."""
    return hasattr(module, "in_features")
