"""The weights a decided layer computes with: gates applied, constant inputs and input origins folded.

Shared by the analysis (a depthwise layer's constant outputs), the surgery (the shrunk layer's
tensors) and the bits loop (the kept weights' variances), so each is written once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer
from .masks import LayerMask
from .rules import is_linear


@torch.no_grad()
def effective_params(module: nn.Module, lm: LayerMask) -> tuple[Tensor, Tensor]:
    """Full-size weight and bias the masked layer computes with at evaluation (gates applied)."""
    if isinstance(module, GroupSparseLayer):
        weight = module.posterior_mean().detach().clone()
        bias = module.posterior_bias()
        if lm.group_keep is not None:
            shape = [1] * weight.dim()
            shape[module.group_dim] = -1
            keep = module._per_unit(lm.group_keep.to(device=weight.device, dtype=weight.dtype))  # group_size > 1
            weight = weight * keep.view(shape)
            if bias is not None and module.group_dim == 0:
                bias = bias * keep
    else:
        weight = module.weight.detach().clone()
        bias = None if module.bias is None else module.bias.detach().clone()
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight, bias


def fold_origin(module: nn.Module, weight: Tensor, bias: Tensor) -> Tensor:
    """The bias of the plain layer for a layer that computes on x − c (its input origin c; `weight` as
    stored): bias − c·Σ_j W[o, j] per output o (summed over kernel taps too), so the plain layer takes x
    itself; `bias` unchanged where c = 0.

    Summed over every input, the removed ones included: a removed input's constant c_j then enters the
    layer as c_j − c, as it does in the masked model (`constant_inputs` adds the c_j part).
    """
    origin = getattr(module, "_origin", 0.0) if isinstance(module, GroupSparseLayer) else 0.0
    return bias if origin == 0.0 else bias - origin * weight.flatten(1).sum(1)


def constant_inputs(weight: Tensor, lm: LayerMask) -> tuple[Tensor, bool]:
    """Σ_j W[:, j]·c_j over the removed inputs j carrying a constant c_j ≠ 0 (a kernel for convs), and
    whether there is any."""
    const = lm.in_const.to(device=weight.device, dtype=weight.dtype)
    fold = torch.isfinite(const) & (const != 0) & ~lm.in_mask.to(weight.device)
    kernel = torch.einsum("oi...,i->o...", weight[:, fold], const[fold])
    return kernel, bool(fold.any())


def kept_weights(module: nn.Module, lm: LayerMask) -> Tensor:
    """Boolean mask over a layer's full weight of the entries the shrunk layer stores with gate on.

    A grouped convolution's output o reads only the inputs of its group (a depthwise one: input o).
    """
    w = module.posterior_mean() if isinstance(module, GroupSparseLayer) else module.weight
    device = w.device
    keep = lm.out_mask.to(device).view(-1, *([1] * (w.dim() - 1)))
    groups = getattr(module, "groups", 1)
    if groups == 1:
        keep = keep & lm.in_mask.to(device).view(1, -1, *([1] * (w.dim() - 2)))
    else:  # weight column j of output o is input channel (o // (out/groups))·(in/groups) + j
        per_in = w.shape[1]
        channel = (torch.arange(w.shape[0], device=device) // (w.shape[0] // groups))[:, None] * per_in
        channel = channel + torch.arange(per_in, device=device)[None, :]
        keep = keep & lm.in_mask.to(device)[channel].view(*channel.shape, *([1] * (w.dim() - 2)))
    if lm.group_keep is not None and not is_linear(module):
        keep = keep & lm.group_keep.to(device).view(-1, *([1] * (w.dim() - 1)))
    return keep.expand_as(w)
