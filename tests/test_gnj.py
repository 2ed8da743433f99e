"""Tests of the group normal-Jeffreys layers (LinearGroupNJ, Conv2dGroupNJ), their KLs and bayesianize().

Closed forms are checked against seeded Monte Carlo estimates drawn here from the model's definition
(w = z·w̃ with z ~ N(μ_z, σ_z²) per group and w̃ ~ N(μ, σ²) per weight); tolerances are a few
Monte Carlo standard errors estimated from the same samples.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import bayescomp
from bayescomp.convert import UnsupportedLayerError, bayesianize
from bayescomp.models import lenet300_100
from bayescomp.nn import Conv2dGroupNJ, GroupSparseLayer, LinearGroupNJ, kl_gaussian_std_normal, kl_log_uniform

F64 = torch.float64
N_SE = 5.0
# Molchanov et al. (2017), Eq. 14, written out independently of the library
K1, K2, K3 = 0.63576, 1.87320, 1.48695


pytestmark = pytest.mark.usefixtures("one_thread")


def _paper_eq9(log_alpha: torch.Tensor) -> torch.Tensor:
    """The expression printed as the paper's Eq. 9: Σ k1·σ(k2 + k3 log α) − ½ softplus(−log α) − k1."""
    return torch.sum(K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1)


def _per_element_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.stack([kl_log_uniform(la.reshape(1)) for la in log_alpha])


def _randomise(layer: GroupSparseLayer, gen: torch.Generator, z_mu: torch.Tensor | None = None) -> GroupSparseLayer:
    """Give a layer a posterior with non-negligible, distinct variances everywhere (float64)."""
    layer = layer.double()
    with torch.no_grad():
        g = layer.n_groups
        layer.z_mu.copy_(z_mu if z_mu is not None else torch.linspace(-1.5, 2.0, g, dtype=F64))
        layer.z_logvar.copy_(torch.log(torch.empty(g, dtype=F64).uniform_(0.05, 0.4, generator=gen)))
        layer.weight_mu.copy_(torch.randn(layer.weight_mu.shape, generator=gen, dtype=F64))
        layer.weight_logvar.copy_(torch.log(torch.empty(layer.weight_mu.shape, dtype=F64).uniform_(0.02, 0.3, generator=gen)))
        if layer.bias_mu is not None:
            layer.bias_mu.copy_(torch.randn(layer.bias_mu.shape, generator=gen, dtype=F64))
            layer.bias_logvar.copy_(torch.log(torch.empty(layer.bias_mu.shape, dtype=F64).uniform_(0.02, 0.3, generator=gen)))
    return layer


# ---------------------------------------------------------------------------------------------------------------
# KL of the scales


def test_kl_log_uniform_nonnegative_and_decreasing():
    la = torch.linspace(-15.0, 15.0, 301, dtype=F64)
    kl = _per_element_kl(la)
    assert torch.all(kl >= 0)
    assert torch.all(kl[1:] - kl[:-1] < 0), "KL must be strictly decreasing in log α"


def test_kl_log_uniform_limits_and_table_values():
    assert kl_log_uniform(torch.tensor([20.0], dtype=F64)).item() < 1e-3
    assert kl_log_uniform(torch.tensor([40.0])).item() < 1e-3
    assert kl_log_uniform(torch.tensor([0.0], dtype=F64)).item() == pytest.approx(0.431, abs=1e-3)
    assert kl_log_uniform(torch.tensor([-10.0], dtype=F64)).item() == pytest.approx(5.64, abs=5e-3)
    # exact value at α = 1: k1·(1 − σ(k2)) + ½·log 2
    exact0 = K1 * (1 - 1 / (1 + math.exp(-K2))) + 0.5 * math.log(2.0)
    assert kl_log_uniform(torch.tensor([0.0], dtype=F64)).item() == pytest.approx(exact0, rel=1e-10)


