"""The local reparameterisation trick as two autograd functions with their gradients written out.

Training a group-sparse layer samples its pre-activation b = m + √v·ε from the Gaussian that the
weights' posterior induces (Kingma, Salimans & Welling 2015):

    Linear (gate on the inputs):   u = x·z,  m = u μᵀ + b_μ,  v = (u⊙u)(σ²)ᵀ + σ²_b,  b = m + √v ⊙ ε
    Conv2d (gate on the outputs):  m = conv(x, μ) + b_μ,  v = conv(x⊙x, σ²) + σ²_b,  b = z·(m + √v ⊙ ε)

with σ² = exp(logvar) and ε ~ N(0, 1) per output element. Written as a chain of tensor expressions,
autograd records about a dozen element-wise passes per layer and step (the exponential, the
products, the square root and its derivative, one gradient buffer per intermediate). The functions
here do the same arithmetic with the passes the gradient needs and no more. With g = ∂L/∂b:

    ∂L/∂m = g (Linear) or z·g (Conv)          ∂L/∂v = ∂L/∂m ⊙ ε / (2√v)
    ∂L/∂μ     = the affine map's weight gradient for ∂L/∂m
    ∂L/∂logσ² = σ² ⊙ (the weight gradient for ∂L/∂v, with input u⊙u or x⊙x)
    Linear: ∂L/∂u = g μ + 2u ⊙ ((∂L/∂v) σ²),  ∂L/∂x = z ⊙ ∂L/∂u,  ∂L/∂z = x ⊙ ∂L/∂u
    Conv:   ∂L/∂x = convᵀ(∂L/∂m, μ) + 2x ⊙ convᵀ(∂L/∂v, σ²),  ∂L/∂z = Σ_hw g ⊙ (m + √v ⊙ ε)
    ∂L/∂b_μ = Σ ∂L/∂m,  ∂L/∂logσ²_b = σ²_b ⊙ Σ ∂L/∂v

A gradient nobody asked for (the input of a first layer, a frozen parameter) is not computed:
the plain layer's "first layer skips the input gradient" holds here too, except where the input
gradient is needed for z (a Linear layer's gates sit on its inputs).

The noise ε is an argument, not drawn inside, so that a test can compare both functions with the
plain autograd expressions on the same ε (`tests/test_lrt.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: added to the pre-activation variance before the square root (keeps ∂√v finite at v = 0)
TINY = 1e-16


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


class _LinearLRT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None,
                b_logvar: Tensor | None, eps: Tensor | None) -> Tensor:  # type: ignore[override]
        u = x * z
        var_w = logvar.exp()
        b_var = None if b_logvar is None else b_logvar.exp()
        u2 = u * u
        std = F.linear(u2, var_w, b_var).add_(TINY).sqrt_()
        if eps is None:
            eps = torch.randn_like(std)
        out = F.linear(u, mu, b_mu).addcmul_(std, eps)
        ctx.save_for_backward(x, z, u, u2, mu, var_w, b_var, std, eps)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, z, u, u2, mu, var_w, b_var, std, eps = ctx.saved_tensors
        nx, nz, nmu, nlv, nbm, nbl, _ = ctx.needs_input_grad
        g_var = (0.5 * g) * eps
        g_var.div_(std)
        gx = gz = gmu = glv = gbm = gbl = None
        if nmu:
            gmu = g.t().mm(u)
        if nlv:
            glv = g_var.t().mm(u2).mul_(var_w)
        if nx or nz:
            gu = torch.addcmul(g.mm(mu), u, g_var.mm(var_w), value=2.0)
            gx = gu * z if nx else None
            gz = gu.mul_(x) if nz else None
        if nbm:
            gbm = g.sum(0)
        if nbl:
            gbl = g_var.sum(0).mul_(b_var)
        return gx, gz, gmu, glv, gbm, gbl, None


def linear_lrt(x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None,
               eps: Tensor | None = None) -> Tensor:
    """One local-reparameterisation sample of a gated linear layer: x (n, in), z (n, in), ε (n, out).

    ε = None draws it here (standard normal, from torch's generator).
    """
    return _LinearLRT.apply(x, z, mu, logvar, b_mu, b_logvar, eps)


def linear_lrt_reference(x, z, mu, logvar, b_mu, b_logvar, eps) -> Tensor:
    """`linear_lrt` as plain autograd expressions (the specification the fused function is tested against)."""
    u = x * z
    mean = F.linear(u, mu, b_mu)
    var = F.linear(u * u, logvar.exp(), None if b_logvar is None else b_logvar.exp())
    return mean + torch.sqrt(var + TINY) * eps


class _Conv2dLRT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None,
                b_logvar: Tensor | None, eps: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:  # type: ignore[override]
        var_w = logvar.exp()
        b_var = None if b_logvar is None else b_logvar.exp()
        x2 = x * x
        std = F.conv2d(x2, var_w, b_var, stride, padding, dilation, groups).add_(TINY).sqrt_()
        if eps is None:
            eps = torch.randn_like(std)
        pre = F.conv2d(x, mu, b_mu, stride, padding, dilation, groups).addcmul_(std, eps)
        zz = z.view(z.shape[0], -1, 1, 1)
        out = pre * zz
        ctx.conf = (_pair(stride), _pair(padding), _pair(dilation), int(groups), b_mu is not None, b_logvar is not None)
        ctx.save_for_backward(x, x2, zz, mu, var_w, b_var, std, eps, pre)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, x2, zz, mu, var_w, b_var, std, eps, pre = ctx.saved_tensors
        stride, padding, dilation, groups, has_bm, has_bl = ctx.conf
        nx, nz, nmu, nlv, nbm, nbl = ctx.needs_input_grad[:6]
        gz = (g * pre).sum((2, 3)) if nz else None
        g_mean = g * zz
        g_var = (0.5 * g_mean) * eps
        g_var.div_(std)
        conv_bw = torch.ops.aten.convolution_backward
        gx_m, gmu, gbm = conv_bw(g_mean, x, mu, [mu.shape[0]] if has_bm else None, stride, padding, dilation,
                                 False, [0, 0], groups, [nx, nmu, nbm and has_bm])
        gx_v, glv, gbl = conv_bw(g_var, x2, var_w, [mu.shape[0]] if has_bl else None, stride, padding, dilation,
                                 False, [0, 0], groups, [nx, nlv, nbl and has_bl])
        gx = gx_m.addcmul_(x, gx_v, value=2.0) if nx else None
        if glv is not None:
            glv = glv.mul_(var_w)
        if gbl is not None:
            gbl = gbl.mul_(b_var)
        return gx, gz, gmu, glv, gbm, gbl, None, None, None, None, None


def conv2d_lrt(x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None,
               eps: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """One local-reparameterisation sample of a gated convolution: z (n, out_channels), ε the output's shape
    (None: drawn here).

    `padding` must be numeric (an int or a pair); the layers take the autograd path for "same"/"valid".
    """
    return _Conv2dLRT.apply(x, z, mu, logvar, b_mu, b_logvar, eps, stride, padding, dilation, groups)


def conv2d_lrt_reference(x, z, mu, logvar, b_mu, b_logvar, eps, stride, padding, dilation, groups) -> Tensor:
    """`conv2d_lrt` as plain autograd expressions."""
    mean = F.conv2d(x, mu, b_mu, stride, padding, dilation, groups)
    var = F.conv2d(x * x, logvar.exp(), None if b_logvar is None else b_logvar.exp(), stride, padding, dilation, groups)
    return z.view(z.shape[0], -1, 1, 1) * (mean + torch.sqrt(var + TINY) * eps)
