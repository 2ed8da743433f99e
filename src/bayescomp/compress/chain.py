"""The network as a chain of leaf modules in execution order, and what each kind does to a mask.

Pruning and shrinking need to know which layer feeds which. For the networks of the paper (and any
`nn.Sequential`, nested or not) the execution order is the order of the Sequential's children.
"""

from __future__ import annotations

from torch import nn

from ..convert import UnsupportedLayerError
from ..nn import GroupSparseLayer

#: modules whose output channel c depends only on input channel c, and that map 0 to 0
ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Softsign,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
#: per-channel affine maps (they do not preserve zero: a dead channel becomes a constant)
CHANNEL_AFFINE = (nn.BatchNorm1d, nn.BatchNorm2d)
#: layers that mix channels and carry weights
WEIGHTED = (GroupSparseLayer, nn.Linear, nn.Conv2d)


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules of a (possibly nested) `nn.Sequential` in execution order, with their names.

    Raises `UnsupportedLayerError` naming the module when the model is not such a chain or holds a
    module whose effect on channels bayescomp does not know.
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(
            f"{type(model).__name__}: compress supports nn.Sequential chains of Linear/Conv2d/BatchNorm/"
            "activation/pooling/Flatten modules; this model is not an nn.Sequential (pass example_input=, a batch "
            "it accepts, to compress it through its torch.fx graph)"
        )
    out: list[tuple[str, nn.Module]] = []
    _walk(model, "", out)
    if not any(isinstance(m, GroupSparseLayer) for _, m in out):
        raise UnsupportedLayerError("the model has no group-sparse layer; call bayescomp.bayesianize first")
    return out


def _walk(seq: nn.Sequential, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    for child_name, child in seq.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            _walk(child, name + ".", out)
        elif isinstance(child, WEIGHTED + ZERO_PRESERVING + CHANNEL_AFFINE + (nn.Flatten,)):
            if isinstance(child, (GroupSparseLayer, nn.Conv2d)) and getattr(child, "groups", 1) != 1:
                raise UnsupportedLayerError(f"{name}: grouped convolution (groups={child.groups}) cannot be shrunk yet")
            if isinstance(child, nn.Flatten) and child.end_dim != -1:
                raise UnsupportedLayerError(f"{name}: Flatten must flatten to the last dimension (end_dim=-1)")
            out.append((name, child))
        else:
            raise UnsupportedLayerError(
                f"{name}: {type(child).__name__} is not supported in a compressed chain "
                "(supported: Linear, Conv2d, BatchNorm, element-wise activations, pooling, Dropout, Flatten)"
            )


def out_features(module: nn.Module) -> int:
    """Number of output features (Linear) or channels (Conv2d) of a weighted layer."""
    if isinstance(module, (nn.Linear,)) or hasattr(module, "out_features"):
        return module.out_features
    return module.out_channels


def in_features(module: nn.Module) -> int:
    """Number of input features (Linear) or channels (Conv2d) of a weighted layer."""
    if isinstance(module, (nn.Linear,)) or hasattr(module, "in_features"):
        return module.in_features
    return module.in_channels


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and its group-sparse twins."""
    return hasattr(module, "in_features")