def test_kl_log_uniform_is_negated_paper_eq9_and_sums():
    gen = torch.Generator().manual_seed(0)
    la = torch.empty(50, dtype=F64).uniform_(-12, 12, generator=gen)
    total = kl_log_uniform(la)
    assert total.dim() == 0
    torch.testing.assert_close(total, -_paper_eq9(la), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, _per_element_kl(la).sum(), rtol=1e-12, atol=1e-12)
    # the printed expression itself is negative at α = 1 (the reviewers' complaint)
    assert _paper_eq9(torch.zeros(1, dtype=F64)).item() == pytest.approx(-0.431, abs=1e-3)


def test_kl_gaussian_std_normal_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(7, 5, generator=gen, dtype=F64) * 2
    logvar = torch.randn(7, 5, generator=gen, dtype=F64) * 3
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum()
    torch.testing.assert_close(kl_gaussian_std_normal(mu, logvar), ref, rtol=1e-12, atol=1e-12)
    # zero exactly at the prior
    assert kl_gaussian_std_normal(torch.zeros(3), torch.zeros(3)).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# layer KL, log α, gradients


def _std_normal_kl(mu, logvar):
    return kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_kl_is_sum_of_parts(kind):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    layer = LinearGroupNJ(6, 4) if kind == "linear" else Conv2dGroupNJ(3, 5, 3)
    layer = _randomise(layer, gen, z_mu=torch.linspace(0.3, 1.7, layer.n_groups, dtype=F64))
    la = layer.z_logvar - torch.log(layer.z_mu**2 + 1e-8)
    expected = -_paper_eq9(la) + _std_normal_kl(layer.weight_mu, layer.weight_logvar) + _std_normal_kl(layer.bias_mu, layer.bias_logvar)
    kl = layer.kl()
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-10)
    assert kl.item() >= 0
    # a fresh layer (default init) has a non-negative KL too, and so does one without bias
    assert LinearGroupNJ(5, 3).kl().item() >= 0
    nobias = LinearGroupNJ(5, 3, bias=False).double()
    torch.testing.assert_close(
        nobias.kl(), kl_log_uniform(nobias.log_alpha()) + _std_normal_kl(nobias.weight_mu, nobias.weight_logvar)
    )


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    layer = LinearGroupNJ(6, 4) if kind == "linear" else Conv2dGroupNJ(3, 5, 3, padding=1)
    with torch.no_grad():
        layer.bias_mu.normal_()
    layer.kl().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"KL gradient of {name} is zero"
    layer.zero_grad()
    layer.train()
    x = torch.randn(8, 6) if kind == "linear" else torch.randn(8, 3, 6, 6)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no likelihood gradient for {name}"


def test_log_alpha_formula():
    torch.manual_seed(0)
    layer = LinearGroupNJ(5, 2)
    with torch.no_grad():
        layer.z_mu.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0, 1e-3]))
        layer.z_logvar.copy_(torch.tensor([-9.0, -1.0, 0.5, -3.0, -2.0]))
    expected = layer.z_logvar - torch.log(layer.z_mu**2 + 1e-8)
    torch.testing.assert_close(layer.log_alpha(), expected)
    assert layer.log_alpha()[0].item() == pytest.approx(-9.0, abs=1e-6)
    assert layer.log_alpha()[1].item() == pytest.approx(-1.0 - math.log(0.25), abs=1e-6)
    assert math.isfinite(layer.log_alpha()[3].item())  # z_mu = 0 does not give inf


# ---------------------------------------------------------------------------------------------------------------
# posterior marginals of the weights vs Monte Carlo


def _mc_weights(layer: GroupSparseLayer, n: int, gen: torch.Generator) -> torch.Tensor:
    """Samples of w = z·w̃, shape (n, *weight_shape), with z indexed along the layer's group axis explicitly."""
    sz = torch.exp(0.5 * layer.z_logvar.detach())
    z = layer.z_mu.detach() + sz * torch.randn(n, layer.n_groups, generator=gen, dtype=F64)
    sw = torch.exp(0.5 * layer.weight_logvar.detach())
    wt = layer.weight_mu.detach() + sw * torch.randn(n, *layer.weight_mu.shape, generator=gen, dtype=F64)
    if isinstance(layer, LinearGroupNJ):  # weight (out, in), groups = inputs
        return wt * z[:, None, :]
    return wt * z[:, :, None, None, None]  # weight (C_out, C_in, kh, kw), groups = output channels


