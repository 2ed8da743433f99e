"""The Linear training forward with its KL as a second output (`lrt.linear_lrt(..., with_kl=True)`): the sample
and the weights' and bias's KL against plain autograd expressions on the same noise, and finite differences.

The fused path takes Σσ² from an extra row of ones in the variance product and adds the σ² gradient's ½·∂L/∂KL
through the same row in the backward: these tests fail if the row leaks into the sample, if the KL or its
gradient miss the bias, or if a KL-only backward (no gradient on the sample) goes wrong.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from bayescomp.nn.lrt import linear_lrt, linear_lrt_reference

F64 = torch.float64


def _leaf(*shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=F64) * scale + shift).requires_grad_()


def _inputs(bias: bool, bias_var: bool | None = None):
    x, z = _leaf(5, 7), _leaf(5, 7, shift=1.0)
    mu, lv = _leaf(4, 7), _leaf(4, 7, scale=0.5, shift=-1.0)
    bias_var = bias if bias_var is None else bias_var
    bm = _leaf(4) if bias else None
    bl = _leaf(4, shift=-2.0) if bias_var else None
    return x, z, mu, lv, bm, bl, torch.randn(5, 4, dtype=F64)


def _kl_reference(mu, lv, bm, bl):
    kl = 0.5 * (lv.exp() - lv + mu * mu - 1.0).sum()
    if bm is not None and bl is not None:
        kl = kl + 0.5 * (bl.exp() - bl + bm * bm - 1.0).sum()
    return kl


@pytest.mark.parametrize("bias,bias_var", [(True, True), (False, False), (False, True), (True, False)])
def test_sample_and_kl_match_the_expressions_with_their_gradients(bias, bias_var):
    torch.manual_seed(0)
    args = _inputs(bias, bias_var)
    out, kl = linear_lrt(*args, with_kl=True)
    ref_out = linear_lrt_reference(*args)
    ref_kl = _kl_reference(*args[2:6])
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-12)
    wrt = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    w = torch.randn_like(out)
    for coef in (0.7, 0.0):  # a KL term in the loss, and a zero gradient on it
        got = torch.autograd.grad((out * w).sum() + coef * kl, wrt, retain_graph=True)
        want = torch.autograd.grad((ref_out * w).sum() + coef * ref_kl, wrt, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_kl_output_alone_gives_the_kl_gradient(bias):
    torch.manual_seed(1)
    args = _inputs(bias)
    _, kl = linear_lrt(*args, with_kl=True)
    mu, lv, bm, bl = args[2:6]
    wrt = [t for t in (mu, lv, bm, bl) if t is not None]
    got = torch.autograd.grad(2.5 * kl, wrt)
    want = torch.autograd.grad(2.5 * _kl_reference(mu, lv, bm, bl), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_sample_and_kl_pass_finite_differences(bias):
    torch.manual_seed(2)
    args = _inputs(bias)
    assert gradcheck(lambda *a: linear_lrt(*a, with_kl=True), args)


def test_variance_floor_applies_to_the_sample_not_to_the_kl():
    """Inputs at zero give v = 0, floored at TINY before the square root; the KL is the weights' all the same."""
    torch.manual_seed(3)
    x, z, mu, lv, bm, bl, eps = _inputs(False)
    x = torch.zeros_like(x)
    out, kl = linear_lrt(x, z, mu, lv, None, None, eps, with_kl=True)
    torch.testing.assert_close(out, linear_lrt_reference(x, z, mu, lv, None, None, eps), rtol=0, atol=1e-7)
    torch.testing.assert_close(kl, _kl_reference(mu, lv, None, None), rtol=1e-12, atol=1e-12)
    kl.backward()
    torch.testing.assert_close(lv.grad, 0.5 * (lv.detach().exp() - 1.0))
    torch.testing.assert_close(mu.grad, mu.detach())


def test_conv_bias_variance_without_a_mean_gets_no_kl_gradient():
    """As the Linear case: the KL leaves out a bias without a mean, so its gradient must too."""
    from bayescomp.nn.lrt import conv2d_lrt, conv2d_lrt_reference

    torch.manual_seed(4)
    x, z = _leaf(2, 3, 6, 6), _leaf(2, 4, shift=1.0)
    mu, lv, bl = _leaf(4, 3, 3, 3), _leaf(4, 3, 3, 3, scale=0.5, shift=-1.0), _leaf(4, shift=-2.0)
    eps = torch.randn(2, 4, 4, 4, dtype=F64)
    conf = (1, 0, 1, 1)
    out, kl = conv2d_lrt(x, z, mu, lv, None, bl, eps, *conf, with_kl=True)
    ref_out = conv2d_lrt_reference(x, z, mu, lv, None, bl, eps, *conf)
    ref_kl = _kl_reference(mu, lv, None, bl)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    wrt = [x, z, mu, lv, bl]
    got = torch.autograd.grad((out * w).sum() + 0.7 * kl, wrt)
    want = torch.autograd.grad((ref_out * w).sum() + 0.7 * ref_kl, wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
