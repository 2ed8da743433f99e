"""Closed-form KL divergences for the group horseshoe (BC-GHS) scale variables.

Every scale variable of the non-centred horseshoe has a log-normal variational posterior
q(x) = LN(μ, σ²), i.e. log x ~ N(μ, σ²), and a Gamma(½, ·) or InvGamma(½, 1) prior. The KLs are
exact (constants included) and summed over all elements of their arguments.

Two log-normal moments and one expectation are used throughout. With y = log x ~ N(μ, σ²):

* E_q[log x] = μ
* E_q[x]     = e^{μ + σ²/2}         (the normal moment-generating function at t = 1)
* E_q[1/x]   = e^{−μ + σ²/2}        (the same at t = −1)
* E_q[log q(x)]: the log-normal density is q(x) = (x √(2πσ²))^{−1} exp(−(log x − μ)²/(2σ²)), so
  log q(x) = −log x − ½ log(2π) − ½ log σ² − (log x − μ)²/(2σ²), and since E[(y − μ)²] = σ²,
  E_q[log q(x)] = −μ − ½ log(2π) − ½ log σ² − ½.

Also lgamma(½) = log Γ(½) = ½ log π, which is what turns −½ log(2π) + ½ log π into −½ log 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .scalars import const as _c

_HALF_LOG_2 = 0.5 * math.log(2.0)


class _LogNormalKL(torch.autograd.Function):
    """Σ [e^{sign·μ + σ²/2 − c} + ½(−sign·μ − log σ² − 1 − log 2)] + const, with its gradient.

    Both KLs below have this shape (sign = +1, c = log b: Gamma(½, b); sign = −1, c = 0: InvGamma(½, 1)),
    with E = e^{sign·μ + σ²/2 − c}:  ∂/∂μ = sign·(E − ½),  ∂/∂log σ² = ½·σ²·E − ½.
    Written out because every training step evaluates four of them per layer, on tensors of a few
    hundred elements where autograd's bookkeeping, not arithmetic, is the cost.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, logvar: Tensor, sign: float, c: float, const: float) -> Tensor:  # type: ignore[override]
        var = logvar.exp()
        arg = torch.add(var * _c(0.5, var), mu, alpha=sign)
        if c:
            arg = arg.sub_(_c(c, arg))
        e = torch.exp(arg)
        ctx.sign = sign
        ctx.save_for_backward(var, e)
        value = e.sum().sub_(torch.add(logvar.sum(), mu.sum(), alpha=sign), alpha=0.5)
        return value.add_(_c((const - 0.5 - _HALF_LOG_2) * mu.numel(), value))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        var, e = ctx.saved_tensors
        half = _c(0.5, e)
        g_mu = (torch.sub(e, half) if ctx.sign > 0 else torch.sub(half, e)).mul_(grad)
        g_lv = torch.mul(e, var).sub_(_c(1.0, e)).mul_(grad * half)
        return g_mu, g_lv, None, None, None


def lognormal_kls_forward(mu: Tensor, logvar: Tensor, sign: Tensor, c: Tensor,
                          const: float) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Several `_LogNormalKL` terms at once, element i with its own sign_i and c_i, and what the gradient needs:

        Σ_i [e^{sign_i·μ_i + σ_i²/2 − c_i} − ½(sign_i·μ_i + log σ_i²) − ½ − ½ log 2] + const

    (`const` the sum of the priors' constants, as in `lognormal_kls`).

    A function, not an autograd node, so that a layer's fused training step can run it inside its own node.
    """
    var = logvar.exp()
    e = torch.exp(torch.addcmul(torch.sub(var * _c(0.5, var), c), sign, mu))
    value = e.sum().sub_(torch.add(logvar.sum(), torch.dot(sign, mu)), alpha=0.5)
    return value.add_(_c(const - (0.5 + _HALF_LOG_2) * mu.numel(), value)), (var, e, sign)


def lognormal_kls_backward(saved: tuple[Tensor, ...], grad: Tensor) -> tuple[Tensor, Tensor]:
    """∂/∂μ_i = sign_i·(E_i − ½) and ∂/∂log σ_i² = ½·(σ_i²·E_i − 1) (E_i the exponential), times `grad`."""
    var, e, sign = saved
    half = _c(0.5, e)
    g_mu = torch.sub(e, half).mul_(sign).mul_(grad)
    g_lv = torch.mul(e, var).sub_(_c(1.0, e)).mul_(grad * half)
    return g_mu, g_lv


class _LogNormalKLs(torch.autograd.Function):
    """`lognormal_kls_forward` as an autograd node. A horseshoe layer's four scale KLs are one call of this on its
    concatenated scale parameters (`_GroupHS.kl_z`): a step spends its time on operations here, not arithmetic,
    and this is about a quarter of them.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, logvar: Tensor, sign: Tensor, c: Tensor, const: float) -> Tensor:  # type: ignore[override]
        value, saved = lognormal_kls_forward(mu, logvar, sign, c, const)
        ctx.save_for_backward(*saved)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return *lognormal_kls_backward(ctx.saved_tensors, grad), None, None, None