def _check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    n = samples.shape[0]
    m = samples.mean(0)
    c = samples - m
    v = c.pow(2).mean(0)
    m4 = c.pow(4).mean(0)
    se_mean = torch.sqrt(v / n)
    se_var = torch.sqrt((m4 - v**2) / n)
    assert torch.all((m - mean).abs() < N_SE * se_mean + 1e-12), (m - mean).abs().max()
    assert torch.all((v - var).abs() < N_SE * se_var + 1e-12), ((v - var).abs() / se_var).max()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: LinearGroupNJ(5, 3), id="linear"),
        pytest.param(lambda: Conv2dGroupNJ(2, 4, 3), id="conv-cout4-k3"),
        pytest.param(lambda: Conv2dGroupNJ(2, 3, 3), id="conv-cout3-k3"),  # k == C_out: the official code's trap
        pytest.param(lambda: Conv2dGroupNJ(2, 2, (2, 3)), id="conv-cout2-k2x3"),
    ],
)
def test_posterior_marginals_match_monte_carlo(make):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    layer = _randomise(make(), gen)
    mean, var = layer.posterior_mean().detach(), layer.posterior_variance().detach()
    assert mean.shape == layer.weight_mu.shape and var.shape == layer.weight_mu.shape
    _check_moments(_mc_weights(layer, 200_000, gen), mean, var)
    # channel / input alignment, exactly: every weight is scaled by its own group's z
    zm, zv = layer.z_mu.detach(), layer.z_logvar.detach().exp()
    for g in range(layer.n_groups):
        sl = (slice(None), g) if isinstance(layer, LinearGroupNJ) else (g,)
        mu_g, s2_g = layer.weight_mu.detach()[sl], layer.weight_logvar.detach().exp()[sl]
        torch.testing.assert_close(mean[sl], zm[g] * mu_g)
        torch.testing.assert_close(var[sl], zv[g] * (s2_g + mu_g**2) + zm[g] ** 2 * s2_g)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sample_z_distribution(kind):
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    layer = _randomise(LinearGroupNJ(4, 2) if kind == "linear" else Conv2dGroupNJ(1, 4, 3), gen)
    z = layer.sample_z(200_000).detach()
    assert z.shape == (200_000, 4)
    _check_moments(z, layer.z_mu.detach(), layer.z_logvar.detach().exp())


# ---------------------------------------------------------------------------------------------------------------
# forward passes


def test_linear_eval_forward_is_posterior_mean_network():
    torch.manual_seed(0)
    layer = _randomise(LinearGroupNJ(7, 3), torch.Generator().manual_seed(5)).eval()
    x = torch.randn(11, 7, dtype=F64)
    expected = F.linear(x, layer.posterior_mean(), layer.bias_mu)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.posterior_bias(), layer.bias_mu.detach())
    # deterministic in eval mode
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 2), ((2, 1), (0, 2), (1, 2))])
def test_conv_eval_forward_is_posterior_mean_network(stride, padding, dilation):
    torch.manual_seed(0)
    layer = _randomise(Conv2dGroupNJ(3, 4, 3, stride=stride, padding=padding, dilation=dilation),
                       torch.Generator().manual_seed(6)).eval()
    x = torch.randn(2, 3, 11, 10, dtype=F64)
    pb = layer.posterior_bias()
    torch.testing.assert_close(pb, layer.bias_mu.detach() * layer.z_mu.detach())
    expected = F.conv2d(x, layer.posterior_mean(), pb, stride, padding, dilation)
    out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_linear_training_forward_moments():
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    layer = _randomise(LinearGroupNJ(4, 3), gen).train()
    x = torch.tensor([[0.7, -1.3, 0.4, 2.0]], dtype=F64)
    n = 20_000
    with torch.no_grad():
        out = layer(x.expand(n, -1))  # z and w̃ are drawn per example: n independent passes of the same row
    mz, vz = layer.z_mu.detach(), layer.z_logvar.detach().exp()
    mu, s2 = layer.weight_mu.detach(), layer.weight_logvar.detach().exp()
    mean = F.linear(x * mz, mu, layer.bias_mu.detach())[0]
    # out_j = Σ_i x_i z_i w̃_ij + b_j: Var = Σ_i x_i² [(σz_i² + μz_i²) σ_ij² + σz_i² μ_ij²] + σ_bj²
    var = ((x[0] ** 2) * ((vz + mz**2) * s2 + vz * mu**2)).sum(1) + layer.bias_logvar.detach().exp()
    _check_moments(out, mean, var)
    # and the variance is not the eval output's zero: sanity that sampling happens
    assert out.std(0).min() > 0.1


