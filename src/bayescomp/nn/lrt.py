"""The local reparameterisation trick as autograd functions with their gradients written out.

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

With one z row for the whole batch (`zdraw.draw_z`) and no input gradient (a first layer), ∂L/∂u is not formed
at all: ∂L/∂z comes from the weight-gradient products taken on x instead of u (`_shared_gate_backward`), which
spares a first Linear layer the two input-sized products that plain training never pays either.

A gradient nobody asked for (the input of a first layer, a frozen parameter) is not computed:
the plain layer's "first layer skips the input gradient" holds here too, except where the input
gradient is needed for z (a Linear layer's gates sit on its inputs).

The noise ε is an argument, not drawn inside, so that a test can compare both functions with the
plain autograd expressions on the same ε (`tests/test_lrt.py`).

`gated_linear_lrt` is a Linear layer's whole training forward in one node: z drawn from the layer's
scale parameters, the sample, and the layer's KL, each gradient written out. On LeNet-300-100 a
training step's cost beyond its matrix products is mostly operations on small tensors, each paying
its dispatch: this path takes a GNJ step from 309 to 261 operations (profiler, top level) and ~0.3 ms
off ~7 ms (interleaved with the previous code in one process, thread time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .scalars import const, const_vector

#: floor of the pre-activation variance before the square root (keeps 1/√v finite at v = 0)
TINY = 1e-16


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _params_kl(mu: Tensor, logvar: Tensor, var_w: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None,
               b_var: Tensor | None) -> Tensor:
    """The KL of the weights and (if any) the bias from N(0, 1), ½Σ(σ² − log σ² + μ² − 1), from the σ² the forward
    already has: what `with_kl=True` returns.

    The sums are stacked and weighted by (½, −½, ½) in one dot product: three operations where the term-by-term
    arithmetic takes seven per parameter pair (each a dispatch on a 0-dim tensor; measured on LeNet-300-100).
    """
    flat = mu.reshape(-1)
    parts = [var_w.sum(), logvar.sum(), torch.dot(flat, flat)]
    count = mu.numel()
    if b_mu is not None and b_logvar is not None and b_var is not None:
        parts += [b_var.sum(), b_logvar.sum(), torch.dot(b_mu, b_mu)]
        count += b_mu.numel()
    weights = const_vector((0.5, -0.5, 0.5) * (len(parts) // 3), mu)
    return torch.dot(torch.stack(parts), weights).sub_(const(0.5 * count, mu))


def _finish_param_grads(gmu: Tensor | None, gvar: Tensor | None, mu: Tensor, var_w: Tensor,
                        g_kl: Tensor | None, pre_scale: float = 1.0) -> tuple[Tensor | None, Tensor | None]:
    """Finish the gradients of a (μ, log σ²) pair — the weights or the bias — in place.

    `gvar` holds `pre_scale`·∂L/∂σ² (the convolution passes 2·∂L/∂v down, which spares a pass over its output).
    ∂/∂log σ² = σ²·∂L/∂σ², and when the pair's KL was an output too, + g_kl·μ and + ½g_kl(σ² − 1):
    written σ²·(∂L/∂σ² + ½g_kl) − ½g_kl, one add and one addcmul (two passes over the weights where the
    term-by-term form takes five; fc1 of LeNet-300-100 has 235,200).
    """
    if gvar is not None:
        if g_kl is None:
            gvar = torch.addcmul(const(0.0, gvar), gvar, var_w, value=1.0 / pre_scale, out=gvar)
        else:
            gvar.add_(g_kl * const(0.5 * pre_scale, g_kl))
            gvar = torch.addcmul(g_kl * const(-0.5, g_kl), gvar, var_w, value=1.0 / pre_scale, out=gvar)
    if gmu is not None and g_kl is not None:
        gmu.addcmul_(mu, g_kl)
    return gmu, gvar


def _linear_forward(x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None,
                    b_logvar: Tensor | None, eps: Tensor | None) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """The gated linear sample and what its gradient needs: (x, z, u, u2, μ, σ², b_μ, σ²_b, r).

    r = ½ε/√v is kept instead of ε and √v, so that the backward's ∂L/∂v = g·ε/(2√v) is one product g·r (three
    operations from ε and √v).
    """
    u = x * z
    var_w = logvar.exp()
    b_var = None if b_logvar is None else b_logvar.exp()
    u2 = u * u
    var = F.linear(u2, var_w, b_var).clamp_min_(TINY)
    if eps is None:
        eps = torch.randn_like(var)
    inv_std = var.rsqrt_()  # (v is not needed again)
    r = torch.addcmul(const(0.0, inv_std), eps, inv_std, value=0.5)  # ½ε/√v
    out = F.linear(u, mu, b_mu).addcdiv_(eps, inv_std)  # m + √v·ε
    return out, (x, z, u, u2, mu, var_w, b_mu, b_var, r)


def _shared_gate_backward(x: Tensor, z: Tensor, mu: Tensor, var_w: Tensor, g: Tensor, g_var: Tensor, nmu: bool,
                          nlv: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(∂/∂z, ∂L/∂μ, ∂L/∂σ²) where one z row gates a whole batch and x needs no gradient (a first layer).

    With A = gᵀx and B = (∂L/∂v)ᵀ(x⊙x), both (out, in):
        ∂L/∂μ = A ⊙ z,   ∂L/∂σ² = B ⊙ z²,   ∂L/∂z_j = Σ_o μ_oj A_oj + 2 z_j Σ_o σ²_oj B_oj
    (expand u = x ⊙ z in ∂L/∂z_j = Σ_k x_kj ∂L/∂u_kj). The same two weight-sized products the parameters need
    anyway, and passes over the weights, replace the two (batch × out × in) products of ∂L/∂u: on LeNet-300-100's
    fc1 those are 2 × 30 million multiply-adds a step, the passes about 1.2 million operations.
    """
    a = g.t().mm(x)
    b = g_var.t().mm(x * x)
    gz = torch.linalg.vecdot(mu, a, dim=0).addcmul_(torch.linalg.vecdot(var_w, b, dim=0), z[0], value=2.0)
    return gz.unsqueeze(0), a.mul_(z) if nmu else None, b.mul_(z * z) if nlv else None


