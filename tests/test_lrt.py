"""The written-out gradients (local reparameterisation, GNJ and GHS scale KLs) against autograd's.

Each fused function is compared with the plain autograd expression it replaces, on the same noise,
in float64: values and every input's gradient. gradcheck adds finite differences, so a gradient
that autograd's reference and the fused code got wrong the same way would still fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from bayescomp.nn import Conv2dGroupHS, Conv2dGroupNJ, LinearGroupHS, LinearGroupNJ, fuse_weight_kl
from bayescomp.nn import horseshoe_kl as hkl
from bayescomp.nn.kl import kl_group_nj, kl_log_uniform, kl_log_uniform_reference
from bayescomp.nn.lrt import conv2d_lrt, conv2d_lrt_reference, linear_lrt, linear_lrt_reference

F64 = torch.float64


def _leaf(*shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=F64) * scale + shift).requires_grad_()


def _same(fused, reference, inputs):
    a, b = fused(*inputs), reference(*inputs)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, wrt, g)
    gb = torch.autograd.grad(b, wrt, g)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_lrt_matches_autograd_and_finite_differences(bias):
    torch.manual_seed(0)
    x, z = _leaf(5, 7), _leaf(5, 7, shift=1.0)
    mu, lv = _leaf(4, 7), _leaf(4, 7, scale=0.5, shift=-2.0)
    bm, bl = (_leaf(4), _leaf(4, shift=-3.0)) if bias else (None, None)
    eps = torch.randn(5, 4, dtype=F64)
    args = (x, z, mu, lv, bm, bl, eps)
    _same(linear_lrt, linear_lrt_reference, args)
    assert gradcheck(linear_lrt, args)


def test_linear_lrt_skips_gradients_nobody_asked_for():
    torch.manual_seed(1)
    x = torch.randn(3, 6, dtype=F64)  # a first layer's input: no gradient
    z, mu, lv = _leaf(3, 6), _leaf(2, 6), _leaf(2, 6)
    out = linear_lrt(x, z, mu, lv, None, None, torch.randn(3, 2, dtype=F64))
    out.sum().backward()
    assert x.grad is None and z.grad is not None and mu.grad is not None and lv.grad is not None


@pytest.mark.parametrize("conf", [(1, 0, 1, 1), (2, 1, 1, 2), ((2, 1), (0, 2), (1, 2), 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_lrt_matches_autograd_and_finite_differences(conf, bias):
    stride, padding, dilation, groups = conf
    torch.manual_seed(2)
    x, z = _leaf(2, 4, 7, 7), _leaf(2, 6, shift=1.0)
    mu, lv = _leaf(6, 4 // groups, 3, 3), _leaf(6, 4 // groups, 3, 3, scale=0.5, shift=-2.0)
    bm, bl = (_leaf(6), _leaf(6, shift=-3.0)) if bias else (None, None)
    shape = torch.nn.functional.conv2d(x.detach(), mu.detach(), None, stride, padding, dilation, groups).shape
    eps = torch.randn(shape, dtype=F64)

    def fused(*t):
        return conv2d_lrt(*t, eps, stride, padding, dilation, groups)

    def reference(*t):
        return conv2d_lrt_reference(*t, eps, stride, padding, dilation, groups)

    args = (x, z, mu, lv, bm, bl)
    _same(fused, reference, args)
    assert gradcheck(fused, args)


def test_noise_drawn_inside_is_standard_normal():
    torch.manual_seed(3)
    x = torch.ones(20000, 1)
    out = linear_lrt(x, torch.ones(20000, 1), torch.zeros(1, 1), torch.zeros(1, 1), None, None)
    assert abs(out.mean().item()) < 0.03 and abs(out.std().item() - 1.0) < 0.03  # v = 1·1 → N(0, 1)


@pytest.mark.parametrize("cls", [LinearGroupNJ, LinearGroupHS])
def test_linear_layer_on_sequences_uses_one_z_per_example(cls):
    torch.manual_seed(4)
    layer = cls(5, 3).double().train()
    x = torch.randn(4, 6, 5, dtype=F64)
    out = layer(x)
    assert out.shape == (4, 6, 3)
    out.sum().backward()  # gradients reach z's parameters through the expanded z
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("cls", [Conv2dGroupNJ, Conv2dGroupHS])
def test_conv_same_padding_takes_the_autograd_path(cls):
    torch.manual_seed(5)
    layer = cls(3, 4, 3, padding="same").train()
    out = layer(torch.randn(2, 3, 6, 6))
    assert out.shape == (2, 4, 6, 6)
    out.sum().backward()
    assert layer.weight_logvar.grad is not None


def _paper_sa_reference(m, v):
    log_tau0 = torch.tensor(1e-3, dtype=F64).log()
    half_log_2 = 0.5 * torch.tensor(2.0, dtype=F64).log()
    return (torch.exp(m + 0.5 * v.exp() - log_tau0) - log_tau0 - 0.5 * (m + v + 1.0) - half_log_2).sum()


def test_scale_kls_match_their_expressions():
    torch.manual_seed(6)
    for shape in [(), (9,)]:
        mu, lv = _leaf(*shape), _leaf(*shape, scale=0.5, shift=-1.0)
        _same(lambda m, v: hkl.kl_lognormal_gamma_half_logscale(m, v, -4.6),
              lambda m, v: hkl.kl_lognormal_gamma_half_reference(m, v, -4.6), (mu, lv))
        _same(hkl.kl_lognormal_invgamma_half, hkl.kl_lognormal_invgamma_half_reference, (mu, lv))
        _same(lambda m, v: hkl.kl_global_sa_paper(m, v, 1e-3), _paper_sa_reference, (mu, lv))
        assert gradcheck(hkl.kl_lognormal_invgamma_half, (mu, lv))
    la = _leaf(50, scale=4.0)
    _same(kl_log_uniform, kl_log_uniform_reference, (la,))
    assert gradcheck(kl_log_uniform, (la,))


def test_group_nj_kl_matches_the_log_alpha_expression():
    torch.manual_seed(7)
    z_mu, z_lv = _leaf(40), _leaf(40, scale=3.0, shift=-2.0)

    def reference(m, v):
        return kl_log_uniform_reference(v - torch.log(m * m + 1e-8))

    _same(lambda m, v: kl_group_nj(m, v, 1e-8), reference, (z_mu, z_lv))
    assert gradcheck(lambda m, v: kl_group_nj(m, v, 1e-8), (z_mu, z_lv))
    layer = LinearGroupNJ(6, 2)
    torch.testing.assert_close(layer.kl_z(), kl_log_uniform(layer.log_alpha()))


def _step_grads(model, x, y, fused: bool, seed: int = 0):
    import bayescomp

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if fused:
        with fuse_weight_kl(model):
            loss = torch.nn.functional.cross_entropy(model(x), y) + bayescomp.kl_divergence(model) / 100
    else:
        loss = torch.nn.functional.cross_entropy(model(x), y) + bayescomp.kl_divergence(model) / 100
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
@pytest.mark.parametrize("model_name", ["lenet300", "lenet5"])
def test_fused_weight_kl_gives_the_same_loss_and_gradients(prior, model_name):
    import bayescomp
    from bayescomp.models import build_model

    torch.manual_seed(8)
    model = bayescomp.bayesianize(build_model(model_name), prior).double().train()
    for layer in bayescomp.convert.group_layers(model).values():  # weights far from the prior: a KL that matters
        with torch.no_grad():
            layer.weight_logvar.uniform_(-6.0, 0.5)
    shape = (6, 784) if model_name == "lenet300" else (6, 1, 28, 28)
    x, y = torch.randn(shape, dtype=F64), torch.randint(0, 10, (6,))
    loss_a, grads_a = _step_grads(model, x, y, fused=False)
    loss_b, grads_b = _step_grads(model, x, y, fused=True)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-14, msg=name)
    assert all(layer._kl_stash is None and not layer._fuse_kl
               for layer in bayescomp.convert.group_layers(model).values())


def test_stashed_kl_is_not_used_after_the_parameters_change():
    layer = LinearGroupNJ(5, 3).train()
    with fuse_weight_kl(layer):
        layer(torch.randn(4, 5))
        assert layer._kl_stash is not None
        with torch.no_grad():
            layer.weight_logvar.add_(1.0)  # as an optimiser step would
        fresh = layer.kl()
    torch.testing.assert_close(fresh, LinearGroupNJ.kl(layer))
    assert layer._kl_stash is None
    with fuse_weight_kl(layer):  # the stash is used once, then the KL is computed afresh
        layer(torch.randn(4, 5))
        first, second = layer.kl(), layer.kl()
    torch.testing.assert_close(first, second)
    layer.eval()
    with fuse_weight_kl(layer):
        layer(torch.randn(4, 5))  # evaluation forward: nothing stashed
        assert layer._kl_stash is None


def test_kl_output_alone_backpropagates():
    torch.manual_seed(9)
    x, z = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    mu, lv = _leaf(2, 4), _leaf(2, 4)
    _, kl = linear_lrt(x, z, mu, lv, None, None, None, with_kl=True)
    kl.backward()
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(lv.grad, 0.5 * (lv.detach().exp() - 1.0))


def _kl_reference(layer):
    """The layer's KL as plain expressions: the scales' (GNJ: Molchanov's fit of log α; GHS: the four KL functions)
    and the weights' and bias's Gaussian KL ½Σ(σ² − log σ² + μ² − 1)."""
    kl_z = kl_log_uniform_reference(layer.log_alpha()) if layer.prior == "gnj" else layer.kl_z_terms()
    gauss = [(layer.weight_mu, layer.weight_logvar), (layer.bias_mu, layer.bias_logvar)]
    return kl_z + sum(0.5 * (lv.exp() - lv + mu * mu - 1.0).sum() for mu, lv in gauss)


@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("cls", [LinearGroupNJ, LinearGroupHS])
def test_gated_linear_lrt_equals_sample_z_then_linear_lrt(cls, with_kl):
    """The fused node (z drawn inside, the whole KL as a second output) against the reference path on the same
    draws: z from `sample_z_reference`, the sample from `linear_lrt_reference`, the KL from plain expressions;
    values and the gradients of every parameter and of the input, float64."""
    from bayescomp.nn.lrt import gated_linear_lrt

    torch.manual_seed(10)
    layer = cls(7, 5).double().train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("logvar"):
                p.uniform_(-4.0, 0.5)  # far from the initial −9: every term of the KL and of z matters
    x = _leaf(6, 7)
    params = [x, *layer.parameters()]

    torch.manual_seed(11)
    res = gated_linear_lrt(x, layer.weight_mu, layer.weight_logvar, layer.bias_mu, layer.bias_logvar, layer,
                           with_kl=with_kl)
    out, kl = res if with_kl else (res, None)
    torch.manual_seed(11)
    eps_z, eps = torch.randn(6, 7, dtype=F64), torch.randn(6, 5, dtype=F64)
    z = layer.sample_z_reference(eps_z)
    ref_out = linear_lrt_reference(x, z, layer.weight_mu, layer.weight_logvar, layer.bias_mu, layer.bias_logvar, eps)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    weights = torch.randn(6, 5, dtype=F64)
    loss, ref_loss = (out * weights).sum(), (ref_out * weights).sum()
    if with_kl:
        ref_kl = _kl_reference(layer)
        torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-10)
        loss, ref_loss = loss + 0.3 * kl, ref_loss + 0.3 * ref_kl
    for p, a, b in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params), strict=True):
        assert a.shape == p.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [LinearGroupNJ, Conv2dGroupNJ])
def test_gnj_sample_z_node_equals_the_expression_with_its_gradients(cls):
    layer = (cls(6, 4) if cls is LinearGroupNJ else cls(3, 6, 3)).double()  # six groups either way
    with torch.no_grad():
        layer.z_logvar.uniform_(-4.0, 0.5)
    torch.manual_seed(12)
    z = layer.sample_z(5)
    torch.manual_seed(12)
    reference = layer.sample_z_reference(torch.randn(5, 6, dtype=F64))
    torch.testing.assert_close(z, reference, rtol=1e-14, atol=0)
    w = torch.randn(5, 6, dtype=F64)
    params = [layer.z_mu, layer.z_logvar]
    for a, b in zip(torch.autograd.grad((z * w).sum(), params), torch.autograd.grad((reference * w).sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_layer_kl_from_the_fused_forward_equals_the_fresh_one():
    """Under fuse_weight_kl a Linear layer's kl() is the whole KL its forward computed: the same as computed afresh."""
    for cls in (LinearGroupNJ, LinearGroupHS):
        layer = cls(5, 3).double().train()
        with fuse_weight_kl(layer):
            layer(torch.randn(4, 5, dtype=F64))
            assert layer._kl_stash is not None and layer._kl_stash[2]  # the whole layer's
            fused = layer.kl()
        torch.testing.assert_close(fused, layer.kl(), rtol=1e-13, atol=0)
        torch.testing.assert_close(fused, _kl_reference(layer), rtol=1e-12, atol=1e-10)
