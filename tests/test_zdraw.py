"""z drawn once per batch (`nn.zdraw.draw_z`, `TrainConfig.z_draw`): every path of every layer kind gives the
sample and the gradients of the plain expressions with one z row shared by the batch, and training uses it."""

from __future__ import annotations

import pytest
import torch

from bayescomp.convert import bayesianize, group_layers
from bayescomp.models import lenet300_100
from bayescomp.nn import Conv2dGroupHS, Conv2dGroupNJ, LinearGroupHS, LinearGroupNJ, draw_z, fuse_weight_kl
from bayescomp.nn.lrt import conv2d_lrt_reference, linear_lrt_reference
from bayescomp.train import TrainConfig, fit

F64 = torch.float64
N = 6


def _layer(cls):
    torch.manual_seed(20)
    layer = (cls(7, 5) if cls in (LinearGroupNJ, LinearGroupHS) else cls(3, 5, 3)).double().train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("logvar"):
                p.uniform_(-4.0, 0.5)  # z and the sample visibly noisy
    return layer


def _reference(layer, x, masked: bool):
    """The layer's training forward written as plain expressions, with ONE z row drawn and expanded over the batch
    (the draws in the layer's order: z first, then the pre-activation noise)."""
    torch.manual_seed(21)
    z = layer.sample_z_reference(torch.randn(1, layer.n_groups, dtype=F64)).expand(N, -1)
    if masked:
        z = z * layer.group_mask.to(F64)
    params = (layer.weight_mu, layer.weight_logvar, layer.bias_mu, layer.bias_logvar)
    if isinstance(layer, (LinearGroupNJ, LinearGroupHS)):
        return linear_lrt_reference(x, z, *params, torch.randn(N, layer.out_features, dtype=F64))
    shape = torch.nn.functional.conv2d(x, layer.weight_mu).shape
    return conv2d_lrt_reference(x, z, *params, torch.randn(shape, dtype=F64), layer.stride, layer.padding,
                                layer.dilation, layer.groups)


# x_grad False: a first layer, whose Linear backward takes z's gradient from the weight-sized products
# (`lrt._shared_gate_backward`) instead of from ∂L/∂u
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("masked", [False, True])  # a Linear layer: the fused node, or the masked path
@pytest.mark.parametrize("cls", [LinearGroupNJ, LinearGroupHS, Conv2dGroupNJ, Conv2dGroupHS])
def test_a_batch_shares_one_z_with_the_gradients_of_the_expressions(cls, masked, x_grad):
    layer = _layer(cls)
    if masked:
        layer.group_mask[1] = False
    x = torch.randn(N, 7, dtype=F64) if cls in (LinearGroupNJ, LinearGroupHS) else torch.randn(N, 3, 6, 6, dtype=F64)
    x.requires_grad_(x_grad)
    params = [x, *layer.parameters()] if x_grad else list(layer.parameters())
    torch.manual_seed(21)
    with fuse_weight_kl(layer), draw_z(layer, "batch"):
        out = layer(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum() + 0.1 * layer.kl()
    ref = _reference(layer, x, masked)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    ref_loss = (ref * torch.linspace(-1, 1, ref.numel(), dtype=F64).view_as(ref)).sum() + 0.1 * layer.kl()
    for p, a, b in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params), strict=True):
        assert a.shape == p.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_per_example_draws_differ_and_the_setting_is_restored():
    layer = _layer(LinearGroupNJ)
    x = torch.ones(N, 7, dtype=F64)  # the same input in every row: rows differ only by their noise
    with torch.no_grad():
        layer.weight_logvar.fill_(-30.0)  # the weights' own noise negligible: what differs is z's
        layer.bias_logvar.fill_(-30.0)
        shared = draw_z(layer, "batch")
        with shared:
            out = layer(x)
        per_example = layer(x)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-9)  # one z for the batch
    assert not torch.allclose(per_example, per_example[:1].expand_as(per_example), atol=1e-3)
    assert layer._z_shared is False
    with pytest.raises(RuntimeError), draw_z(layer, "batch"):
        assert layer._z_shared is True
        raise RuntimeError("stop")
    assert layer._z_shared is False
    with pytest.raises(ValueError, match="example, batch"), draw_z(layer, "step"):
        pass


@pytest.mark.parametrize("per", ["example", "batch"])
def test_fit_draws_z_as_configured(per, monkeypatch):
    torch.manual_seed(0)
    model = bayesianize(lenet300_100(), "gnj", keep_weights=False)
    seen: list[int] = []
    original = LinearGroupNJ._z_draw

    def spy(self, params, n):
        seen.append(n)
        return original(self, params, n)

    monkeypatch.setattr(LinearGroupNJ, "_z_draw", spy)
    data = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    fit(model, data, TrainConfig(epochs=1, batch_size=32, seed=0, z_draw=per), progress=False)
    assert seen and set(seen) == ({1} if per == "batch" else {32})
    assert not any(layer._z_shared for layer in group_layers(model).values())


def test_the_fast_recipe_reaches_training_with_its_draw_and_a_given_option_wins():
    """recipes → run options → TrainConfig: the fast recipe's LeNet-300-100 draw is z per batch, other models keep the
    paper's per-example draw, and `--z-draw` given by the user wins over the recipe."""
    from bayescomp.recipes import recipe_options
    from bayescomp.runoptions import RunOptions, train_config

    def drawn(model, given):
        return train_config(RunOptions(**({"model": model} | recipe_options("fast", given, "gnj", model)))).z_draw

    assert drawn("lenet300", {}) == "batch"
    assert drawn("lenet5", {}) == "example"
    assert drawn("lenet300", {"z_draw": "example"}) == "example"
    assert recipe_options("paper", {}, "gnj", "lenet300")["z_draw"] == "example"