def _linear_backward(saved: tuple[Tensor | None, ...], g: Tensor | None, g_kl: Tensor | None,
                     needs: tuple[bool, ...], grad_u: bool = False) -> tuple[tuple[Tensor | None, ...], bool]:
    """(∂/∂x, ∂/∂z, ∂/∂μ, ∂/∂log σ², ∂/∂b_μ, ∂/∂log σ²_b) of `_linear_forward`, each only where `needs` says;
    with `g_kl`, the weights' and bias's KL gradient is added (see `_finish_param_grads`). `grad_u=True` gives
    ∂/∂u in place of ∂/∂z (= x ⊙ ∂/∂u), for a caller that needs another product of it, except where one z row
    gates the batch and x needs no gradient (`_shared_gate_backward`): there ∂/∂z, shape (1, in), comes back.
    The flag says which: True when the second entry is ∂/∂z."""
    x, z, u, u2, mu, var_w, b_mu, b_var, r = saved
    nx, nz, nmu, nlv, nbm, nbl = needs
    if g is None:  # only the KL output is used
        g = torch.zeros_like(r)
    g_var = g * r  # ∂L/∂v
    gx = gz = None
    shared = nz and not nx and z.shape[0] == 1 < x.shape[0]
    if shared:
        gz, gmu, glv = _shared_gate_backward(x, z, mu, var_w, g, g_var, nmu, nlv)
    else:
        gmu = g.t().mm(u) if nmu else None
        glv = g_var.t().mm(u2) if nlv else None
    gmu, glv = _finish_param_grads(gmu, glv, mu, var_w, g_kl)
    if (nx or nz) and not shared:
        # ∂L/∂u = g μ + 2u ⊙ (∂L/∂v σ²), the sum made by the second product (β = 2): one pass fewer
        gu = g_var.mm(var_w).mul_(u).addmm_(g, mu, beta=2.0)
        gx = gu * z if nx else None
        gz = gu if grad_u else gu.mul_(x) if nz else None
    gbm = g.sum(0) if nbm else None
    gbl = g_var.sum(0) if nbl else None
    if b_var is not None:
        gbm, gbl = _finish_param_grads(gbm, gbl, b_mu, b_var, g_kl if b_mu is not None else None)
    return (gx, gz, gmu, glv, gbm, gbl), shared or not grad_u


