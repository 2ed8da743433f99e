"""nn.Conv1d: its group-sparse twins (both priors) and its compression through the one engine.

A 1-d convolution is a 2-d one with a kernel one pixel high on an input one pixel high; the first tests
check that the twins are exactly that (KL, scores, moments, the training sample and its gradients), the
others that a compressed Conv1d network computes what the masked Bayesian network computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_keeps
from torch import fx, nn

import bayescomp
from bayescomp.compress import apply_masks, compress
from bayescomp.nn import Conv1dGroupHS, Conv1dGroupNJ, Conv2dGroupHS, Conv2dGroupNJ, GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")

TWINS = {"gnj": (Conv1dGroupNJ, Conv2dGroupNJ), "ghs": (Conv1dGroupHS, Conv2dGroupHS)}


def perturb(bmodel: nn.Module, gen: torch.Generator) -> None:
    """Groups with different scales and batch norms with non-trivial statistics, so that folding errors show."""
    with torch.no_grad():
        for m in bmodel.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            if isinstance(m, GroupSparseLayer):
                scale = m.z_mu if m.prior == "gnj" else m.a_mu
                scale.add_(0.3 * torch.randn(m.n_groups, generator=gen))


def shrunk_and_masked(bmodel, keeps, x, example_input=None):
    """(compressed result, its output on x, the masked Bayesian model's output on x), weights not rounded."""
    result = compress(bmodel, keeps=keeps, round_weights=False, example_input=example_input)
    apply_masks(bmodel, keeps)
    bmodel.eval()
    with torch.no_grad():
        return result, result.model(x), bmodel(x)


# ---- the layer ------------------------------------------------------------------------------------------------

def _pair_of_twins(prior: str, padding=1, groups: int = 1):
    """A Conv1d twin and the Conv2d twin with a (1, k) kernel holding the same parameters."""
    c1, c2 = TWINS[prior]
    torch.manual_seed(0)
    one = c1(4, 6, 3, stride=2, padding=padding, dilation=1, groups=groups)
    pad2 = padding if isinstance(padding, str) else (0, padding)
    two = c2(4, 6, (1, 3), stride=(1, 2) if not isinstance(padding, str) else 1, padding=pad2, groups=groups)
    if isinstance(padding, str):  # "same" takes stride 1
        one.stride = 1
    with torch.no_grad():
        for name, p in one.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            target = two.get_parameter(name)
            target.copy_(p.unsqueeze(2) if name.startswith("weight") else p)
    return one, two


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_conv1d_twin_is_the_conv2d_twin_with_a_one_pixel_high_kernel(prior):
    one, two = _pair_of_twins(prior)
    assert torch.equal(one.kl(), two.kl())  # the same sum over the same numbers: identical, not close
    assert torch.equal(one.log_alpha(), two.log_alpha())
    assert torch.equal(one.posterior_mean(), two.posterior_mean().squeeze(2))
    assert torch.equal(one.posterior_variance(), two.posterior_variance().squeeze(2))
    assert one.posterior_mean().shape == (6, 4, 3) and one.group_dim == 0 and one.n_groups == 6
    x = torch.randn(5, 4, 11)
    one.eval(), two.eval()
    assert torch.allclose(one(x), two(x.unsqueeze(2)).squeeze(2), atol=1e-6)
    # the training sample (local reparameterisation) and its gradients, from the same random draws
    one.train(), two.train()
    xs = [x.clone().requires_grad_(), x.unsqueeze(2).clone().requires_grad_()]
    outs = []
    for layer, xi in zip((one, two), xs, strict=True):
        torch.manual_seed(3)
        out = layer(xi)
        (out.square().sum() + layer.kl()).backward()
        outs.append(out)
    assert torch.allclose(outs[0], outs[1].squeeze(2), atol=1e-6)
    assert torch.allclose(xs[0].grad, xs[1].grad.squeeze(2), atol=1e-5)
    for name, p in one.named_parameters():
        other = two.get_parameter(name).grad
        assert torch.allclose(p.grad, other.squeeze(2) if name.startswith("weight") else other, atol=1e-5), name


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_conv1d_twin_same_padding_and_groups(prior):
    one, two = _pair_of_twins(prior, padding="same", groups=2)
    x = torch.randn(3, 4, 9)
    one.train(), two.train()
    torch.manual_seed(5)
    a = one(x)
    torch.manual_seed(5)
    b = two(x.unsqueeze(2)).squeeze(2)
    assert a.shape == (3, 6, 9)
    assert torch.allclose(a, b, atol=1e-6)


def test_conv1d_variance_clamp_and_input_origin():
    layer = Conv1dGroupNJ(3, 5, 3, max_var=0.01)
    with torch.no_grad():
        layer.weight_logvar.fill_(0.0)
    layer.clamp_variances()
    assert float(layer.weight_logvar.detach().max()) == pytest.approx(torch.log(torch.tensor(0.01)).item())
    layer.set_input_origin(-1.0)
    x = torch.randn(2, 3, 8)
    layer.eval()
    expected = F.conv1d(x + 1.0, layer.posterior_mean(), layer.posterior_bias())
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unpadded convolution"):
        Conv1dGroupNJ(3, 5, 3, padding=1).set_input_origin(-1.0)


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_bayesianize_converts_conv1d(prior):
    plain = nn.Sequential(nn.Conv1d(2, 4, 3, padding=2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7, 3))
    bmodel = bayescomp.bayesianize(plain, prior)
    layer = bmodel[0]
    assert type(layer) is TWINS[prior][0]
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.padding, layer.dilation) == (2, 4, (3,), (2,), (2,))
    assert torch.equal(layer.weight_mu, plain[0].weight)  # the plain weights are the posterior means
    x = torch.randn(2, 2, 7)
    assert bmodel.train()(x).shape == (2, 3)
    assert bayescomp.kl_divergence(bmodel) > 0


