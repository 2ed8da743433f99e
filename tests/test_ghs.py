"""Tests of the group horseshoe (BC-GHS) layers and their KL closed forms.

The KLs are checked against seeded Monte Carlo estimates of E_q[log q − log p] with the prior
densities written out independently here; the tolerance is a few Monte Carlo standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Gamma, InverseGamma, LogNormal

from bayescomp.nn.ghs import Conv2dGroupHS, LinearGroupHS
from bayescomp.nn.horseshoe_kl import (
    kl_global_sa_paper,
    kl_lognormal_gamma_half,
    kl_lognormal_gamma_half_logscale,
    kl_lognormal_invgamma_half,
)

N_MC = 1_000_000
N_SE = 5.0
LGAMMA_HALF = math.lgamma(0.5)
F64 = torch.float64


# ---- reference densities (written from the definitions, not from the module) ---------------------
def log_gamma_half(x: Tensor, b: float) -> Tensor:
    """log density of Gamma(shape ½, scale b)."""
    return -0.5 * torch.log(x) - x / b - LGAMMA_HALF - 0.5 * math.log(b)


def log_invgamma_half(x: Tensor) -> Tensor:
    """log density of InvGamma(shape ½, scale 1): ∝ x^{−3/2} e^{−1/x}."""
    return -1.5 * torch.log(x) - 1.0 / x - LGAMMA_HALF


def mc_kl(mu: float, logvar: float, log_p, seed: int) -> tuple[float, float]:
    """Monte Carlo E_q[log q − log p] for q = LN(mu, e^logvar): (estimate, standard error)."""
    gen = torch.Generator().manual_seed(seed)
    sd = math.exp(0.5 * logvar)
    y = mu + sd * torch.randn(N_MC, generator=gen, dtype=F64)
    x = torch.exp(y)
    log_q = LogNormal(torch.tensor(mu, dtype=F64), torch.tensor(sd, dtype=F64)).log_prob(x)
    d = log_q - log_p(x)
    return d.mean().item(), d.std().item() / math.sqrt(N_MC)


def t64(v: float) -> Tensor:
    return torch.tensor([v], dtype=F64)


# ---- (1) closed forms vs Monte Carlo ------------------------------------------------------------
def test_reference_densities_match_torch_distributions() -> None:
    x = torch.logspace(-12, 3, 40, dtype=F64)
    for b in (1e-10, 1e-4, 0.49, 1.0):
        assert torch.allclose(log_gamma_half(x, b), Gamma(t64(0.5), t64(1.0 / b)).log_prob(x), rtol=1e-10, atol=1e-8)
    assert torch.allclose(log_invgamma_half(x), InverseGamma(t64(0.5), t64(1.0)).log_prob(x), rtol=1e-10, atol=1e-8)


MU_OFFSETS = (-1.5, -0.7, 0.8)
LOGVARS = (-6.0, -1.0, 0.3)


@pytest.mark.parametrize("tau0", [1e-5, 1e-2, 0.7, 1.0])
def test_kl_gamma_half_matches_monte_carlo(tau0: float) -> None:
    b = tau0**2
    seed = 0
    for off in MU_OFFSETS:
        for logvar in LOGVARS:
            mu = math.log(b) + off
            seed += 1
            est, se = mc_kl(mu, logvar, lambda x: log_gamma_half(x, b), seed)
            closed = kl_lognormal_gamma_half(t64(mu), t64(logvar), b).item()
            closed_log = kl_lognormal_gamma_half_logscale(t64(mu), t64(logvar), math.log(b)).item()
            assert closed == pytest.approx(closed_log, rel=1e-12, abs=1e-12)
            assert abs(closed - est) < N_SE * se + 1e-9, (tau0, mu, logvar, closed, est, se)
            assert closed >= 0


def test_kl_invgamma_half_matches_monte_carlo() -> None:
    seed = 100
    for mu in (-2.0, 0.0, math.log(2.0), 1.7, 23.0):
        for logvar in LOGVARS:
            seed += 1
            est, se = mc_kl(mu, logvar, log_invgamma_half, seed)
            closed = kl_lognormal_invgamma_half(t64(mu), t64(logvar)).item()
            assert abs(closed - est) < N_SE * se + 1e-9, (mu, logvar, closed, est, se)
            assert closed >= 0


def test_kl_functions_sum_over_elements() -> None:
    mu = torch.tensor([-1.0, 0.3, 2.0], dtype=F64)
    lv = torch.tensor([-5.0, -0.5, 0.1], dtype=F64)
    for fn in (
        lambda m, v: kl_lognormal_gamma_half(m, v, 0.3),
        kl_lognormal_invgamma_half,
        lambda m, v: kl_global_sa_paper(m, v, 1e-3),
    ):
        total = fn(mu, lv)
        assert total.dim() == 0
        parts = sum(fn(mu[i : i + 1], lv[i : i + 1]) for i in range(3))
        assert total.item() == pytest.approx(parts.item(), rel=1e-12)


def test_kl_minimum_locations() -> None:
    """d/dμ KL = 0 at E[x] = b/2 (Gamma) and E[1/x] = ½ (InvGamma): check by autograd."""
    lv = t64(-2.0)
    for b in (1e-10, 1.0):
        mu = (t64(math.log(b / 2)) - 0.5 * lv.exp()).requires_grad_()
        kl_lognormal_gamma_half(mu, lv, b).backward()
        assert abs(mu.grad.item()) < 1e-10
    mu = (t64(math.log(2.0)) + 0.5 * lv.exp()).requires_grad_()
    kl_lognormal_invgamma_half(mu, lv).backward()
    assert abs(mu.grad.item()) < 1e-10


# ---- (2) the paper-literal global term is not the KL --------------------------------------------
def test_paper_variant_does_not_match_monte_carlo() -> None:
    tau0 = 1e-5
    b = tau0**2
    for i, (off, logvar) in enumerate([(-0.7, -6.0), (0.0, -1.0), (-3.0, -9.0)]):
        mu = math.log(b) + off
        est, se = mc_kl(mu, logvar, lambda x: log_gamma_half(x, b), 500 + i)
        derived = kl_lognormal_gamma_half(t64(mu), t64(logvar), b).item()
        paper = kl_global_sa_paper(t64(mu), t64(logvar), tau0).item()
        assert abs(derived - est) < N_SE * se + 1e-9
        assert abs(paper - est) > 1000 * se + 1.0  # off by ≈ 2|log τ0| ≈ 23 nats
        mean_x = math.exp(mu + 0.5 * math.exp(logvar))
        assert paper - derived == pytest.approx(-2.0 * math.log(tau0) + mean_x * (1.0 / tau0 - 1.0 / b), rel=1e-9)


@pytest.mark.parametrize("tau0", [1e-5, 0.3, 2.0])
def test_paper_variant_is_gamma_scale_tau0_plus_constant(tau0: float) -> None:
    """As documented: KL_paper = KL(q || Gamma(½, scale τ0)) − (3/2) log τ0."""
    mu, lv = torch.tensor([math.log(tau0), math.log(tau0) + 1.0], dtype=F64), torch.tensor([-4.0, 0.0], dtype=F64)
    paper = kl_global_sa_paper(mu, lv, tau0)
    expected = kl_lognormal_gamma_half(mu, lv, tau0) - 2 * 1.5 * math.log(tau0)
    assert paper.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-10)


# ---- (3) the Gamma × InvGamma decomposition gives a half-Cauchy(τ0) --------------------------------
@pytest.mark.parametrize("tau0", [0.7, 1e-5])
def test_gamma_invgamma_product_is_half_cauchy(tau0: float) -> None:
    n = N_MC
    with torch.random.fork_rng():
        torch.manual_seed(7)
        s_a = Gamma(torch.tensor(0.5, dtype=F64), torch.tensor(1.0 / tau0**2, dtype=F64)).sample((n,))
        s_b = InverseGamma(torch.tensor(0.5, dtype=F64), torch.tensor(1.0, dtype=F64)).sample((n,))
    s = torch.sqrt(s_a * s_b)
    # P(s < τ0) = ½ for C⁺(0, τ0)
    p_below = (s < tau0).double().mean().item()
    assert abs(p_below - 0.5) < N_SE * math.sqrt(0.25 / n)
    # sample quantiles vs τ0·tan(πp/2); SE(q_p) = √(p(1−p)) / (f(q_p) √n), f(q) = 2/(πτ0(1 + (q/τ0)²))
    for p in (0.25, 0.5, 0.75):
        q_true = tau0 * math.tan(math.pi * p / 2)
        dens = 2.0 / (math.pi * tau0 * (1.0 + (q_true / tau0) ** 2))
        se = math.sqrt(p * (1 - p)) / (dens * math.sqrt(n))
        q_emp = torch.quantile(s, p).item()
        assert abs(q_emp - q_true) < N_SE * se, (p, q_emp, q_true, se)


# ---- helpers for layers ----------------------------------------------------------------------------
def make_layers(tau0: float = 1e-5, global_kl: str = "derived") -> list:
    torch.manual_seed(0)
    return [
        LinearGroupHS(4, 3, tau0=tau0, global_kl=global_kl),
        Conv2dGroupHS(2, 3, 2, stride=2, padding=1, tau0=tau0, global_kl=global_kl),
    ]


def randomise(layer, scale_logvar: tuple[float, float] = (-2.5, -1.5), seed: int = 1) -> None:
    """Move the layer's posterior away from its initialisation to non-trivial values."""
    gen = torch.Generator().manual_seed(seed)

    def u(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=F64)

    with torch.no_grad():
        g = layer.n_groups
        lo, hi = scale_logvar
        layer.sa_mu.copy_(2 * math.log(layer.tau0) - math.log(2.0) + u((), -0.3, 0.3))
        layer.sb_mu.copy_(-layer.sa_mu + u((), -0.3, 0.3))
        layer.a_mu.copy_(u(g, -1.2, 0.0))
        layer.b_mu.copy_(u(g, 0.2, 1.2))
        for name in ("sa_logvar", "sb_logvar", "a_logvar", "b_logvar"):
            p = getattr(layer, name)
            p.copy_(u(p.shape, lo, hi))
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=gen, dtype=F64))
        layer.weight_logvar.copy_(u(layer.weight_mu.shape, -3.0, -1.0))
        if layer.bias_mu is not None:
            layer.bias_mu.copy_(torch.randn(layer.bias_mu.shape, generator=gen, dtype=F64))
            layer.bias_logvar.copy_(u(layer.bias_mu.shape, -4.0, -2.0))


