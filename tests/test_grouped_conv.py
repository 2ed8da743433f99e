"""Grouped convolutions (groups > 1; depthwise with a channel multiplier), 2-d and 1-d, both priors.

Output channel o of a grouped convolution belongs to convolution group o // (out/groups) and reads only
that group's inputs. Pruning leaves each group its own kept outputs and inputs; the rebuilt layer must
compute exactly what the masked Bayesian layer computes (`surgery.Builder._emit_grouped` says how).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_conv1d import perturb, random_keeps, shrunk_and_masked
from torch import fx, nn

import bayescomp
from bayescomp.compress import AppendOnes, Select, compress, kept_weights
from bayescomp.compress.surgery import block_diagonal
from bayescomp.nn import GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def grouped_chain(conv=nn.Conv2d, bn=nn.BatchNorm2d) -> nn.Sequential:
    """A dense conv, a padded conv with groups=4 behind a batch norm (pruned channels are nonzero constants
    there, carried by a channel of ones), an unpadded 1×1 conv with groups=4, pooling and a Linear."""
    torch.manual_seed(3)
    return nn.Sequential(
        conv(6, 16, 3, padding=1), bn(16), nn.ReLU(),
        conv(16, 32, 3, padding=1, groups=4), bn(32), nn.ReLU(),
        conv(32, 16, 1, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 ** (2 if conv is nn.Conv2d else 1), 5),
    )


def _grouped_convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1]


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
@pytest.mark.parametrize("nd", [2, 1])
def test_groups_4_pruned_inside_groups_equals_the_masked_model(prior, nd):
    conv, bn, shape = (nn.Conv2d, nn.BatchNorm2d, (5, 6, 7, 7)) if nd == 2 else (nn.Conv1d, nn.BatchNorm1d, (5, 6, 7))
    gen = torch.Generator().manual_seed(8)
    bmodel = bayescomp.bayesianize(grouped_chain(conv, bn), prior)
    perturb(bmodel, gen)
    keeps = random_keeps(bmodel, gen)
    keeps["6"][4:8] = False  # the 1×1 layer loses a whole group: its inputs go with it
    x = torch.randn(*shape, generator=gen)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x)
    assert got.shape == expected.shape == (5, 5)
    assert (got - expected).abs().max() <= 1e-5
    seq = result.model
    assert any(isinstance(m, AppendOnes) for m in seq.modules())  # the padded grouped conv folds constants
    last = seq.get_submodule("6")
    assert last.groups == 3 and type(last) is conv
    # a kept filter reads only kept inputs of its own group: the 1×1 layer's dense equivalent has no
    # weight outside the blocks of its groups' kept inputs
    lm = result.masks["6"]
    assert not lm.in_mask[8:16].any()  # the group whose outputs all went reads nothing
    # the weights it needs, whose variances set its bits: kept outputs × the kept inputs of their group; the
    # rebuilt layer holds those and zeros (padding), and the report counts what it holds
    per_in = 32 // 4
    needed = sum(int(lm.in_mask[(o // 4) * per_in:(o // 4 + 1) * per_in].sum())
                 for o in torch.nonzero(lm.out_mask).flatten().tolist())
    assert int(kept_weights(bmodel.get_submodule("6"), lm).sum()) == needed
    assert int(torch.count_nonzero(last.weight)) == needed
    layer = next(d for d in result.report["layers"] if d["name"] == "6")
    assert layer["weights_kept"] == last.weight.numel()


def test_even_pruning_needs_no_padding():
    """Where every group keeps as many outputs and inputs, the rebuilt layer holds no zero filter and no Select."""
    plain = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 3))
    bmodel = bayescomp.bayesianize(plain, "gnj")
    keeps = {"0": torch.tensor([True, False, True] * 4), "3": torch.ones(192, dtype=torch.bool)}
    x = torch.randn(2, 8, 6, 6)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x)
    assert (got - expected).abs().max() <= 1e-5
    conv = result.model.get_submodule("0")
    assert (conv.in_channels, conv.out_channels, conv.groups) == (8, 8, 4)
    assert bool((conv.weight.flatten(1).abs().sum(1) > 0).all())
    assert not any(isinstance(m, Select) for m in result.model.modules() if m is not result.model)


def test_uneven_pruning_pads_with_zero_filters_that_are_dropped():
    plain = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 3))
    bmodel = bayescomp.bayesianize(plain, "gnj")
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[0, 1, 2, 3, 9]] = True  # group 0 keeps 3 outputs, group 1 one, group 2 none, group 3 one
    keeps = {"0": keep, "3": torch.ones(192, dtype=torch.bool)}
    x = torch.randn(2, 8, 6, 6)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x)
    assert (got - expected).abs().max() <= 1e-5
    conv = result.model.get_submodule("0")
    assert (conv.in_channels, conv.out_channels, conv.groups) == (6, 9, 3)  # 3 live groups, 3 wide
    nonzero = int((conv.weight.flatten(1).abs().sum(1) > 0).sum())
    assert nonzero == 5  # the kept filters; the others are zero padding
    # the padding outputs are dropped right behind the layer: the next layer sees the 5 kept channels
    assert result.model[-1].in_features == 5 * 16
    assert int(kept_weights(bmodel[0], result.masks["0"]).sum()) == 5 * 2 * 9
    assert result.report["layers"][0]["weights_kept"] == conv.weight.numel() == 9 * 2 * 9  # what the layer holds


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
@pytest.mark.parametrize("nd", [2, 1])
def test_depthwise_with_channel_multiplier_2_equals_the_masked_model(prior, nd):
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if nd == 2 else (nn.Conv1d, nn.BatchNorm1d)
    torch.manual_seed(5)
    side = 8
    plain = nn.Sequential(
        conv(3, 8, 1), bn(8), nn.ReLU(),
        conv(8, 16, 3, padding=1, groups=8), bn(16), nn.ReLU(),  # depthwise, multiplier 2
        conv(16, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * side ** nd, 4),
    )
    gen = torch.Generator().manual_seed(9)
    bmodel = bayescomp.bayesianize(plain, prior)
    perturb(bmodel, gen)
    keeps = random_keeps(bmodel, gen, p=0.5)
    keeps["3"][[2, 3]] = False  # one input channel's both outputs go: that input is not read
    x = torch.randn(3, 3, *([side] * nd), generator=gen)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x)
    assert (got - expected).abs().max() <= 1e-5
    assert not result.masks["3"].in_mask[1]
    assert not result.masks["0"].out_mask[1]  # so the first layer does not compute it


def test_depthwise_without_multiplier_still_shrinks_input_and_output_together():
    plain = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    bmodel = bayescomp.bayesianize(plain, "gnj")
    gen = torch.Generator().manual_seed(2)
    perturb(bmodel, gen)
    keeps = random_keeps(bmodel, gen)
    result, got, expected = shrunk_and_masked(bmodel, keeps, torch.randn(2, 3, 6, 6, generator=gen))
    assert (got - expected).abs().max() <= 1e-5
    dw = result.model.get_submodule("2")
    k = int(result.masks["2"].out_mask.sum())
    assert (dw.in_channels, dw.out_channels, dw.groups) == (k, k, k)


class GroupedResidual(nn.Module):
    """A stream of 8 channels, a block with a grouped conv (groups=2) whose output is added to it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 8, 1, groups=4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.b(F.relu(self.a(h)))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_grouped_convs_in_a_residual_graph_equal_the_masked_model(prior):
    torch.manual_seed(4)
    bmodel = bayescomp.bayesianize(GroupedResidual(), prior)
    gen = torch.Generator().manual_seed(4)
    perturb(bmodel, gen)
    keeps = random_keeps(bmodel, gen)
    keeps["stem"][4:] = False  # group 1 of `a` has no varying input: its kept outputs are bias only
    keeps["b"][4:] = False
    x = torch.randn(3, 3, 6, 6, generator=gen)
    result, got, expected = shrunk_and_masked(bmodel, keeps, x, example_input=x[:1])
    assert isinstance(result.model, fx.GraphModule)
    assert (got - expected).abs().max() <= 1e-5