def test_conv_training_forward_moments():
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(8)
    layer = _randomise(Conv2dGroupNJ(2, 3, 3, padding=1), gen).train()
    x = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64)
    n = 20_000
    with torch.no_grad():
        out = layer(x.expand(n, -1, -1, -1))
    mz, vz = layer.z_mu.detach().view(-1, 1, 1), layer.z_logvar.detach().exp().view(-1, 1, 1)
    m = F.conv2d(x, layer.weight_mu.detach(), layer.bias_mu.detach(), padding=1)[0]
    v = F.conv2d(x * x, layer.weight_logvar.detach().exp(), layer.bias_logvar.detach().exp(), padding=1)[0]
    # out = z·y with y ~ N(m, v) independent of z: E = μz m, Var = (σz² + μz²) v + σz² m²
    _check_moments(out, mz * m, (vz + mz**2) * v + vz * m**2)


def test_group_mask_linear_removes_input():
    torch.manual_seed(0)
    layer = _randomise(LinearGroupNJ(5, 3), torch.Generator().manual_seed(9))
    layer.group_mask[2] = False
    x = torch.randn(4, 5, dtype=F64)
    x2 = x.clone()
    x2[:, 2] += 10.0
    x3 = x.clone()
    x3[:, 1] += 10.0
    for mode in (False, True):
        layer.train(mode)
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(1)
        b = layer(x2)
        torch.manual_seed(1)
        c = layer(x3)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert (a - c).abs().max() > 1e-3  # an unmasked input still matters
    layer.eval()
    keep = torch.tensor([True, True, False, True, True])
    w = layer.posterior_mean()[:, keep]
    torch.testing.assert_close(layer(x), F.linear(x[:, keep], w, layer.bias_mu))


def test_group_mask_conv_zeroes_channel_and_bias():
    torch.manual_seed(0)
    layer = _randomise(Conv2dGroupNJ(2, 4, 3, padding=1), torch.Generator().manual_seed(10))
    assert layer.bias_mu.abs().min() > 0
    layer.group_mask[1] = False
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    for mode in (False, True):
        layer.train(mode)
        out = layer(x)
        assert torch.all(out[:, 1] == 0), f"masked channel not zero (training={mode})"
        assert (out[:, [0, 2, 3]] != 0).float().mean() > 0.9
    layer.eval()
    full = F.conv2d(x, layer.posterior_mean(), layer.posterior_bias(), padding=1)
    out = layer(x)
    torch.testing.assert_close(out[:, [0, 2, 3]], full[:, [0, 2, 3]])


def _sampled(layer, x, seed=1):
    torch.manual_seed(seed)
    return layer(x)


@pytest.mark.parametrize("make, shape", [(lambda: LinearGroupNJ(6, 3), (4, 6)),
                                         (lambda: Conv2dGroupNJ(2, 4, 3, padding=1), (3, 2, 5, 5))])