# ---- (4) marginal posterior moments of w -------------------------------------------------------------
@pytest.mark.parametrize("kind", [0, 1], ids=["linear", "conv"])
def test_posterior_moments_match_sampling(kind: int) -> None:
    layer = make_layers()[kind].double()
    randomise(layer)
    n = 200_000
    torch.manual_seed(11)
    with torch.no_grad():

        def ln(mu, logvar, shape):
            return LogNormal(mu, torch.exp(0.5 * logvar)).sample(shape)

        # each scale from its own log-normal posterior; z = √(s_a s_b α̃ β̃)
        s_a = ln(layer.sa_mu, layer.sa_logvar, (n, 1))
        s_b = ln(layer.sb_mu, layer.sb_logvar, (n, 1))
        alpha = ln(layer.a_mu, layer.a_logvar, (n,))
        beta = ln(layer.b_mu, layer.b_logvar, (n,))
        z = torch.sqrt(s_a * s_b * alpha * beta)  # (n, groups)
        zshape = [n] + [1] * layer.weight_mu.dim()
        zshape[1 + layer.group_dim] = -1
        w_tilde = layer.weight_mu + layer.weight_logvar.exp().sqrt() * torch.randn(n, *layer.weight_mu.shape, dtype=F64)
        w = z.view(zshape) * w_tilde
        mean = w.mean(0)
        cen = w - mean
        var = cen.pow(2).mean(0)
        se_mean = var.sqrt() / math.sqrt(n)
        se_var = (cen.pow(4).mean(0) - var.pow(2)).clamp_min(0).sqrt() / math.sqrt(n)
        pm, pv = layer.posterior_mean(), layer.posterior_variance()
        assert pm.shape == layer.weight_mu.shape and pv.shape == layer.weight_mu.shape
        assert torch.all((pm - mean).abs() < N_SE * se_mean), (pm - mean).abs() / se_mean
        assert torch.all((pv - var).abs() < N_SE * se_var), (pv - var).abs() / se_var
        # z's own moments (E[z], Var[z]) from the same draws
        zm, zv = z.mean(0), z.var(0)
        assert torch.allclose(layer.z_mean(), zm, rtol=5e-3)
        assert torch.allclose(layer.z_variance(), zv, rtol=3e-2)


