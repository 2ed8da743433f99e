"""The op-rule table: how each op of a traced network treats channels (dimension 1).

Every node of the traced graph is classified by one lookup here — a module by its type (the first
class of its MRO that has a rule), a function by identity, a tensor method by name — and the
analysis (`analysis.py`) and the surgery (`surgery.py`) act on the rule's *kind*:

==============  =====================================================================================
kind            what it does to channels
==============  =====================================================================================
weighted        mixes channels with a weight (Linear, Conv1d/2d, their group-sparse twins); its inputs
                are pruned, constant inputs folded into its bias, its outputs sliced
channelwise     output channel c depends only on input channel c (activations, pooling, dropout,
                batch norm, padding, upsampling); sliced with the channels it carries
barrier         mixes channels in a known way (softmax, layer/group norm): reads and produces all
reduction       a reduction over dimensions ≥ 2 (e.g. global average pooling): channel-wise
binary          element-wise with another tensor or a number (add, sub, mul, div): channels tied
cat             concatenation along dimension 1: channel ranges map to the operands
flatten         flatten from dimension 1: each channel becomes a block of features
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

from ..nn import GroupSparseLayer
from .runtime import FastMaxPool2d

KINDS = ("weighted", "channelwise", "barrier", "reduction", "binary", "cat", "flatten", "dense")

#: the attribute `bayesianize` sets on a module it leaves dense (`exclude=`); its rule is then DENSE
DENSE_MARK = "_bayescomp_dense"

#: (module, per-channel constants in, float64, NaN = varies) -> constants out
ConstantRule = Callable[[nn.Module, Tensor], Tensor]
#: (module, bool mask of the channels kept) -> a new module computing those channels only
Slicer = Callable[[nn.Module, Tensor], nn.Module]


@dataclass(frozen=True)
class OpRule:
    """How one op treats channels: its `kind` (see the module doc) and, for channel-wise modules, how
    constants pass through it (None: run the op on a spatially uniform input) and how it is sliced
    (None: copied as is, which needs a module without per-channel tensors)."""

    kind: str
    constant: ConstantRule | None = None
    slicer: Slicer | None = None

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

#: module type -> rule (subclasses inherit their base's rule)
MODULE_RULES: dict[type[nn.Module], OpRule] = {
    GroupSparseLayer: WEIGHTED, nn.Linear: WEIGHTED, nn.Conv2d: WEIGHTED, nn.Conv1d: WEIGHTED,
    nn.BatchNorm1d: BATCH_NORM, nn.BatchNorm2d: BATCH_NORM,
    nn.Flatten: FLATTEN,
    **dict.fromkeys((nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.GroupNorm), BARRIER),
    **dict.fromkeys((
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Softsign,
        nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.LogSigmoid, nn.SELU, nn.CELU,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
        nn.ZeroPad1d, nn.ConstantPad1d,
    ), CHANNELWISE),
    **dict.fromkeys((
        nn.Embedding, nn.EmbeddingBag, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.PReLU, nn.MultiheadAttention,
    ), DENSE),
}  # fmt: skip

#: call_function targets -> rule (every one of them may appear in a compressed graph: see io.graphs.FUNCTIONS)
FUNCTION_RULES: dict[Callable, OpRule] = {
    **dict.fromkeys((
        F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
        F.hardtanh, F.softplus, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
        F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad, torch.relu, torch.sigmoid, torch.tanh,
        operator.neg,
    ), CHANNELWISE),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize), BARRIER),
    **dict.fromkeys((torch.mean, torch.sum, torch.amax, torch.amin), REDUCTION),
    **dict.fromkeys((operator.add, operator.sub, operator.mul, operator.truediv,
                     torch.add, torch.sub, torch.mul, torch.div, torch.true_divide), BINARY),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), CAT),
    **dict.fromkeys((torch.flatten, torch.reshape), FLATTEN),
}  # fmt: skip

#: call_method targets (tensor methods) -> rule
METHOD_RULES: dict[str, OpRule] = {
    **dict.fromkeys(("relu", "sigmoid", "tanh", "contiguous", "clone", "detach"), CHANNELWISE),
    **dict.fromkeys(("softmax", "log_softmax"), BARRIER),
    **dict.fromkeys(("mean", "sum", "amax", "amin"), REDUCTION),
    **dict.fromkeys(("add", "sub", "mul", "div"), BINARY),
    **dict.fromkeys(("flatten", "view", "reshape"), FLATTEN),
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
                         constant: ConstantRule | None = None) -> None:
    """Declare a module type channel-wise: its output channel c (dimension 1) depends only on input channel c.

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
    MODULE_RULES[cls] = OpRule("channelwise", constant=constant, slicer=slicer)


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and its group-sparse twins (groups over inputs), False for convolutions."""
    return hasattr(module, "in_features")
