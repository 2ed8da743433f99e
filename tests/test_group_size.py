"""Linear group-sparse layers with `group_size` > 1: one scale z per block of consecutive input features.

Checked against the model's definition written out here (w_ij = z_{g(j)}·w̃_ij with g(j) = j // group_size):
the posterior marginals and the training forward's output distribution against Monte Carlo draws, the scale KL
against a Monte Carlo estimate of E_q[log q − log p] with the prior densities written out, the evaluation forward
and a masked block against the posterior-mean network.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import LogNormal

from bayescomp.nn import LinearGroupHS, LinearGroupNJ

F64 = torch.float64
N_SE = 5.0

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_nj(layer: LinearGroupNJ, gen: torch.Generator) -> LinearGroupNJ:
    layer = layer.double()
    g = layer.n_groups
    with torch.no_grad():
        layer.z_mu.copy_(torch.linspace(-1.5, 2.0, g, dtype=F64))
        layer.z_logvar.copy_(torch.log(torch.empty(g, dtype=F64).uniform_(0.05, 0.4, generator=gen)))
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=gen, dtype=F64))
        layer.weight_logvar.copy_(torch.log(torch.empty(layer.weight_mu.shape, dtype=F64).uniform_(0.02, 0.3, generator=gen)))
        layer.bias_mu.copy_(torch.randn(layer.bias_mu.shape, generator=gen, dtype=F64))
        layer.bias_logvar.copy_(torch.log(torch.empty(layer.bias_mu.shape, dtype=F64).uniform_(0.02, 0.3, generator=gen)))
    return layer


def _randomise_hs(layer: LinearGroupHS, gen: torch.Generator) -> LinearGroupHS:
    layer = layer.double()

    def u(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=F64)

    with torch.no_grad():
        g = layer.n_groups
        layer.sa_mu.copy_(2 * math.log(layer.tau0) - math.log(2.0) + u((), -0.3, 0.3))
        layer.sb_mu.copy_(-layer.sa_mu + u((), -0.3, 0.3))
        layer.a_mu.copy_(u(g, -1.2, 0.0))
        layer.b_mu.copy_(u(g, 0.2, 1.2))
        for name in ("sa_logvar", "sb_logvar", "a_logvar", "b_logvar"):
            p = getattr(layer, name)
            p.copy_(u(p.shape, -3.0, -1.0))
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=gen, dtype=F64))
        layer.weight_logvar.copy_(u(layer.weight_mu.shape, -3.0, -1.0))
    return layer


def _check_moments(samples: Tensor, mean: Tensor, var: Tensor) -> None:
    n = samples.shape[0]
    m = samples.mean(0)
    c = samples - m
    v = c.pow(2).mean(0)
    se_mean = torch.sqrt(v / n)
    se_var = torch.sqrt((c.pow(4).mean(0) - v**2) / n)
    assert torch.all((m - mean).abs() < N_SE * se_mean + 1e-12), ((m - mean).abs() / se_mean).max()
    assert torch.all((v - var).abs() < N_SE * se_var + 1e-12), ((v - var).abs() / se_var).max()


def test_shapes_and_bad_group_size():
    layer = LinearGroupNJ(12, 5, group_size=4)
    assert layer.n_groups == 3
    assert layer.log_alpha().shape == (3,) and layer.group_mask.shape == (3,)
    assert layer.posterior_mean().shape == (5, 12) and layer.posterior_variance().shape == (5, 12)
    assert LinearGroupHS(12, 5, group_size=6).log_alpha().shape == (2,)
    assert "group_size=4" in repr(layer)
    for bad in (0, 5, 2.0, -3):
        with pytest.raises(ValueError, match="group_size"):
            LinearGroupNJ(12, 5, group_size=bad)


def test_nj_posterior_marginals_tie_each_block_to_one_z():
    gen = torch.Generator().manual_seed(1)
    gs = 3
    layer = _randomise_nj(LinearGroupNJ(6, 4, group_size=gs), gen)
    n = 200_000
    z = layer.z_mu.detach() + torch.exp(0.5 * layer.z_logvar.detach()) * torch.randn(n, 2, generator=gen, dtype=F64)
    wt = layer.weight_mu.detach() + torch.exp(0.5 * layer.weight_logvar.detach()) * torch.randn(
        n, 4, 6, generator=gen, dtype=F64)
    block = torch.arange(6) // gs  # input j belongs to group j // gs
    w = wt * z[:, None, block]
    _check_moments(w, layer.posterior_mean().detach(), layer.posterior_variance().detach())


def test_hs_posterior_marginals_tie_each_block_to_one_z():
    gen = torch.Generator().manual_seed(2)
    layer = _randomise_hs(LinearGroupHS(6, 3, tau0=0.5, group_size=2), gen)
    n = 200_000
    torch.manual_seed(5)
    with torch.no_grad():
        def ln(mu, logvar, shape):
            return LogNormal(mu, torch.exp(0.5 * logvar)).sample(shape)

        z = torch.sqrt(ln(layer.sa_mu, layer.sa_logvar, (n, 1)) * ln(layer.sb_mu, layer.sb_logvar, (n, 1))
                       * ln(layer.a_mu, layer.a_logvar, (n,)) * ln(layer.b_mu, layer.b_logvar, (n,)))  # (n, 3 groups)
        wt = layer.weight_mu + layer.weight_logvar.exp().sqrt() * torch.randn(n, 3, 6, dtype=F64)
        w = wt * z[:, None, torch.arange(6) // 2]
        _check_moments(w, layer.posterior_mean(), layer.posterior_variance())


def _log_gamma_half(x: Tensor, scale: float) -> Tensor:
    """log density of Gamma(shape ½, scale θ): x^{−½} e^{−x/θ} / (Γ(½) θ^{½})."""
    return -0.5 * torch.log(x) - x / scale - math.lgamma(0.5) - 0.5 * math.log(scale)


def _log_invgamma_half(x: Tensor) -> Tensor:
    """log density of InvGamma(shape ½, scale 1): x^{−3/2} e^{−1/x} / Γ(½)."""
    return -1.5 * torch.log(x) - 1.0 / x - math.lgamma(0.5)


def test_hs_scale_kl_is_one_term_per_block_and_matches_monte_carlo():
    """kl_z = E_q[log q − log p] over the global pair and ONE (α̃, β̃) pair per block of inputs."""
    gen = torch.Generator().manual_seed(3)
    tau0 = 0.7
    layer = _randomise_hs(LinearGroupHS(8, 3, tau0=tau0, group_size=4), gen)
    assert layer.n_groups == 2 and layer.a_mu.shape == (2,)
    n = 400_000
    with torch.no_grad():
        def draw(mu, logvar, shape):
            q = LogNormal(mu, torch.exp(0.5 * logvar))
            x = q.sample(shape)
            return x, q.log_prob(x)

        torch.manual_seed(7)
        s_a, lq_sa = draw(layer.sa_mu, layer.sa_logvar, (n,))
        s_b, lq_sb = draw(layer.sb_mu, layer.sb_logvar, (n,))
        a, lq_a = draw(layer.a_mu, layer.a_logvar, (n,))
        b, lq_b = draw(layer.b_mu, layer.b_logvar, (n,))
        d = (lq_sa - _log_gamma_half(s_a, tau0**2)) + (lq_sb - _log_invgamma_half(s_b)) \
            + (lq_a - _log_gamma_half(a, 1.0)).sum(1) + (lq_b - _log_invgamma_half(b)).sum(1)
        est, se = d.mean().item(), d.std().item() / math.sqrt(n)
        assert abs(layer.kl_z().item() - est) < N_SE * se, (layer.kl_z().item(), est, se)


def test_nj_kl_counts_one_scale_term_per_block():
    """The whole KL is the scale KL of n_groups = in/group_size scales plus the weights' and bias's Gaussian KL,
    and it equals the per-input layer's with the same z repeated over each block minus the repeated scale terms."""
    gen = torch.Generator().manual_seed(4)
    blocks = _randomise_nj(LinearGroupNJ(6, 4, group_size=3), gen)
    per_input = LinearGroupNJ(6, 4).double()
    with torch.no_grad():
        for name in ("weight_mu", "weight_logvar", "bias_mu", "bias_logvar"):
            getattr(per_input, name).copy_(getattr(blocks, name))
        per_input.z_mu.copy_(blocks.z_mu.repeat_interleave(3))
        per_input.z_logvar.copy_(blocks.z_logvar.repeat_interleave(3))
    # each block's scale term counted once where the per-input layer counts it three times
    torch.testing.assert_close(per_input.kl() - blocks.kl(), 2 * blocks.kl_z())
    torch.testing.assert_close(per_input.posterior_mean(), blocks.posterior_mean())
    torch.testing.assert_close(per_input.posterior_variance(), blocks.posterior_variance())