def lognormal_kls(mu: Tensor, logvar: Tensor, sign: Tensor, c: Tensor, const: float) -> Tensor:
    """Σ_i KL_i for log-normal posteriors LN(μ_i, σ_i²) against priors given per element by (sign_i, c_i, const_i):

    sign +1, c = log b, const = ½ log b: Gamma(½, scale b) (`kl_lognormal_gamma_half`);
    sign −1, c = 0, const = 0: InvGamma(½, 1) (`kl_lognormal_invgamma_half`);
    sign +1, c = log τ0, const = −log τ0: the paper-literal s_a term (`kl_global_sa_paper`).
    `const` is the sum of the elements' constants.
    """
    return _LogNormalKLs.apply(mu, logvar, sign, c, const)


def _log_positive(value: float | Tensor, name: str, like: Tensor) -> float | Tensor:
    """log(value) for a positive scale given as a Python number (exact, in double) or a tensor."""
    if isinstance(value, Tensor):
        return torch.log(value.to(dtype=like.dtype, device=like.device))
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return math.log(value)


def kl_lognormal_gamma_half(mu: Tensor, logvar: Tensor, scale: float | Tensor) -> Tensor:
    """KL( LN(mu, exp(logvar)) || Gamma(shape ½, scale b) ), summed over elements.

    Used for the global s_a (b = τ0²) and the local α̃_i (b = 1) of the horseshoe.

    Derivation. The prior density with scale b (rate 1/b) is
    p(x) = x^{−½} e^{−x/b} / (Γ(½) b^{½}), so
        log p(x) = −½ log x − x/b − ½ log π − ½ log b,
        E_q[log p] = −½ μ − E_q[x]/b − ½ log π − ½ log b.
    With E_q[log q] = −μ − ½ log(2π) − ½ log σ² − ½ (module docstring):
        KL = E_q[log q] − E_q[log p]
           = −μ − ½ log 2 − ½ log π − ½ log σ² − ½ + ½ μ + E_q[x]/b + ½ log π + ½ log b
           = e^{μ + σ²/2}/b + ½ log b − ½(μ + log σ² + 1 + log 2).
    For b = τ0² the negative KL is −log τ0 − τ0^{−2} e^{μ+σ²/2} + ½(μ + log σ² + 1 + log 2), the
    row of the method notes' table. It is minimised over μ (for fixed σ²) where E_q[x] = b/2.
    """
    return kl_lognormal_gamma_half_logscale(mu, logvar, _log_positive(scale, "scale", mu))


def kl_lognormal_gamma_half_logscale(mu: Tensor, logvar: Tensor, log_scale: float | Tensor) -> Tensor:
    """`kl_lognormal_gamma_half` with the scale given by its logarithm (log b = 2 log τ0 for s_a).

    E_q[x]/b is evaluated as exp(μ + σ²/2 − log b), so that b = τ0² never has to be formed: it
    underflows float32 for τ0 ≲ 1e−19 and float64 for τ0 ≲ 1e−154.
    """
    if isinstance(log_scale, Tensor):  # a tensor scale (possibly trained): the autograd expression
        return kl_lognormal_gamma_half_reference(mu, logvar, log_scale)
    return _LogNormalKL.apply(mu, logvar, 1.0, float(log_scale), 0.5 * float(log_scale))