@pytest.mark.parametrize("kind", [0, 1], ids=["linear", "conv"])
def test_sample_z_matches_marginal(kind: int) -> None:
    layer = make_layers()[kind].double()
    randomise(layer)
    torch.manual_seed(3)
    with torch.no_grad():
        z = layer.sample_z(200_000)
    assert z.shape == (200_000, layer.n_groups)
    assert torch.all(z > 0)
    log_z = z.log()
    assert torch.allclose(
        log_z.mean(0), layer.log_z_mean(), atol=5 * (layer.log_z_variance() / 200_000).sqrt().max().item()
    )
    assert torch.allclose(log_z.var(0), layer.log_z_variance(), rtol=2e-2)
    assert torch.allclose(z.mean(0), layer.z_mean(), rtol=5e-3)


@pytest.mark.parametrize("kind", [0, 1], ids=["linear", "conv"])
def test_fused_sample_z_equals_the_expression_with_its_gradients(kind: int) -> None:
    layer = make_layers()[kind].double()
    randomise(layer, scale_logvar=(-6.0, 1.0), seed=7)
    names = ["sa_mu", "sb_mu", "a_mu", "b_mu", "sa_logvar", "sb_logvar", "a_logvar", "b_logvar"]
    params = [layer.get_parameter(n) for n in names]
    torch.manual_seed(5)
    z = layer.sample_z(6)
    torch.manual_seed(5)
    eps = torch.randn(6, layer.n_groups, dtype=torch.float64)
    reference = layer.sample_z_reference(eps)
    assert torch.equal(z, reference)  # the same arithmetic in the same order
    weights = torch.randn(6, layer.n_groups, dtype=torch.float64)
    g_fused = torch.autograd.grad((z * weights).sum(), params)
    g_ref = torch.autograd.grad((reference * weights).sum(), params)
    for name, a, b in zip(names, g_fused, g_ref, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# ---- (5) KL ≥ 0, finite, gradients --------------------------------------------------------------------
@pytest.mark.parametrize("tau0", [1e-5, 0.7])
def test_layer_kl_nonnegative_finite_and_decomposes(tau0: float) -> None:
    for layer in make_layers(tau0):
        for seed in (None, 1, 2):
            if seed is not None:
                layer.double()
                randomise(layer, scale_logvar=(-6.0, 1.0), seed=seed)
            kl = layer.kl()
            assert torch.isfinite(kl) and kl.item() >= 0
            kl_z = layer.kl_z()
            expected = (
                kl_lognormal_gamma_half(layer.sa_mu.view(1), layer.sa_logvar.view(1), tau0**2)
                + kl_lognormal_invgamma_half(layer.sb_mu.view(1), layer.sb_logvar.view(1))
                + kl_lognormal_gamma_half(layer.a_mu, layer.a_logvar, 1.0)
                + kl_lognormal_invgamma_half(layer.b_mu, layer.b_logvar)
            )
            assert kl_z.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("global_kl", ["derived", "paper"])
@pytest.mark.parametrize("tau0", [1e-5, 0.7])
def test_fused_scale_kl_equals_the_four_terms_with_their_gradients(tau0: float, global_kl: str) -> None:
    """kl_z is one fused call on the concatenated scales; it must be the four KL functions' sum, gradients too."""
    for seed, layer in enumerate(make_layers(tau0, global_kl)):
        layer.double()
        randomise(layer, scale_logvar=(-6.0, 1.0), seed=seed + 3)
        names = ["sa_mu", "sa_logvar", "sb_mu", "sb_logvar", "a_mu", "a_logvar", "b_mu", "b_logvar"]
        params = [layer.get_parameter(n) for n in names]
        fused = layer.kl_z()
        reference = layer.kl_z_terms()
        assert fused.item() == pytest.approx(reference.item(), rel=1e-12, abs=1e-9)
        g_fused = torch.autograd.grad(fused, params)
        g_ref = torch.autograd.grad(reference, params)
        for name, a, b in zip(names, g_fused, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # the cached prior constants follow the layer: another τ0 (or dtype) is another KL
    layer = make_layers(1e-5, global_kl)[0]
    before = layer.kl_z().item()
    layer.tau0 = 1e-3
    assert layer.kl_z().item() == pytest.approx(layer.kl_z_terms().item(), rel=1e-6)
    assert layer.kl_z().item() != pytest.approx(before, rel=1e-6)
    layer.double()
    assert layer.kl_z().dtype == torch.float64


def test_paper_global_kl_changes_only_the_sa_term() -> None:
    derived, paper = make_layers(1e-5, "derived")[0], make_layers(1e-5, "paper")[0]
    paper.load_state_dict(derived.state_dict())
    diff = paper.kl_z() - derived.kl_z()
    sa = (derived.sa_mu.view(1), derived.sa_logvar.view(1))
    expected = kl_global_sa_paper(*sa, 1e-5) - kl_lognormal_gamma_half(*sa, 1e-10)
    assert diff.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-3)
    assert abs(diff.item()) > 1.0


@pytest.mark.parametrize("global_kl", ["derived", "paper"])
def test_gradients_reach_every_parameter(global_kl: str) -> None:
    for layer, x in zip(make_layers(1e-5, global_kl), [torch.randn(8, 4), torch.randn(8, 2, 5, 5)], strict=True):
        layer.train()
        loss = layer(x).pow(2).sum() + layer.kl()
        loss.backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_initialisation_keeps_scale() -> None:
    for tau0 in (1e-5, 1e-2, 0.7, 1e-30):
        for layer in make_layers(tau0):
            ez = layer.z_mean()
            assert torch.allclose(ez, torch.ones_like(ez), atol=0.05), (tau0, ez)
            assert (layer.z_variance() < 1e-3).all()
            kl = layer.kl_z()
            assert torch.isfinite(kl) and kl.item() < 10 * layer.n_groups + 100 + 2 * abs(math.log(tau0))
            # s_a starts at its KL's stationary point E[s_a] = τ0²/2
            e_sa = layer.sa_mu + 0.5 * layer.sa_logvar.exp()
            assert e_sa.item() == pytest.approx(2 * math.log(tau0) - math.log(2.0), abs=1e-4)
    layer = LinearGroupHS(6, 5)
    w, b = torch.randn(5, 6) * 0.1, torch.randn(5)
    layer.load_plain(w, b)
    assert torch.allclose(layer.posterior_mean(), w, rtol=0.05, atol=1e-6)


# ---- (6) forward -------------------------------------------------------------------------------------
def test_forward_shapes_and_eval_equals_posterior_mean_net() -> None:
    lin, conv = make_layers()
    with torch.no_grad():
        for tensor in (lin.a_mu, conv.a_mu):
            tensor.add_(torch.linspace(-1.0, 0.5, tensor.numel()))  # E[z] far from 1 and uneven
    x = torch.randn(5, 4)
    lin.train()
    assert lin(x).shape == (5, 3)
    assert lin(torch.randn(2, 7, 4)).shape == (2, 7, 3)
    lin.eval()
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.posterior_mean(), lin.posterior_bias()), atol=1e-5)
        assert lin(torch.randn(2, 7, 4)).shape == (2, 7, 3)

    xc = torch.randn(5, 2, 6, 6)
    conv.train()
    assert conv(xc).shape == (5, 3, 4, 4)
    conv.eval()
    with torch.no_grad():
        out = conv(xc)
        ref = F.conv2d(xc, conv.posterior_mean(), conv.posterior_bias(), stride=2, padding=1)
        assert out.shape == (5, 3, 4, 4)
        assert torch.allclose(out, ref, atol=1e-5)


