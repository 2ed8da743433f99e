"""Closed-form KL divergences used by the group-sparse layers.

Every function returns KL(q || p) summed over its arguments: a non-negative scalar tensor
(up to the additive constant of an improper prior, which is fixed so that the KL tends to 0
where the posterior carries no information).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scalars import const

# Molchanov et al. (2017), Eq. 14: a fit of -KL(q(w|θ,α) || log-uniform) as a function of log α.
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


class _GaussianKL(torch.autograd.Function):
    """½ Σ(−log σ² + σ² + μ² − 1) with its gradient written out: a few passes over the weights
    instead of the dozen that autograd records for the expression (it runs every training step)."""

    @staticmethod
    def forward(ctx, mu: Tensor, logvar: Tensor) -> Tensor:  # type: ignore[override]
        var = logvar.exp()
        ctx.save_for_backward(mu, var)
        flat = mu.reshape(-1)
        total = torch.sub(var.sum(), logvar.sum()).add_(torch.dot(flat, flat)).sub_(const(mu.numel(), mu))
        return total.mul_(const(0.5, mu))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mu, var = ctx.saved_tensors
        half = grad * const(0.5, grad)
        return mu * grad, (var * half).sub_(half)


def kl_gaussian_std_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL( N(mu, exp(logvar)) || N(0, 1) ), summed over all elements.

    KL = ½ Σ (−log σ² + σ² + μ² − 1). This is the form every layer uses; the official code's
    convolution layer had it wrong for a year (log-variance read as log-std).
    Gradients: ∂/∂μ = μ, ∂/∂log σ² = ½(σ² − 1).
    """
    return _GaussianKL.apply(mu, logvar)


class _LogUniformKL(torch.autograd.Function):
    """Σ_i [k1 − k1·σ(k2 + k3·a_i) + ½·softplus(−a_i)] with its gradient
    −k1·k3·σ(t)(1 − σ(t)) − ½·σ(−a) (t = k2 + k3·a; softplus′ = σ): two passes instead of a dozen."""

    @staticmethod
    def forward(ctx, log_alpha: Tensor) -> Tensor:  # type: ignore[override]
        s = torch.sigmoid(_K2 + _K3 * log_alpha)
        ctx.save_for_backward(log_alpha, s)
        return (0.5 * torch.nn.functional.softplus(-log_alpha) - _K1 * s).sum() + _K1 * log_alpha.numel()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        log_alpha, s = ctx.saved_tensors
        return grad * ((-_K1 * _K3) * s * (1.0 - s) - 0.5 * torch.sigmoid(-log_alpha))


def kl_log_uniform(log_alpha: Tensor) -> Tensor:
    """KL( q(z) || p(z) ∝ 1/|z| ) for the group normal-Jeffreys scale, summed over groups.

    q(z_i) = N(μ_i, α_i μ_i²). The KL depends on α only; Molchanov et al.'s approximation gives
    −KL ≈ k1·σ(k2 + k3·log α) − ½·softplus(−log α) − k1. The paper's Eq. 9 prints this negative
    quantity as if it were the KL; we return its negation, which is ≥ 0, decreasing in log α and
    → 0 as log α → ∞ (so minimising it drives groups toward pruning).
    """
    return _LogUniformKL.apply(log_alpha)


def group_nj_kl_forward(z_mu: Tensor, z_logvar: Tensor, eps: float) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`kl_log_uniform(z_logvar − log(z_mu² + ε))` and what its gradient needs (`group_nj_kl_backward`).

    Σ_i ½·softplus(−a_i) − k1·σ(t_i) + k1 with t = k2 + k3·a, written −½·Σ(log σ(a) + 2k1·σ(t)) + k1·n
    (softplus(−a) = −log σ(a)): one reduction. A function, not an autograd node, so that a layer's fused
    training step (`lrt.gated_linear_lrt`) can run it inside its own node.
    """
    m2 = torch.addcmul(const(eps, z_mu), z_mu, z_mu)
    la = z_logvar - m2.log()
    s = torch.sigmoid(torch.add(const(_K2, la), la, alpha=_K3))
    value = torch.add(torch.nn.functional.logsigmoid(la), s, alpha=2.0 * _K1).sum().mul_(const(-0.5, la))
    return value.add_(const(_K1 * la.numel(), la)), (z_mu, m2, la, s)


def group_nj_kl_backward(saved: tuple[Tensor, ...], grad: Tensor) -> tuple[Tensor, Tensor]:
    """(∂/∂z_mu, ∂/∂z_logvar) of `group_nj_kl_forward`'s value times `grad`.

    With a = log α and f′(a) = −k1·k3·σ(t)(1 − σ(t)) − ½·σ(−a), the gradient of `_LogUniformKL`:
    ∂/∂z_logvar = f′(a), ∂/∂z_mu = −f′(a)·2z_mu/(z_mu² + ε).
    """
    z_mu, m2, la, s = saved
    d = torch.addcmul(s, s, s, value=-1.0).mul_(const(-_K1 * _K3, s)).sub_(torch.sigmoid(la.neg()), alpha=0.5).mul_(grad)
    return (z_mu * d).div_(m2).mul_(const(-2.0, d)), d


class _GroupNJKL(torch.autograd.Function):
    """`group_nj_kl_forward` as an autograd node, its gradient written out (`group_nj_kl_backward`).

    The scale KL runs every step on a few hundred groups, where each tensor operation costs its dispatch,
    not its arithmetic; this is about a third of the operations autograd records for the expression.
    """

    @staticmethod
    def forward(ctx, z_mu: Tensor, z_logvar: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        value, saved = group_nj_kl_forward(z_mu, z_logvar, eps)
        ctx.save_for_backward(*saved)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return *group_nj_kl_backward(ctx.saved_tensors, grad), None


def kl_group_nj(z_mu: Tensor, z_logvar: Tensor, eps: float) -> Tensor:
    """KL of the normal-Jeffreys scales from their parameters: `kl_log_uniform` of log α = z_logvar − log(z_mu² + eps)."""
    return _GroupNJKL.apply(z_mu, z_logvar, eps)


def kl_log_uniform_reference(log_alpha: Tensor) -> Tensor:
    """`kl_log_uniform` as the plain expression, for tests of the written-out gradient."""
    neg_kl = _K1 * torch.sigmoid(_K2 + _K3 * log_alpha) - 0.5 * torch.nn.functional.softplus(-log_alpha) - _K1
    return -torch.sum(neg_kl)
