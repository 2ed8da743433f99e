"""A masked Linear layer trains on its kept inputs only (`LinearKind._stochastic`, as fine-tuning after a cut
runs): the sample, the KL and every gradient are those of the full layer with z multiplied by the mask, on the
same random numbers; the products it runs are the kept inputs' size."""

from __future__ import annotations

import pytest
import torch

from bayescomp.nn import LinearGroupHS, LinearGroupNJ, draw_z, fuse_weight_kl
from bayescomp.nn.lrt import linear_lrt_reference

F64 = torch.float64
N, IN, OUT = 5, 12, 4


def _layer(cls, group_size: int = 1):
    torch.manual_seed(30)
    layer = cls(IN, OUT, group_size=group_size).double().train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("logvar"):
                p.uniform_(-4.0, 0.5)
    return layer


def _full_masked(layer, x, per: str):
    """The layer's training forward on every input, z multiplied by the mask (draws in the layer's order)."""
    torch.manual_seed(31)
    n = x.shape[0]
    z = layer.sample_z_reference(torch.randn(1 if per == "batch" else n, layer.n_groups, dtype=F64))
    z = (z * layer.group_mask.to(F64)).repeat_interleave(layer.group_size, dim=-1)
    if x.dim() > 2:
        z = z.view(z.shape[0], 1, -1).expand_as(x).reshape(-1, IN)
    eps = torch.randn(x.numel() // IN, OUT, dtype=F64)
    out = linear_lrt_reference(x.reshape(-1, IN), z.expand(x.numel() // IN, -1), layer.weight_mu, layer.weight_logvar,
                               layer.bias_mu, layer.bias_logvar, eps)
    return out.view(*x.shape[:-1], OUT)


@pytest.mark.parametrize("per", ["example", "batch"])
@pytest.mark.parametrize("shape", [(N, IN), (N, 3, IN)])  # a batch of vectors, a batch of sequences
@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("cls", [LinearGroupNJ, LinearGroupHS])
def test_the_kept_inputs_give_the_masked_layers_sample_kl_and_gradients(cls, group_size, shape, per):
    layer = _layer(cls, group_size)
    layer.group_mask[[0, 2]] = False
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    params = [x, *layer.parameters()]
    weights = torch.linspace(-1, 1, N * shape[-2] * OUT if len(shape) > 2 else N * OUT, dtype=F64)
    torch.manual_seed(31)
    with fuse_weight_kl(layer), draw_z(layer, per):
        out = layer(x)
        kl = layer.kl()
        loss = (out.flatten() * weights).sum() + 0.1 * kl
    ref = _full_masked(layer, x, per)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    full_kl = layer.kl_z() + layer._params_kl()  # every weight's, the pruned ones' too
    torch.testing.assert_close(kl, full_kl, rtol=1e-12, atol=0.0)
    ref_loss = (ref.flatten() * weights).sum() + 0.1 * full_kl
    for p, a, b in zip(params, torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params), strict=True):
        assert a.shape == p.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the pruned inputs' weights get the KL's gradient only (the data term does not reach them)
    g_mu = torch.autograd.grad(layer(x).sum(), layer.weight_mu)[0]
    pruned = ~layer.group_mask.repeat_interleave(group_size)
    assert torch.all(g_mu[:, pruned] == 0) and torch.any(g_mu[:, ~pruned] != 0)


def test_the_products_run_on_the_kept_inputs(monkeypatch):
    layer = _layer(LinearGroupNJ)
    layer.group_mask[3:] = False
    seen = []
    import bayescomp.nn.kinds as kinds
    real = kinds.linear_lrt
    monkeypatch.setattr(kinds, "linear_lrt", lambda x, z, mu, *a, **k: seen.append(mu.shape) or real(x, z, mu, *a, **k))
    layer(torch.randn(N, IN, dtype=F64))
    assert seen == [(OUT, 3)]
    layer.group_mask.fill_(True)  # the mask changed in place: every input again, by the fused node
    layer(torch.randn(N, IN, dtype=F64))
    assert seen == [(OUT, 3)]