def test_conv1d_with_circular_padding_is_left_dense_or_refused_by_name():
    plain = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(4 * 5, 3))
    with pytest.raises(bayescomp.UnsupportedLayerError, match="Conv1d with padding_mode='circular'"):
        bayescomp.bayesianize(plain, "gnj", strict=True)
    with pytest.warns(UserWarning, match=r"left dense, not compressed: 0 \(Conv1d\)"):
        bmodel = bayescomp.bayesianize(plain, "gnj")
    assert type(bmodel[0]) is nn.Conv1d and isinstance(bmodel[2], bayescomp.nn.GroupSparseLayer)


# ---- compression ----------------------------------------------------------------------------------------------

def conv1d_chain() -> nn.Sequential:
    """Conv1d-BN-ReLU-pool twice, flatten, Linear: the first conv unpadded (it takes an input origin)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(3, 8, 5), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(8, 12, 3, padding=1), nn.BatchNorm1d(12), nn.ReLU(), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(12 * 5, 10),
    )


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_conv1d_chain_equals_the_masked_model(prior):
    gen = torch.Generator().manual_seed(2)
    bmodel = bayescomp.bayesianize(conv1d_chain(), prior, input_origin={"0": -1.0})
    perturb(bmodel, gen)
    keeps = random_keeps(bmodel, gen)
    x = torch.randn(6, 3, 24, generator=gen)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x)  # a chain: no example input needed
    assert got.shape == expected.shape == (6, 10)
    assert (got - expected).abs().max() <= 1e-5
    plain = result.model
    assert isinstance(plain, nn.Sequential)
    assert not any(isinstance(m, GroupSparseLayer) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv1d)]
    # the pruned output channels of both convolutions are gone, and the second reads only the first's kept ones
    assert [c.out_channels for c in convs] == [int(keeps["0"].sum()), int(keeps["4"].sum())]
    assert convs[1].in_channels in (int(keeps["0"].sum()), int(keeps["0"].sum()) + 1)  # + a channel of ones
    # the Linear layer reads its own kept inputs among the features of the kept channels; its 10 outputs stay
    assert plain[-1].in_features == int(keeps["9"].view(12, 5)[keeps["4"]].sum())
    assert plain[-1].out_features == 10
    assert result.report["architecture"].split("-")[:2] == [str(int(keeps["0"].sum())), str(int(keeps["4"].sum()))]
    assert [d["kind"] for d in result.report["layers"]] == ["conv1d", "conv1d", "linear"]


class Residual1d(nn.Module):
    """A 1-d residual network: stem, two residual blocks (a pruned channel of the stream stays in the sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1))
            for _ in range(2)
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            h = F.relu(h + block(h))
        return self.fc(h.mean(2))


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_conv1d_residual_graph_equals_the_masked_model(prior):
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    bmodel = bayescomp.bayesianize(Residual1d(), prior)
    perturb(bmodel, gen)
    keeps = random_keeps(bmodel, gen, p=0.5)
    keeps["blocks.0.3"][:] = keeps["stem"]  # a channel dropped by every writer of the stream leaves the graph
    keeps["blocks.1.3"][:] = keeps["stem"]
    x = torch.randn(5, 2, 16, generator=gen)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x, example_input=x[:1])
    assert isinstance(result.model, fx.GraphModule)
    assert (got - expected).abs().max() <= 1e-5
    fc = result.model.get_submodule("fc")
    assert fc.out_features == 4


def test_compressed_conv1d_model_saves_and_loads(tmp_path):
    gen = torch.Generator().manual_seed(6)
    bmodel = bayescomp.bayesianize(conv1d_chain(), "gnj")
    perturb(bmodel, gen)
    result = compress(bmodel, keeps=random_keeps(bmodel, gen))  # weights rounded to their bits: storable
    assert all(b is not None for b in result.report["bits"])
    x = torch.randn(4, 3, 24, generator=gen)
    for name in ("m.bcz", "m.pt"):
        bayescomp.save(result, tmp_path / name)
        back = bayescomp.load(tmp_path / name)
        assert any(type(m) is nn.Conv1d for m in back.modules())
        with torch.no_grad():
            assert torch.equal(back(x), result.model(x))
