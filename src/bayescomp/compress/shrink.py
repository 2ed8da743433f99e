"""shrink(): the masks applied for real — a smaller plain network with pruned units removed.

The result is a flat `nn.Sequential` of plain `nn.Linear`, `nn.Conv2d`, `nn.BatchNorm*d`, the
original activation/pooling/flatten modules, `Select` where a layer reads only some of the
features its predecessor produces (e.g. the kept pixels of the input image), and `AppendOnes` where
the constants of removed channels feed a zero-padded convolution. No Bayesian parameter
is left: weights are the posterior means E[w] (masked, optionally rounded to the layer's bits),
biases the posterior-mean biases plus any constant inputs folded in (see `masks`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer
from .chain import CHANNEL_AFFINE, WEIGHTED, chain, is_linear
from .masks import LayerMask, PruneError
from .precision import round_to_bits


class Select(nn.Module):
    """Keep the features `index` along dimension 1 (a fixed gather; exports to ONNX as Gather)."""

    def __init__(self, index: Tensor | list[int], n_in: int | None = None) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())
        self.n_in = n_in

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.n_in}" if self.n_in is not None else f"{self.index.numel()}"


@torch.no_grad()
def effective_params(module: nn.Module, lm: LayerMask) -> tuple[Tensor, Tensor]:
    """Full-size weight and bias the masked layer computes with at evaluation (gates applied)."""
    if isinstance(module, GroupSparseLayer):
        weight = module.posterior_mean().detach().clone()
        bias = module.posterior_bias()
        if lm.group_keep is not None:
            shape = [1] * weight.dim()
            shape[module.group_dim] = -1
            weight = weight * lm.group_keep.to(weight.dtype).view(shape)
            if bias is not None and module.group_dim == 0:
                bias = bias * lm.group_keep.to(bias.dtype)
    else:
        weight = module.weight.detach().clone()
        bias = None if module.bias is None else module.bias.detach().clone()
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight, bias


class AppendOnes(nn.Module):
    """Append one channel of ones (dimension 1): carries the constants of removed channels exactly."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_ones(x.shape[0], 1, *x.shape[2:])], dim=1)


def _padded(module: nn.Module) -> bool:
    p = module.padding
    return p != "valid" and (p == "same" or any(v > 0 for v in torch.nn.modules.utils._pair(p)))


def _constant_inputs(weight: Tensor, lm: LayerMask) -> tuple[Tensor, Tensor]:
    """Σ_j W[:, j]·c_j over the removed inputs j carrying a constant c_j ≠ 0 (a kernel for convs)."""
    const = lm.in_const.to(weight.dtype).to(weight.device)
    fold = torch.isfinite(const) & (const != 0) & ~lm.in_mask.to(weight.device)
    kernel = torch.einsum("oi...,i->o...", weight[:, fold], const[fold])
    return kernel, fold.any()


@torch.no_grad()
def shrink(model: nn.Module, masks: Mapping[str, LayerMask], bits: Mapping[str, int] | None = None) -> nn.Sequential:
    """A plain `nn.Sequential` computing what the masked model computes at evaluation.

    `bits` (layer name → mantissa bits) rounds each named layer's kept weights to 2^−bits.
    Raises `PruneError` if the masks do not fit the model.
    """
    out: list[tuple[str, nn.Module]] = []
    avail: Tensor | None = None  # which of the current features the shrunk network still carries
    pending_flatten = False
    for name, m in chain(model):
        safe = name.replace(".", "_")
        if isinstance(m, WEIGHTED):
            if name not in masks:
                raise PruneError(f"no mask for layer {name}")
            lm = masks[name]
            weight, bias = effective_params(m, lm)
            if bits is not None and name in bits:
                weight = round_to_bits(weight, bits[name])
            kernel, has_const = _constant_inputs(weight, lm)
            ones_channel = bool(has_const) and not is_linear(m) and _padded(m)
            if bool(has_const) and not ones_channel:
                bias = bias + (kernel if kernel.dim() == 1 else kernel.flatten(1).sum(1))
            n_in = lm.in_mask.numel()
            if avail is None:
                avail = torch.ones(n_in, dtype=torch.bool)
            elif pending_flatten:
                if n_in % avail.numel():
                    raise PruneError(f"{name}: cannot map {avail.numel()} flattened channels onto {n_in} inputs")
                avail = avail.repeat_interleave(n_in // avail.numel())
            pending_flatten = False
            if avail.numel() != n_in:
                raise PruneError(f"{name}: mask over {n_in} inputs but {avail.numel()} features arrive")
            if bool((lm.in_mask & ~avail).any()):
                raise PruneError(f"{name}: keeps inputs that an earlier layer removed")
            if not torch.equal(lm.in_mask, avail):
                index = torch.nonzero(lm.in_mask[avail]).flatten()
                out.append((f"{safe}_select", Select(index, int(avail.sum()))))
            w = weight[lm.out_mask][:, lm.in_mask]
            b = bias[lm.out_mask]
            if ones_channel:
                out.append((f"{safe}_ones", AppendOnes()))
                extra = kernel[lm.out_mask].unsqueeze(1)
                if bits is not None and name in bits:  # a stored weight like any other: on the layer's grid
                    extra = round_to_bits(extra, bits[name])
                w = torch.cat([w, extra], dim=1)
            if is_linear(m):
                new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=True)
            else:
                new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1, bias=True)
            new = new.to(device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            new.bias.copy_(b)
            out.append((safe, new))
            avail = lm.out_mask.clone()
        elif isinstance(m, CHANNEL_AFFINE):
            out.append((safe, _slice_batch_norm(m, avail)))
        elif isinstance(m, nn.Flatten):
            pending_flatten = avail is not None
            out.append((safe, copy.deepcopy(m)))
        else:
            out.append((safe, copy.deepcopy(m)))
    shrunk = nn.Sequential()
    for name, mod in out:
        shrunk.add_module(name, mod)
    return shrunk.eval()


def _slice_batch_norm(bn: nn.Module, keep: Tensor | None) -> nn.Module:
    new = copy.deepcopy(bn)
    if keep is None or bool(keep.all()):
        return new
    if keep.numel() != bn.num_features:
        raise PruneError(f"batch norm with {bn.num_features} channels follows a layer with {keep.numel()} outputs")
    new.num_features = int(keep.sum())
    for attr in ("weight", "bias"):
        p = getattr(bn, attr)
        if p is not None:
            setattr(new, attr, nn.Parameter(p.detach()[keep].clone()))
    for attr in ("running_mean", "running_var"):
        buf = getattr(bn, attr)
        if buf is not None:
            setattr(new, attr, buf[keep].clone())
    return new