def test_training_forward_is_stochastic_eval_is_not() -> None:
    lin = make_layers()[0]
    x = torch.randn(5, 4)
    lin.train()
    assert not torch.equal(lin(x), lin(x))
    lin.eval()
    assert torch.equal(lin(x), lin(x))


# ---- (7) the pruning score ----------------------------------------------------------------------------
def test_log_alpha_increases_as_z_shrinks() -> None:
    for layer in make_layers():
        scores, means = [], []
        for shift in (0.0, -1.0, -3.0, -10.0, -40.0):
            with torch.no_grad():
                base = layer.a_mu.clone()
                layer.a_mu[0] += shift
                scores.append(layer.log_alpha().clone())
                means.append(layer.z_mean()[0].item())
                layer.a_mu.copy_(base)
        s0 = torch.stack([s[0] for s in scores])
        assert torch.all(s0[1:] > s0[:-1])
        assert all(m1 < m0 for m0, m1 in zip(means, means[1:], strict=False))
        for s in scores:  # the other groups are untouched
            assert torch.allclose(s[1:], scores[0][1:])


def test_log_alpha_separates_collapsed_group_with_small_variance() -> None:
    """A group with z ≈ 1e−9 and a tiny log-variance must score far above the kept ones
    (the log-normal dropout-rate analogue log(e^{σ²}−1) would not see it)."""
    layer = LinearGroupHS(10, 3)
    with torch.no_grad():
        layer.a_mu[3] -= 2 * math.log(1e9)  # z_3 = √(…·α̃) shrinks by 1e9
        layer.a_logvar[3] = -12.0
    score = layer.log_alpha()
    kept = torch.cat([score[:3], score[4:]])
    assert layer.z_mean()[3] < 1e-8
    assert score[3] > kept.max() + 15
    dropout_analogue = torch.log(torch.expm1(layer.log_z_variance()))  # scores it as the *least* prunable
    assert dropout_analogue[3] < torch.cat([dropout_analogue[:3], dropout_analogue[4:]]).max()