@pytest.mark.parametrize("cls", [LinearGroupNJ, LinearGroupHS])
def test_eval_forward_and_masked_block(cls):
    gen = torch.Generator().manual_seed(6)
    layer = cls(8, 3, group_size=2).double()
    layer = _randomise_nj(layer, gen) if cls is LinearGroupNJ else _randomise_hs(layer, gen)
    layer.eval()
    x = torch.randn(5, 7, 8, dtype=F64)  # (batch, tokens, features)
    torch.testing.assert_close(layer(x), F.linear(x, layer.posterior_mean(), layer.bias_mu))
    with torch.no_grad():
        layer.group_mask[1] = False  # inputs 2 and 3
    w = layer.posterior_mean().detach().clone()
    w[:, 2:4] = 0
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias_mu))


@pytest.mark.parametrize("tokens", [None, 3])
def test_training_forward_draws_one_z_per_block(tokens):
    """Output mean and variance of the training forward for one input, over many draws, against the block model:
    Var[y_o] = Var_z[Σ_g z_g c_og] + E[Σ_j x_j² z_{g(j)}² σ²_oj] + σ²_b with c_og = Σ_{j∈g} x_j μ_oj (z tied in a
    block: a per-input z would give a different variance)."""
    gen = torch.Generator().manual_seed(8)
    layer = _randomise_nj(LinearGroupNJ(6, 2, group_size=3), gen).train()
    with torch.no_grad():
        layer.z_mu.copy_(torch.tensor([1.0, -0.8], dtype=F64))
        layer.z_logvar.fill_(math.log(0.3))
    x = torch.randn(6, generator=gen, dtype=F64)
    n = 100_000
    batch = x.expand(n, 6) if tokens is None else x.expand(n, tokens, 6)
    torch.manual_seed(9)
    with torch.no_grad():
        y = layer(batch)
        y = y if tokens is None else y[:, 0]
    mu, s2 = layer.weight_mu.detach(), layer.weight_logvar.detach().exp()
    zm, zv = layer.z_mu.detach(), layer.z_logvar.detach().exp()
    block = torch.arange(6) // 3
    c = torch.stack([(x * mu)[:, block == g].sum(1) for g in range(2)], 1)  # (out, groups)
    mean = (c * zm).sum(1) + layer.bias_mu.detach()
    ez2 = (zm**2 + zv)[block]
    var = (c**2 * zv).sum(1) + (x**2 * ez2 * s2).sum(1) + layer.bias_logvar.detach().exp()
    _check_moments(y, mean, var)


def test_gradients_reach_every_parameter_with_blocks():
    torch.manual_seed(0)
    layer = LinearGroupHS(8, 3, group_size=4, tau0=0.1).train()
    (layer(torch.randn(4, 5, 8)).pow(2).sum() + layer.kl()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
