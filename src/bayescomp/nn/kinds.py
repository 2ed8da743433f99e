"""The two layer kinds of a group-sparse layer: where the gate sits and which affine map it multiplies.

`LinearKind` gates the inputs (one group per input unit, or per block of `group_size`), `ConvKind` the output
channels. The priors (`gnj.py`, `ghs.py`) combine one of these with their scale posterior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import GroupSparseLayer, zero_padded
from .lrt import conv2d_lrt, conv2d_lrt_reference, gated_linear_lrt, linear_lrt


class LinearKind(GroupSparseLayer):
    """Fully connected: one group per block of `group_size` consecutive inputs (default 1); the gate multiplies them."""

    group_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, max_var: float | None = None,
                 group_size: int = 1) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be ≥ 1, got {in_features}, {out_features}")
        if not isinstance(group_size, int) or group_size < 1 or in_features % group_size:
            raise ValueError(f"group_size must be a positive int dividing in_features ({in_features}), got {group_size!r}")
        super().__init__((out_features, in_features), in_features // group_size, bias, max_var)
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        with torch.no_grad():
            self.weight_mu.normal_(0.0, 1.0 / math.sqrt(in_features))
        self._init_variational()

    def _per_unit(self, z: Tensor) -> Tensor:
        return z if self.group_size == 1 else z.repeat_interleave(self.group_size, dim=-1)

    def _expand_z(self, x: Tensor, z: Tensor) -> Tensor:
        z = self._per_unit(z)
        if z.dim() == 2 and x.dim() > 2:  # (n, groups) -> (n, 1, ..., 1, groups)
            z = z.view(z.shape[0], *([1] * (x.dim() - 2)), z.shape[1])
        return z

    def _stochastic(self, x: Tensor, z: Tensor) -> Tensor:
        mu, logvar, z, with_kl = self.weight_mu, self.weight_logvar, self._per_unit(z), self._fuse_kl
        kept = self._kept()
        if kept is not None:  # a masked input adds nothing: the products run on the kept ones (fine-tuning after a cut)
            if self.group_size > 1:
                kept = (kept[:, None] * self.group_size + torch.arange(self.group_size, device=kept.device)).flatten()
            x, z, mu, logvar = (t.index_select(-1, kept) for t in (x, z, mu, logvar))
            with_kl = False  # (the KL covers every weight: `kl()` computes it)
        if x.dim() > 2:  # (n, ..., in): one z per example, shared along the middle axes; flatten them into the batch
            z = z.view(z.shape[0], *([1] * (x.dim() - 2)), z.shape[1]).expand_as(x).reshape(-1, x.shape[-1])
        out = linear_lrt(x.reshape(-1, x.shape[-1]), z, mu, logvar, self.bias_mu, self.bias_logvar, with_kl=with_kl)
        return (self._keep_kl(out) if with_kl else out).view(*x.shape[:-1], self.out_features)

    def _fused_forward_applies(self, x: Tensor) -> bool:
        # a batch of vectors, every group on (a masked or a sequence input takes `_stochastic`)
        return x.dim() == 2 and self.group_size == 1 and self._mask_is_full()

    def _fused_stochastic(self, x: Tensor) -> Tensor:
        """z drawn, the sample taken and (under `fuse_weight_kl`) the whole layer's KL computed in one node."""
        result = gated_linear_lrt(x, self.weight_mu, self.weight_logvar, self.bias_mu, self.bias_logvar, self,
                                  with_kl=self._fuse_kl)
        return self._keep_kl(result, whole=True)

    def _deterministic(self, x: Tensor, z: Tensor) -> Tensor:
        return F.linear(x * self._expand_z(x, z), self.weight_mu, self.bias_mu)

    def posterior_bias(self) -> Tensor | None:
        return None if self.bias_mu is None else self.bias_mu.detach().clone()

    def extra_repr(self) -> str:
        origin = (f", group_size={self.group_size}" if self.group_size > 1 else "") + (
            f", input_origin={self._origin:g}" if self._origin else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_mu is not None}{origin}"


class ConvKind(GroupSparseLayer):
    """Convolution over `nd` spatial dimensions (2: Conv2d, 1: Conv1d): one group per output channel; the gate
    multiplies the output channel.

    The gate covers the bias too: the channel computes z·(conv(x, w̃) + b) in training, in
    evaluation and after compression (weights z·μ, bias z·b), so a pruned channel is exactly zero.
    (The official code scaled the bias in training but not after compression.)

    A 1-d convolution is a 2-d one with a kernel one pixel high on an input one pixel high: its training
    forward runs the 2-d local reparameterisation (`lrt.conv2d_lrt`, gradients written out) on views with
    that axis added, so both share one written-out backward pass.
    """

    group_dim = 0
    #: number of spatial dimensions (set by subclasses; 2 for Conv2d)
    nd: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        max_var: float | None = None,
    ) -> None:
        ks = _ntuple(kernel_size, self.nd, "kernel_size")
        if in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError("in_channels, out_channels and groups must be ≥ 1")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        super().__init__((out_channels, in_channels // groups, *ks), out_channels, bias, max_var)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ks
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        fan_in = (in_channels // groups) * math.prod(ks)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)
        self._init_variational()

    def _zero_padded(self) -> bool:
        return zero_padded(self)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = F.conv2d if self.nd == 2 else F.conv1d
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _as_2d(self) -> tuple:
        """(stride, padding, dilation) of the 2-d convolution that computes this one on inputs with an axis of
        size 1 added at dimension 2."""
        def lift(v, pad: int):
            return v if isinstance(v, str) else (pad, _ntuple(v, 1, "argument")[0])
        return lift(self.stride, 1), lift(self.padding, 0), lift(self.dilation, 1)

    def _stochastic(self, x: Tensor, z: Tensor) -> Tensor:
        params = (self.weight_mu, self.weight_logvar)
        stride, padding, dilation = self.stride, self.padding, self.dilation
        if self.nd == 1:
            x = x.unsqueeze(2)
            params = tuple(p.unsqueeze(2) for p in params)
            stride, padding, dilation = self._as_2d()
        args = (x, z, *params, self.bias_mu, self.bias_logvar)
        if isinstance(padding, str):  # "same"/"valid": the autograd expressions handle the arithmetic
            out = conv2d_lrt_reference(*args, None, stride, padding, dilation, self.groups)
        else:
            out = self._keep_kl(conv2d_lrt(*args, None, stride, padding, dilation, self.groups,
                                           with_kl=self._fuse_kl))
        return out.squeeze(2) if self.nd == 1 else out

    def _deterministic(self, x: Tensor, z: Tensor) -> Tensor:
        return self._conv(x, self.weight_mu, self.bias_mu) * z.view(1, -1, *([1] * self.nd))

    def posterior_bias(self) -> Tensor | None:
        return None if self.bias_mu is None else (self.bias_mu * self.z_mean()).detach().clone()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias_mu is not None}"
            + (f", input_origin={self._origin:g}" if self._origin else "")
        )


def _ntuple(v, n: int, what: str) -> tuple[int, ...]:
    """An int or a sequence of `n` ints as a tuple of `n` ints (a clear error otherwise)."""
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{what} must be an int or {n} ints, got {v!r}")
    return t