def test_log_alpha_increases_with_posterior_variance() -> None:
    layer = LinearGroupHS(5, 2)
    before = layer.log_alpha().clone()
    with torch.no_grad():
        layer.b_logvar[1] = 1.0
    after = layer.log_alpha()
    assert after[1] > before[1] + 0.5
    assert torch.allclose(after[[0, 2, 3, 4]], before[[0, 2, 3, 4]])


# ---- (8) bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau0", [0.0, -1e-5, float("nan"), float("inf"), float("-inf"), "abc"])
def test_bad_tau0_raises(tau0) -> None:
    with pytest.raises(ValueError, match="tau0"):
        LinearGroupHS(3, 2, tau0=tau0)
    with pytest.raises(ValueError, match="tau0"):
        Conv2dGroupHS(3, 2, 3, tau0=tau0)


@pytest.mark.parametrize("global_kl", ["Derived", "exact", "", None])
def test_bad_global_kl_raises(global_kl) -> None:
    with pytest.raises(ValueError, match="global_kl"):
        LinearGroupHS(3, 2, global_kl=global_kl)
    with pytest.raises(ValueError, match="global_kl"):
        Conv2dGroupHS(3, 2, 3, global_kl=global_kl)


def test_bad_scale_in_kl_functions_raises() -> None:
    m, v = t64(0.0), t64(-1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            kl_lognormal_gamma_half(m, v, bad)
        with pytest.raises(ValueError, match="tau0"):
            kl_global_sa_paper(m, v, bad)


def test_prior_name_and_repr() -> None:
    lin, conv = make_layers(0.01, "paper")
    assert lin.prior == conv.prior == "ghs"
    assert "tau0=0.01" in repr(lin) and "global_kl='paper'" in repr(conv)