class _LinearLRT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None,
                b_logvar: Tensor | None, eps: Tensor | None, with_kl: bool = False):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        out, saved = _linear_forward(x, z, mu, logvar, b_mu, b_logvar, eps)
        ctx.save_for_backward(*saved)
        if with_kl:
            return out, _params_kl(mu, logvar, saved[5], b_mu, b_logvar, saved[7])
        return out

    @staticmethod
    def backward(ctx, g: Tensor | None, g_kl: Tensor | None = None):  # type: ignore[override]
        return *_linear_backward(ctx.saved_tensors, g, g_kl, ctx.needs_input_grad[:6])[0], None, None


class _GatedLinearLRT(torch.autograd.Function):
    """A group-sparse Linear layer's whole training forward in one autograd node: z drawn from its parameters
    (the layer's `_z_draw`), the local reparameterisation sample, and (`with_kl`) the layer's whole KL — scales,
    weights and bias — with every gradient written out (`_z_grads`, `_kl_z_backward`, `_linear_backward`).

    What it spares, against z from `sample_z` and the KL from `kl()`: the autograd nodes of the sample and of the
    scale KL, and their bookkeeping, three times per step on LeNet-300-100, where a step's cost beyond its matrix
    products is mostly such operations. The arithmetic is the same functions' (the tests compare the two paths).
    """

    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None,
                layer, with_kl: bool, *z_params: Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        z, z_saved = layer._z_draw(z_params, 1 if layer._z_shared else x.shape[0])  # (1, in): `zdraw.draw_z`
        out, saved = _linear_forward(x, z, mu, logvar, b_mu, b_logvar, None)
        ctx.layer = layer
        ctx.counts = (len(z_saved), 0)
        if not with_kl:
            ctx.save_for_backward(*saved, *z_saved)
            return out
        kl_z, kl_saved = layer._kl_z_forward(z_params)
        ctx.counts = (len(z_saved), len(kl_saved))
        ctx.save_for_backward(*saved, *z_saved, *kl_saved)
        return out, _params_kl(mu, logvar, saved[5], b_mu, b_logvar, saved[7]).add_(kl_z)

    @staticmethod
    def backward(ctx, g: Tensor | None, g_kl: Tensor | None = None):  # type: ignore[override]
        tensors = ctx.saved_tensors
        n_z, n_kl = ctx.counts
        saved, z_saved, kl_saved = tensors[:9], tensors[9 : 9 + n_z], tensors[9 + n_z : 9 + n_z + n_kl]
        needs = ctx.needs_input_grad
        nz = any(needs[7:])
        (gx, gu, gmu, glv, gbm, gbl), is_gz = _linear_backward(saved, g, g_kl, (needs[0], nz, *needs[1:5]), grad_u=nz)
        n_params = len(needs) - 7
        grads: list[Tensor | None] = [None] * n_params
        if gu is not None:
            layer = ctx.layer
            grads = list(layer._z_grads(z_saved, gu) if is_gz else layer._z_grads_of_gated_input(z_saved, gu, saved[0],
                                                                                                    saved[2]))
        if g_kl is not None and n_kl:
            for i, k in enumerate(ctx.layer._kl_z_backward(kl_saved, g_kl)):
                grads[i] = k if grads[i] is None else grads[i].add_(k)
        return gx, gmu, glv, gbm, gbl, None, None, *grads


def linear_lrt(x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None,
               eps: Tensor | None = None, with_kl: bool = False):
    """One local-reparameterisation sample of a gated linear layer: x (n, in), z (n, in), ε (n, out).

    ε = None draws it here (standard normal, from torch's generator). `with_kl=True` also returns
    the KL of the weights and the bias from N(0, 1), ½Σ(σ² − log σ² + μ² − 1), whose gradient is then
    added inside the same backward pass (no second pass over the weights for σ², no separate
    gradient buffers to sum).
    """
    return _LinearLRT.apply(x, z, mu, logvar, b_mu, b_logvar, eps, with_kl)


def linear_lrt_reference(x, z, mu, logvar, b_mu, b_logvar, eps) -> Tensor:
    """`linear_lrt` as plain autograd expressions (the specification the fused function is tested against)."""
    u = x * z
    mean = F.linear(u, mu, b_mu)
    var = F.linear(u * u, logvar.exp(), None if b_logvar is None else b_logvar.exp())
    return mean + torch.sqrt(var.clamp_min(TINY)) * eps


