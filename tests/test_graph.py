"""Tests of graph compression (torch.fx): residual sums, concatenations, depthwise convolutions.

The central property, as for chains: the shrunk plain network computes what the masked Bayesian
network computes at evaluation. The masks are chosen so that channels of the residual stream (the
width a shortcut carries) are pruned in every writer of that stream, so that pruning *across* a
shortcut is exercised, along with random pruning inside the blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_keeps as _random_keeps
from helpers import randomise as _randomise
from torch import fx, nn

import bayescomp
from bayescomp.compress import AppendOnes, PruneError, Realign, apply_masks, compress, graph_compress, propagate
from bayescomp.models import build_model
from bayescomp.models.resnet import concat_net, resnet18, resnet20_cifar, resnet_mnist
from bayescomp.nn import GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _streams(bmodel: nn.Module, stem: str) -> list[tuple[list[str], list[str]]]:
    """Per stage of a ResNet: (convs writing the residual stream, convs and fc reading it next)."""
    out = []
    stage = 1
    while hasattr(bmodel, f"layer{stage}"):
        blocks = list(getattr(bmodel, f"layer{stage}"))
        prefix = f"layer{stage}"
        first = f"{prefix}.0.downsample.0" if blocks[0].downsample is not None else stem
        writers = [first] + [f"{prefix}.{i}.conv2" for i in range(len(blocks))]
        readers = [f"{prefix}.{i}.conv1" for i in range(1, len(blocks))]
        nxt = getattr(bmodel, f"layer{stage + 1}", None)
        readers += [f"layer{stage + 1}.0.conv1", f"layer{stage + 1}.0.downsample.0"] if nxt is not None else ["fc"]
        out.append((writers, readers))
        stage += 1
    return out


def _check_equivalent(bmodel, keeps, x, atol=1e-4):
    result = graph_compress(bmodel, example_input=x, keeps=keeps, round_weights=False)
    masked = bmodel.eval()
    apply_masks(masked, keeps)
    with torch.no_grad():
        expected = masked(x)
        got = result.model(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=atol, rtol=1e-4), (got - expected).abs().max()
    assert isinstance(result.model, fx.GraphModule)
    assert not any(isinstance(m, GroupSparseLayer) for m in result.model.modules())
    return result


RESNETS = {
    "resnet20_cifar": (resnet20_cifar, (3, 3, 32, 32), "stem.0"),
    "resnet18": (lambda: resnet18(num_classes=10), (2, 3, 32, 32), "conv1"),
    "resnet_mnist": (resnet_mnist, (3, 1, 28, 28), "stem.0"),
}


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_shrunk_equals_masked_with_pruning_across_shortcuts(name):
    ctor, shape, stem = RESNETS[name]
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    plain = ctor()
    bmodel = bayescomp.bayesianize(plain, "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    streams = _streams(bmodel, stem)
    dropped = {}
    for s, (writers, _) in enumerate(streams):
        width = keeps[writers[0]].numel()
        gone = torch.randperm(width, generator=gen)[: max(2, width // 8)]
        for w in writers:
            keeps[w][gone] = False
            keeps[w][int(torch.nonzero(~torch.isin(torch.arange(width), gone))[0])] = True
        dropped[s] = gone
    x = torch.randn(*shape, generator=gen)
    result = _check_equivalent(bmodel, keeps, x)
    masks = result.masks
    for s, (writers, readers) in enumerate(streams):
        gone = dropped[s]
        # the stream's pruned channels are constant in every operand of each sum: no reader reads them
        for r in readers:
            assert not masks[r].in_mask[gone].any(), (r, masks[r].in_mask[gone])
        for w in writers:
            assert not masks[w].out_mask[gone].any()
    # inside the blocks, the first convolution's pruned channels are gone too
    convs1 = [n for n in masks if n.endswith(".conv1")]
    assert all(int(masks[n].out_mask.sum()) <= int(keeps[n].sum()) for n in convs1)
    assert any(int(masks[n].out_mask.sum()) < keeps[n].numel() for n in convs1)
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in result.model.parameters()) < n_plain
    # constants of pruned channels feeding zero-padded convolutions travel in a ones-channel, and a
    # sum whose operand lost a channel that the other still carries gets the constant back
    kinds = {type(m) for m in result.model.modules()}
    assert AppendOnes in kinds and Realign in kinds
    # one architecture entry per weighted layer, in execution order (stem first, fc last)
    arch = result.report["architecture"].split("-")
    assert len(arch) == len(result.report["layers"]) == len(keeps)
    assert result.report["layers"][0]["name"] == stem and result.report["layers"][-1]["name"] == "fc"
    assert int(arch[-1]) == int(masks["fc"].in_mask.sum())


def test_concat_net_channel_ranges_map_to_branches():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    bmodel = bayescomp.bayesianize(concat_net(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen, p=0.5)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    result = _check_equivalent(bmodel, keeps, x)
    # mix reads exactly the kept channels of branch a (first 8) then of branch b (next 16)
    expected = torch.cat([keeps["branch_a.0"], keeps["branch_b.0"]])
    assert torch.equal(result.masks["mix.0"].in_mask, expected)
    # + one ones-channel when some pruned channel carries a nonzero constant (ReLU may make it 0)
    assert result.model.get_submodule("mix.0").in_channels - int(expected.sum()) in (0, 1)
    # the stem keeps only what a branch reads: its own kept channels
    assert torch.equal(result.masks["stem.0"].out_mask, keeps["stem.0"])


def test_concat_net_branch_wholly_pruned():
    gen = torch.Generator().manual_seed(6)
    bmodel = bayescomp.bayesianize(concat_net(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    keeps["branch_a.0"][:] = False  # the branch is a constant: the cat keeps only branch b
    result = _check_equivalent(bmodel, keeps, torch.randn(2, 3, 16, 16, generator=gen))
    assert result.masks["branch_a.0"].out_mask.sum() == 0
    assert result.report["architecture"].split("-")[1] == "0"


def test_wholly_pruned_residual_branch_becomes_a_constant():
    gen = torch.Generator().manual_seed(9)
    bmodel = bayescomp.bayesianize(resnet_mnist(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    keeps["layer1.0.conv2"][:] = False  # the branch adds a constant to the identity
    result = _check_equivalent(bmodel, keeps, torch.randn(2, 1, 28, 28, generator=gen))
    # the whole branch is dead: neither of its convolutions is computed, the sum adds a stored constant
    for name in ("layer1.0.conv1", "layer1.0.conv2"):
        assert int(result.masks[name].out_mask.sum()) == 0
    layers = {entry["name"]: entry for entry in result.report["layers"]}
    assert layers["layer1.0.conv1"]["weights_kept"] == 0 and layers["layer1.0.conv1"]["bits"] is None
    assert any(n.op == "get_attr" for n in result.model.graph.nodes)
    # the report still counts the dead layers' original weights
    assert result.report["weights_total"] == sum(
        m.weight.numel() for m in resnet_mnist().modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


class _MobileBlockNet(nn.Module):
    """Expand 1×1 → depthwise 3×3 → project 1×1, a residual sum, squeeze-excitation, view-flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        x = F.adaptive_avg_pool2d(x, 4)
        return self.fc(x.view(x.size(0), -1))