def test_the_gate_sees_every_change_of_the_mask(make, shape):
    """An all-on mask is not multiplied in (a cached check); every way of changing it is still seen."""
    torch.manual_seed(0)
    layer = _randomise(make(), torch.Generator().manual_seed(11)).train()
    x = torch.randn(*shape, dtype=F64)
    group_out = (lambda out: out[:, 1]) if layer.group_dim == 0 else None
    full = _sampled(layer, x)

    def switched_off(module, out) -> bool:  # group 1 off: its channel is zero (conv), or its input no longer matters
        if group_out is not None:
            return bool(torch.all(group_out(out) == 0))
        x2 = x.clone()
        x2[:, 1] += 10.0
        return torch.equal(_sampled(module, x2), out)

    assert not switched_off(layer, full)
    layer.group_mask[1] = False  # in place
    assert switched_off(layer, _sampled(layer, x))
    layer.group_mask.fill_(True)
    torch.testing.assert_close(_sampled(layer, x), full, rtol=0, atol=0)  # all on again: the very same numbers
    state = copy.deepcopy(layer.state_dict())
    state["group_mask"][1] = False
    layer.load_state_dict(state)  # copied in
    assert switched_off(layer, _sampled(layer, x))
    layer.group_mask = torch.ones(layer.n_groups, dtype=torch.bool)  # a new tensor
    torch.testing.assert_close(_sampled(layer, x), full, rtol=0, atol=0)
    twin = copy.deepcopy(layer)
    twin.group_mask[1] = False
    assert switched_off(twin, _sampled(twin, x)) and not switched_off(layer, _sampled(layer, x))
    # an all-on mask gives exactly what multiplying by it gives
    layer.eval()
    z = layer.z_mean()
    assert torch.equal(layer._gate(x.shape[0]), z * layer.group_mask.to(z.dtype))


# ---------------------------------------------------------------------------------------------------------------
# variance clamp


@pytest.mark.parametrize("make", [lambda mv: LinearGroupNJ(4, 3, max_var=mv), lambda mv: Conv2dGroupNJ(2, 3, 3, max_var=mv)])
def test_clamp_variances(make):
    torch.manual_seed(0)
    layer = make(0.04)
    with torch.no_grad():
        layer.weight_logvar.copy_(torch.linspace(-10, 2, layer.weight_logvar.numel()).view_as(layer.weight_logvar))
        layer.bias_logvar.copy_(torch.linspace(-10, 2, layer.bias_logvar.numel()))
    before_w = layer.weight_logvar.detach().clone()
    z_before = (layer.z_mu.detach().clone(), layer.z_logvar.detach().clone())
    layer.clamp_variances()
    bound = math.log(0.04)
    assert layer.weight_logvar.max().item() <= bound + 1e-7
    assert layer.bias_logvar.max().item() <= bound + 1e-7
    assert layer.weight_logvar.max().item() == pytest.approx(bound, abs=1e-6)
    low = before_w <= bound
    torch.testing.assert_close(layer.weight_logvar.detach()[low], before_w[low], rtol=0, atol=0)
    torch.testing.assert_close(layer.z_mu.detach(), z_before[0], rtol=0, atol=0)
    torch.testing.assert_close(layer.z_logvar.detach(), z_before[1], rtol=0, atol=0)
    # no clamp without max_var
    free = make(None)
    with torch.no_grad():
        free.weight_logvar.fill_(3.0)
    free.clamp_variances()
    assert torch.all(free.weight_logvar == 3.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_max_var_rejected(bad):
    with pytest.raises(ValueError):
        LinearGroupNJ(3, 2, max_var=bad)
    with pytest.raises(ValueError):
        Conv2dGroupNJ(1, 2, 3, max_var=bad)


# ---------------------------------------------------------------------------------------------------------------
# bayesianize / kl_divergence


def test_bayesianize_lenet300_copies_weights_and_leaves_input():
    torch.manual_seed(0)
    plain = lenet300_100()
    before = copy.deepcopy(plain.state_dict())
    bm = bayesianize(plain)
    names = [n for n, m in bm.named_modules() if isinstance(m, LinearGroupNJ)]
    assert names == ["fc1", "fc2", "fc3"]
    assert not any(type(m) is nn.Linear for m in bm.modules())
    # input untouched
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in names)
    sd = plain.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)
    for n in names:
        src, dst = plain.get_submodule(n), bm.get_submodule(n)
        assert torch.equal(dst.weight_mu.detach(), src.weight.detach())
        assert torch.equal(dst.bias_mu.detach(), src.bias.detach())
        pm = dst.posterior_mean().detach()
        torch.testing.assert_close(pm, src.weight.detach() * dst.z_mu.detach().view(1, -1))
        # z_mu ≈ 1 at init, so the Bayesian net starts as the plain net
        assert ((pm - src.weight.detach()).abs() <= 0.06 * src.weight.detach().abs() + 1e-12).all()
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(bm.eval()(x), plain(x), rtol=0.1, atol=0.05)
    # keep_weights=False: the twins keep their own initialisation
    fresh = bayesianize(plain, keep_weights=False)
    assert not torch.equal(fresh.fc1.weight_mu.detach(), plain.fc1.weight.detach())
    assert torch.all(fresh.fc1.bias_mu == 0)