def gated_linear_lrt(x: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None, layer,
                     with_kl: bool = False):
    """`linear_lrt` with z drawn inside from `layer`'s scale parameters (its `_z_params`, `_z_draw`, `_z_grads`),
    x of shape (n, in); `with_kl=True` also returns the layer's whole KL (`_kl_z_forward`, `_kl_z_backward` and the
    weights' and bias's). The same sample as `linear_lrt(x, layer.sample_z(n), ...)` on the same random numbers.
    """
    return _GatedLinearLRT.apply(x, mu, logvar, b_mu, b_logvar, layer, with_kl, *layer._z_params())


class _Conv2dLRT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None,
                b_logvar: Tensor | None, eps: Tensor | None, stride, padding, dilation, groups: int,
                with_kl: bool = False):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        var_w = logvar.exp()
        b_var = None if b_logvar is None else b_logvar.exp()
        x2 = x * x
        std = F.conv2d(x2, var_w, b_var, stride, padding, dilation, groups).clamp_min_(TINY).sqrt_()
        if eps is None:
            eps = torch.randn_like(std)
        pre = F.conv2d(x, mu, b_mu, stride, padding, dilation, groups).addcmul_(std, eps)
        zz = z.view(z.shape[0], -1, 1, 1)
        out = pre * zz
        ctx.conf = (_pair(stride), _pair(padding), _pair(dilation), int(groups), b_mu is not None, b_logvar is not None)
        ctx.save_for_backward(x, x2, zz, mu, var_w, b_mu, b_var, std, eps, pre)
        if with_kl:
            return out, _params_kl(mu, logvar, var_w, b_mu, b_logvar, b_var)
        return out

    @staticmethod
    def backward(ctx, g: Tensor | None, g_kl: Tensor | None = None):  # type: ignore[override]
        x, x2, zz, mu, var_w, b_mu, b_var, std, eps, pre = ctx.saved_tensors
        stride, padding, dilation, groups, has_bm, has_bl = ctx.conf
        nx, nz, nmu, nlv, nbm, nbl = ctx.needs_input_grad[:6]
        if g is None:
            g = torch.zeros_like(pre)
        gz = (g * pre).sum((2, 3)) if nz else None
        g_mean = g * zz
        g_var2 = torch.mul(g_mean, eps).div_(std)  # 2·∂L/∂v: the ½ is applied to the (smaller) results
        conv_bw = torch.ops.aten.convolution_backward
        gx_m, gmu, gbm = conv_bw(g_mean, x, mu, [mu.shape[0]] if has_bm else None, stride, padding, dilation,
                                 False, [0, 0], groups, [nx, nmu, nbm and has_bm])
        gx_v, glv, gbl = conv_bw(g_var2, x2, var_w, [mu.shape[0]] if has_bl else None, stride, padding, dilation,
                                 False, [0, 0], groups, [nx, nlv, nbl and has_bl])
        gx = gx_m.addcmul_(x, gx_v) if nx else None  # + 2x·(½·gx_v)
        gmu, glv = _finish_param_grads(gmu, glv, mu, var_w, g_kl, pre_scale=2.0)
        if b_var is not None:
            gbm, gbl = _finish_param_grads(gbm, gbl, b_mu, b_var, g_kl if b_mu is not None else None,
                                            pre_scale=2.0)
        return gx, gz, gmu, glv, gbm, gbl, None, None, None, None, None, None


def conv2d_lrt(x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, b_mu: Tensor | None, b_logvar: Tensor | None,
               eps: Tensor | None, stride, padding, dilation, groups: int, with_kl: bool = False):
    """One local-reparameterisation sample of a gated convolution: z (n, out_channels), ε the output's shape
    (None: drawn here).

    `padding` must be numeric (an int or a pair); the layers take the autograd path for "same"/"valid".
    """
    return _Conv2dLRT.apply(x, z, mu, logvar, b_mu, b_logvar, eps, stride, padding, dilation, groups, with_kl)


def conv2d_lrt_reference(x, z, mu, logvar, b_mu, b_logvar, eps, stride, padding, dilation, groups) -> Tensor:
    """`conv2d_lrt` as plain autograd expressions (any padding, "same" included; ε = None: drawn here)."""
    mean = F.conv2d(x, mu, b_mu, stride, padding, dilation, groups)
    if eps is None:
        eps = torch.randn_like(mean)
    var = F.conv2d(x * x, logvar.exp(), None if b_logvar is None else b_logvar.exp(), stride, padding, dilation, groups)
    return z.view(z.shape[0], -1, 1, 1) * (mean + torch.sqrt(var.clamp_min(TINY)) * eps)