def test_block_diagonal_is_the_grouped_convolution():
    torch.manual_seed(0)
    w = torch.randn(12, 2, 3, 3)
    x = torch.randn(2, 8, 5, 5)
    dense = block_diagonal(w, 4)
    assert dense.shape == (12, 8, 3, 3)
    assert torch.allclose(F.conv2d(x, dense), F.conv2d(x, w, groups=4), atol=1e-5)


def test_compressed_grouped_model_saves_and_loads(tmp_path):
    gen = torch.Generator().manual_seed(12)
    bmodel = bayescomp.bayesianize(grouped_chain(), "gnj")
    perturb(bmodel, gen)
    result = compress(bmodel, keeps=random_keeps(bmodel, gen))
    assert _grouped_convs(result.model)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    for name in ("m.bcz", "m.pt"):
        bayescomp.save(result, tmp_path / name)
        back = bayescomp.load(tmp_path / name)
        assert [m.groups for m in _grouped_convs(back)] == [m.groups for m in _grouped_convs(result.model)]
        with torch.no_grad():
            assert torch.equal(back(x), result.model(x))


def test_bayesianize_accepts_grouped_convolutions():
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Conv1d(8, 8, 1, groups=2))
    bmodel = bayescomp.bayesianize(plain, "ghs")
    layer = bmodel[0]
    assert isinstance(layer, GroupSparseLayer) and layer.groups == 4 and layer.weight_mu.shape == (8, 1, 3, 3)
    assert layer.log_alpha().shape == (8,)
    assert bmodel[1].groups == 2 and bmodel[1].weight_mu.shape == (8, 4, 1)


@pytest.mark.parametrize("nd", [2, 1])
def test_compressed_grouped_model_exports_to_onnx(nd, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from bayescomp.io.export import export_onnx

    conv, bn, shape = (nn.Conv2d, nn.BatchNorm2d, (6, 7, 7)) if nd == 2 else (nn.Conv1d, nn.BatchNorm1d, (6, 7))
    gen = torch.Generator().manual_seed(1)
    bmodel = bayescomp.bayesianize(grouped_chain(conv, bn), "gnj")
    perturb(bmodel, gen)
    result = compress(bmodel, keeps=random_keeps(bmodel, gen))
    session = ort.InferenceSession(str(export_onnx(result.model, tmp_path / "m.onnx", shape)))
    x = torch.randn(3, *shape, generator=gen)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), result.model(x), atol=1e-5)