def test_depthwise_residual_squeeze_excitation_and_view_flatten():
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    bmodel = bayescomp.bayesianize(_MobileBlockNet(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen, p=0.5)
    result = _check_equivalent(bmodel, keeps, torch.randn(3, 3, 12, 12, generator=gen))
    masks = result.masks
    # depthwise: input channel c and output channel c go together
    assert torch.equal(masks["dw"].in_mask, masks["dw"].out_mask)
    assert not (masks["dw"].out_mask & ~keeps["dw"]).any()
    # a channel the depthwise layer prunes is not computed by the expansion either
    assert torch.equal(masks["expand"].out_mask, keeps["expand"] & keeps["dw"])
    dw = result.model.get_submodule("dw")
    assert dw.groups == dw.in_channels == dw.out_channels == int(masks["dw"].out_mask.sum())
    # the flattened fc inputs come in blocks of 16 per channel
    assert masks["fc"].in_mask.numel() == 128


class _TwoInTwoOut(nn.Module):
    """Two inputs summed after their own convolutions; returns (logits, feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)  # zero padding counted: a constant is not constant at the border
        self.fc = nn.Linear(6, 4)

    def forward(self, a, b):
        f = self.pool(self.bn(self.conv_a(a) - 0.5 * self.conv_b(b)))
        return self.fc(f.mean((2, 3))), f


def test_two_inputs_tuple_output_and_padded_average_pool():
    gen = torch.Generator().manual_seed(8)
    bmodel = bayescomp.bayesianize(_TwoInTwoOut(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    keeps["conv_a"][:3] = False
    keeps["conv_b"][:3] = False
    keeps["conv_a"][3:] = True
    inputs = (torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 2, 5, 5, generator=gen))
    result = graph_compress(bmodel, example_input=inputs, keeps=keeps, round_weights=False)
    apply_masks(bmodel.eval(), keeps)
    with torch.no_grad():
        expected, got = bmodel(*inputs), result.model(*inputs)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape and torch.allclose(e, g, atol=1e-5, rtol=1e-4)
    # channels 0-2 are constant after the batch norm but vary after the padded pool: they are rebuilt there,
    # while the returned feature map still has all six channels
    assert got[1].shape[1] == 6
    assert any(isinstance(m, Realign) for m in result.model.modules())
    with pytest.raises(ValueError, match="example_input does not fit"):
        graph_compress(bmodel, example_input=torch.randn(1, 3, 5, 5), keeps=keeps)


# ---- the chains give the same result through graph_compress as through compress --------------------------

@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_sequential_models_match_compress(name):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    bmodel = bayescomp.bayesianize(build_model(name), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    x = torch.randn(4, 1, 28, 28, generator=gen)
    chain = compress(bmodel, masks=propagate(bmodel, keeps))
    graph = graph_compress(bmodel, example_input=x, keeps=keeps)
    assert graph.report["architecture"] == chain.report["architecture"]
    # same fields, same bits, same rates; the example input adds the multiply-adds (a conv chain's are unknown)
    macs = {k: graph.report.pop(k) for k in set(graph.report) - set(chain.report)}
    assert graph.report == chain.report
    assert set(macs) <= {"multiply_adds_total", "multiply_adds_kept", "multiply_adds_kept_pct"}
    with torch.no_grad():
        assert torch.allclose(graph.model(x), chain.model(x), atol=1e-6, rtol=1e-6)
    # thresholds instead of explicit keeps: the same decision as compress()
    t = {n: -2.0 for n in keeps}
    assert graph_compress(bmodel, t, example_input=x).report["architecture"] == compress(bmodel, t).report["architecture"]


def test_rounded_report_counts_the_shrunk_model():
    gen = torch.Generator().manual_seed(3)
    bmodel = bayescomp.bayesianize(resnet_mnist(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    x = torch.randn(2, 1, 28, 28, generator=gen)
    result = graph_compress(bmodel, example_input=x, keeps=keeps)
    report = result.report
    stored = sum(m.weight.numel() for m in result.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    total = sum(m.weight.numel() for m in resnet_mnist().modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert report["weights_kept"] == stored and report["weights_total"] == total
    assert report["cr_architecture"] == pytest.approx(total / stored)
    assert report["rounded"] is True and all(isinstance(b, int) for b in report["bits"])
    # every stored weight of a layer sits on its 2^-bits grid
    for layer in report["layers"]:
        w = result.model.get_submodule(layer["name"]).weight.double()
        step = 2.0 ** -layer["bits"]
        assert torch.allclose(w / step, torch.round(w / step), atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()


def test_input_model_is_not_modified():
    bmodel = bayescomp.bayesianize(resnet_mnist(), "gnj").train()
    before = {k: v.clone() for k, v in bmodel.state_dict().items()}
    graph_compress(bmodel, example_input=torch.randn(2, 1, 28, 28), keeps=_random_keeps(bmodel, torch.Generator().manual_seed(0)))
    assert bmodel.training
    after = bmodel.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_everything_pruned_is_a_prune_error():
    bmodel = bayescomp.bayesianize(resnet_mnist(), "gnj")
    keeps = {n: torch.zeros(m.n_groups, dtype=torch.bool) for n, m in bmodel.named_modules() if isinstance(m, GroupSparseLayer)}
    with pytest.raises(PruneError, match="every group of layer fc"):
        graph_compress(bmodel, example_input=torch.randn(1, 1, 28, 28), keeps=keeps)


# ---- unsupported constructs are named -------------------------------------------------------------------

class _Roll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.roll(self.conv(x), 1, dims=1)
        return self.fc(x.mean((2, 3)))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Branchy()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


class _Unflatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        x = self.conv(x).flatten(1)
        x = x.view(x.size(0), 4, 6, 6)
        return self.fc(x.flatten(1))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("model,shape,match", [
    (_Roll, (1, 3, 8, 8), r"node 'roll' \(roll\).*does not know how it maps channels"),
    (_Outer, (1, 3, 8, 8), r"block \(_Branchy\): torch.fx cannot trace"),
    (_Shared, (1, 4, 8, 8), r"conv: the layer is called more than once"),
])
def test_unsupported_constructs_are_named(model, shape, match):
    bmodel = bayescomp.bayesianize(model(), "gnj")
    with pytest.raises(bayescomp.UnsupportedLayerError, match=match):
        graph_compress(bmodel, example_input=torch.randn(*shape))


# ---- one engine: a Sequential holding a residual block, and a user's own channel-wise module -------------

class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))


def _sequential_with_residual() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Residual(8), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))


def test_sequential_holding_a_residual_block_compresses_through_the_one_engine():
    gen = torch.Generator().manual_seed(8)
    bmodel = bayescomp.bayesianize(_sequential_with_residual(), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    keeps["0"][3] = keeps["2.conv2"][3] = False  # channel 3 of the residual stream: zero in both operands
    x = torch.randn(4, 3, 8, 8, generator=gen)
    result = compress(bmodel, keeps=keeps, round_weights=False, example_input=x)
    assert isinstance(result.model, fx.GraphModule)  # not a line: the sum needs a graph
    masked = bmodel.eval()
    apply_masks(masked, keeps)
    with torch.no_grad():
        for xs in (x, torch.randn(16, 3, 8, 8, generator=gen)):
            expected = masked(xs)
            assert (result.model(xs) - expected).abs().max().item() <= 1e-5
    # channel 3 of the residual stream is pruned by both its writers (the stem and conv2): the sum loses it
    assert not bool(result.masks["0"].out_mask[3]) and not bool(result.masks["2.conv2"].out_mask[3])
    assert result.report["architecture"].count("-") == 4  # five weighted layers


class _Scale(nn.Module):
    """y[:, c] = s[c]·x[:, c] + t[c]: channel-wise with per-channel parameters, unknown to bayescomp."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.t = nn.Parameter(torch.linspace(-0.3, 0.4, n))

    def forward(self, x):
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return x * self.s.view(shape) + self.t.view(shape)


def _slice_scale(m: _Scale, keep: torch.Tensor) -> _Scale:
    new = _Scale(int(keep.sum()))
    with torch.no_grad():
        new.s.copy_(m.s[keep])
        new.t.copy_(m.t[keep])
    return new


def test_registered_channelwise_module_is_followed_and_sliced(monkeypatch):
    from bayescomp.compress import register_channelwise, rules

    monkeypatch.setattr(rules, "MODULE_RULES", dict(rules.MODULE_RULES))  # registration stays in this test
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), _Scale(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with pytest.raises(bayescomp.UnsupportedLayerError, match="1: unsupported.*_Scale.*register_channelwise"):
        bayescomp.bayesianize(model, "gnj", strict=True)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_channelwise(len)
    assert bayescomp.register_channelwise is register_channelwise
    register_channelwise(_Scale, slicer=_slice_scale)
    bmodel = bayescomp.bayesianize(model, "gnj")
    gen = torch.Generator().manual_seed(10)
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    keeps["0"] = torch.tensor([True, False, True, False, True, True])
    x = torch.randn(5, 2, 8, 8, generator=gen)
    result = compress(bmodel, keeps=keeps, round_weights=False)  # a chain: no example input needed
    assert isinstance(result.model, nn.Sequential)
    scales = [m for m in result.model.modules() if isinstance(m, _Scale)]
    # the pruned channels 1 and 3 are the constant relu(t[c]) after the scale: folded into the next conv
    assert len(scales) == 1 and scales[0].s.numel() == 4
    masked = bmodel.eval()
    apply_masks(masked, keeps)
    with torch.no_grad():
        assert (result.model(x) - masked(x)).abs().max().item() <= 1e-5
    # without a slicer, a module holding tensors cannot lose channels: the error says how to fix it
    register_channelwise(_Scale)
    with pytest.raises(bayescomp.UnsupportedLayerError, match="_Scale holds tensors.*slicer"):
        compress(bmodel, keeps=keeps)


def test_chain_result_stays_a_sequential_with_the_layer_names():
    gen = torch.Generator().manual_seed(11)
    bmodel = bayescomp.bayesianize(build_model("lenet300"), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen)
    result = compress(bmodel, keeps=keeps)
    assert isinstance(result.model, nn.Sequential)
    names = [n for n, _ in result.model.named_children()]
    assert "fc1" in names and names.index("fc1_select") == names.index("fc1") - 1
    assert propagate(bmodel, keeps)["fc1"].in_mask.equal(result.masks["fc1"].in_mask)