def kl_lognormal_gamma_half_reference(mu: Tensor, logvar: Tensor, log_scale: float | Tensor) -> Tensor:
    """`kl_lognormal_gamma_half_logscale` as the plain expression (tests check the fused gradient on it)."""
    kl = torch.exp(mu + 0.5 * logvar.exp() - log_scale) + 0.5 * log_scale - 0.5 * (mu + logvar + 1.0) - _HALF_LOG_2
    return kl.sum()


def kl_lognormal_invgamma_half(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL( LN(mu, exp(logvar)) || InvGamma(shape ½, scale 1) ), summed over elements.

    Used for the global s_b and the local β̃_i of the horseshoe.

    Derivation. The prior density is p(x) = x^{−3/2} e^{−1/x} / Γ(½), so
        log p(x) = −(3/2) log x − 1/x − ½ log π,
        E_q[log p] = −(3/2) μ − E_q[1/x] − ½ log π.
    With E_q[log q] = −μ − ½ log(2π) − ½ log σ² − ½:
        KL = −μ − ½ log 2 − ½ log π − ½ log σ² − ½ + (3/2) μ + E_q[1/x] + ½ log π
           = e^{−μ + σ²/2} + ½(μ − log σ² − 1 − log 2).
    Its negative, −e^{−μ+σ²/2} + ½(−μ + log σ² + 1 + log 2), is the notes' table row. It is
    minimised over μ where E_q[1/x] = ½.
    """
    return _LogNormalKL.apply(mu, logvar, -1.0, 0.0, 0.0)


def kl_lognormal_invgamma_half_reference(mu: Tensor, logvar: Tensor) -> Tensor:
    """`kl_lognormal_invgamma_half` as the plain expression."""
    mean_inv_x = torch.exp(-mu + 0.5 * logvar.exp())
    kl = mean_inv_x + 0.5 * (mu - logvar - 1.0) - _HALF_LOG_2
    return kl.sum()


def kl_global_sa_paper(mu: Tensor, logvar: Tensor, tau0: float) -> Tensor:
    """The "paper-literal" s_a term, as MDLDQN transcribes it; NOT a KL. For comparison only.

    The transcription (marcelbinz/MDLDQN, method notes §3.3) reads the appendix's negative KL as
        −KL_paper = log τ0 − e^{μ + σ²/2}/τ0 + ½(μ + log σ² + 1 + log 2),
    so this function returns
        KL_paper = e^{μ + σ²/2}/τ0 − log τ0 − ½(μ + log σ² + 1 + log 2),
    summed over elements.

    What it is. Compare with the exact KL against Gamma(½, scale b) in `kl_lognormal_gamma_half`,
    e^{μ+σ²/2}/b + ½ log b − ½(μ + log σ² + 1 + log 2):

    * against the intended prior Gamma(½, scale τ0²) (b = τ0²) the coefficient of E_q[s_a] should be
      τ0^{−2}, not τ0^{−1}, and the constant +log τ0, not −log τ0. With τ0 = 1e−5 the penalty on
      E_q[s_a] is therefore 1e5 times too weak, and the value is off by ≈ 2·|log τ0| ≈ 23 nats;
    * it equals the KL against Gamma(½, scale τ0) plus the constant −(3/2) log τ0. So its gradients
      are those of a prior s_a ~ Gamma(½, scale τ0), which makes √(s_a s_b) a half-Cauchy of scale
      √τ0 (not τ0), and its value is not the KL of any such proper prior (for τ0 > 1 it can even be
      negative).

    The layers use the derived KL by default (`global_kl="derived"`); this variant is selectable
    (`global_kl="paper"`) only to check which one reproduces the paper's Table 1.
    """
    log_tau0 = _log_positive(tau0, "tau0", mu)
    if isinstance(log_tau0, Tensor):
        kl = torch.exp(mu + 0.5 * logvar.exp() - log_tau0) - log_tau0 - 0.5 * (mu + logvar + 1.0) - _HALF_LOG_2
        return kl.sum()
    # the Gamma(½, scale τ0) KL plus the constant −(3/2)·log τ0 (see above)
    return _LogNormalKL.apply(mu, logvar, 1.0, log_tau0, -log_tau0)