def test_bayesianize_conv_keeps_geometry():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    bm = bayesianize(plain)
    conv = bm[0]
    assert isinstance(conv, Conv2dGroupNJ) and conv.bias_mu is None
    assert conv.n_groups == 4
    with torch.no_grad():
        conv.z_mu.fill_(1.0)
        bm[3].z_mu.fill_(1.0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(bm.eval()(x), plain(x))


@pytest.mark.parametrize("bad", [lambda: nn.EmbeddingBag(10, 4), lambda: nn.LSTM(4, 4)])
def test_bayesianize_unsupported_layer_names_path(bad):
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), block=nn.Sequential(OrderedDict(odd=bad()))))
    with pytest.raises(UnsupportedLayerError, match=r"block\.odd"):
        bayesianize(model, strict=True)
    with pytest.warns(UserWarning, match=r"block\.odd"):  # by default: left dense, with a warning
        bayesianize(model)


def test_bayesianize_argument_errors():
    model = lenet300_100()
    with pytest.raises(ValueError, match="prior"):
        bayesianize(model, prior="laplace")
    with pytest.raises(ValueError, match="fc9"):
        bayesianize(model, max_var={"fc1": 0.04, "fc9": 0.1})
    with pytest.raises(ValueError):
        bayesianize(model, max_var=0.0)
    bm = bayesianize(model, max_var={"fc1": 0.04})
    assert bm.fc1.max_var == 0.04 and bm.fc2.max_var is None and bm.fc3.max_var is None
    bm = bayesianize(model, max_var=0.5)
    assert bm.fc1.max_var == bm.fc2.max_var == bm.fc3.max_var == 0.5
    with pytest.raises(UnsupportedLayerError):
        bayesianize(bm)  # already Bayesian
    with pytest.raises(UnsupportedLayerError):
        bayesianize(nn.Sequential(nn.ReLU()))  # nothing to convert


def test_bayesianize_max_var_naming_unconverted_module():
    with pytest.raises(ValueError):
        bayesianize(lenet300_100(), max_var={"relu1": 0.04})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_bayesianize_nested_modules():
    torch.manual_seed(0)
    plain = _Net()
    bm = bayesianize(plain)
    names = sorted(n for n, m in bm.named_modules() if isinstance(m, LinearGroupNJ))
    assert names == ["body.0", "body.2", "head"]
    assert isinstance(bm.body[3], nn.BatchNorm1d)  # passes through
    assert not any(type(m) is nn.Linear for m in bm.modules())
    assert type(plain.body[0]) is nn.Linear
    assert bm.eval()(torch.randn(3, 6)).shape == (3, 2)


def test_kl_divergence_sums_layers():
    torch.manual_seed(0)
    bm = bayesianize(_Net())
    layers = [m for m in bm.modules() if isinstance(m, GroupSparseLayer)]
    assert len(layers) == 3
    total = bayescomp.kl_divergence(bm)
    torch.testing.assert_close(total, sum(layer.kl() for layer in layers))
    assert total.item() > max(layer.kl().item() for layer in layers)
    with pytest.raises(ValueError):
        bayescomp.kl_divergence(lenet300_100())
