"""Tests of compression: bit precision, rates, group masks and their propagation, and shrink().

The central property: the shrunk plain network computes exactly what the masked Bayesian network
computes at evaluation (pruned units removed, constants folded), on random and on real MNIST inputs.
Expected counts and rates are computed by hand here, not with the library's helpers.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from bayescomp import compress
from bayescomp.compress import (
    LayerMask,
    PruneError,
    Select,
    apply_masks,
    compression_masks,
    exponent_bits,
    group_masks,
    layer_bits,
    propagate,
    round_to_bits,
    weight_bits,
)
from bayescomp.compress.rates import LayerCount, rates
from bayescomp.convert import bayesianize
from bayescomp.data import load_mnist
from bayescomp.models import lenet5_caffe, lenet300_100
from bayescomp.nn import GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_test():
    try:
        x, y = load_mnist("test")
    except Exception as exc:  # pragma: no cover - only without the data set
        pytest.skip(f"MNIST not available: {exc}")
    return x[:256].clone(), y[:256].clone()


def _bits_by_hand(var: float) -> int:
    return sum(1 for t in range(1, 24) if 2.0 * var < 2.0**-t)


# ---------------------------------------------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("var,bits", [(1e-1, 2), (1e-2, 5), (1e-3, 8), (1e-4, 12), (1e-6, 18), (0.0, 23), (1e-30, 23)])
def test_weight_bits_table(var, bits):
    assert weight_bits(torch.tensor([var])).tolist() == [bits]
    assert _bits_by_hand(var) == bits


def test_weight_bits_exact_powers_and_range():
    # 2·Var = 2^-5 exactly: t = 5 does not satisfy 2Var < 2^-t strictly, so 4 bits
    assert weight_bits(torch.tensor([2.0**-6])).item() == 4
    assert weight_bits(torch.tensor([2.0**-6 * (1 - 1e-6)], dtype=torch.float64)).item() == 5
    for k in range(1, 24):  # 2·Var = 2^-k → k − 1 bits
        assert weight_bits(torch.tensor([2.0 ** -(k + 1)], dtype=torch.float64)).item() == k - 1
    assert weight_bits(torch.tensor([0.25, 1.0, 1e6])).tolist() == [0, 0, 0]
    gen = torch.Generator().manual_seed(0)
    v = torch.exp(torch.empty(500, dtype=torch.float64).uniform_(-40, 3, generator=gen))
    assert weight_bits(v).tolist() == [_bits_by_hand(x) for x in v.tolist()]
    assert weight_bits(v).dtype == torch.int64


@pytest.mark.parametrize("bad", [[-1e-3], [float("nan")], [float("inf")], [0.1, -0.1]])
def test_weight_bits_rejects_bad_variances(bad):
    with pytest.raises(ValueError):
        weight_bits(torch.tensor(bad))


def test_layer_bits():
    v = torch.tensor([1e-1, 1e-2])  # 2 and 5 bits: mean 3.5
    assert layer_bits(v) == 4
    assert layer_bits(v, reduce="max") == 5
    assert layer_bits(torch.tensor([1e-2, 1e-2, 1e-2])) == 5  # an exact mean is not bumped up
    assert layer_bits(torch.tensor([1e-1, 1e-2, 1e-2])) == 4  # mean 4.0
    gen = torch.Generator().manual_seed(1)
    v = torch.exp(torch.empty(300).uniform_(-20, -2, generator=gen))
    assert layer_bits(v) == math.ceil(sum(_bits_by_hand(x) for x in v.tolist()) / 300)
    assert layer_bits(v, reduce="max") == max(_bits_by_hand(x) for x in v.tolist())
    for scale in (2.0, 10.0, 1000.0):
        assert layer_bits(v, variance_scale=scale) <= layer_bits(v)
    assert layer_bits(v, variance_scale=1000.0) < layer_bits(v)
    assert layer_bits(v, variance_scale=0.01) > layer_bits(v)
    with pytest.raises(ValueError):
        layer_bits(torch.tensor([]))
    with pytest.raises(ValueError):
        layer_bits(v, reduce="median")
    with pytest.raises(ValueError):
        layer_bits(v, variance_scale=0.0)


@pytest.mark.parametrize("max_abs,e", [(1.0, 1), (2.0, 2), (10.0, 4), (0.5, 1), (0.1, 1), (0.0, 1), (4.0, 3), (256.0, 5)])
def test_exponent_bits(max_abs, e):
    assert exponent_bits(max_abs) == e


def test_exponent_bits_rejects_bad_input():
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            exponent_bits(bad)


@pytest.mark.parametrize("b", [0, 1, 4, 8, 13])
def test_round_to_bits(b):
    d = 2.0**-b
    gen = torch.Generator().manual_seed(b)
    w = torch.randn(10_000, generator=gen, dtype=torch.float64) * 3
    r = round_to_bits(w, b)
    q = r / d
    assert torch.equal(q, torch.round(q)), "not a multiple of 2^-b"
    assert (r - w).abs().max().item() <= d / 2 + 1e-15
    # half up
    cases = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.49, 0.51, -0.51, 2.0], dtype=torch.float64) * d
    expect = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.0, 1.0, -1.0, 2.0], dtype=torch.float64) * d
    assert torch.equal(round_to_bits(cases, b), expect)


def test_round_to_bits_range():
    with pytest.raises(ValueError):
        round_to_bits(torch.ones(2), -1)
    with pytest.raises(ValueError):
        round_to_bits(torch.ones(2), 24)


# ---------------------------------------------------------------------------------------------------------------
# rates


def test_rates_hand_example():
    e = 3
    counts = [LayerCount("a", 1000, 100, 5), LayerCount("b", 200, 50, None)]
    code = rates(counts, e, "code")
    assert code["weights_total"] == 1200 and code["weights_kept"] == 150
    assert code["weights_kept_pct"] == pytest.approx(12.5)
    assert code["cr_architecture"] == pytest.approx(8.0)
    # code: 100·(1+3+5) + 50·32 = 2500 bits; 32·1200 / 2500
    assert code["cr_fast"] == pytest.approx(38400 / 2500)
    paper = rates(counts, e, "paper")
    assert paper["cr_fast"] == pytest.approx(38400 / (100 * 5 + 50 * 32))
    assert paper["cr_architecture"] == code["cr_architecture"]
    both = [LayerCount("a", 1000, 100, 5), LayerCount("b", 200, 50, 7)]
    assert rates(both, e, "code")["cr_fast"] == pytest.approx(38400 / (100 * 9 + 50 * 11))
    assert rates(both, e, "paper")["cr_fast"] == pytest.approx(38400 / (100 * 5 + 50 * 7))
    assert rates(both, 1, "code")["cr_fast"] == pytest.approx(38400 / (100 * 7 + 50 * 9))
    with pytest.raises(ValueError):
        rates(counts, e, "csr")
    with pytest.raises(ValueError):
        rates([], e)
    with pytest.raises(ValueError):
        rates([LayerCount("a", 10, 0, 4)], e)


def test_rates_table1_lenet300():
    kept = [278 * 98, 98 * 13, 13 * 10]
    counts = [
        LayerCount("fc1", 784 * 300, kept[0], 8),
        LayerCount("fc2", 300 * 100, kept[1], 9),
        LayerCount("fc3", 100 * 10, kept[2], 14),
    ]
    r = rates(counts, 1, "paper")
    assert r["weights_total"] == 266_200
    assert r["weights_kept"] == 28_648
    assert r["weights_kept_pct"] == pytest.approx(10.76, abs=0.005)
    assert r["cr_architecture"] == pytest.approx(266_200 / 28_648)
    assert r["cr_fast"] == pytest.approx(36.8, abs=0.05)


def test_rates_table1_lenet5():
    counts = [
        LayerCount("conv1", 20 * 1 * 25, 5 * 1 * 25, 10),
        LayerCount("conv2", 50 * 20 * 25, 10 * 5 * 25, 10),
        LayerCount("fc1", 800 * 500, 76 * 16, 14),
        LayerCount("fc2", 500 * 10, 16 * 10, 13),
    ]
    r = rates(counts, 1, "paper")
    assert r["weights_total"] == 430_500
    assert r["weights_kept"] == 125 + 1250 + 1216 + 160
    assert r["cr_fast"] == pytest.approx(419, abs=0.5)
    assert r["cr_fast"] == pytest.approx(32 * 430_500 / (125 * 10 + 1250 * 10 + 1216 * 14 + 160 * 13))


# ---------------------------------------------------------------------------------------------------------------
# group masks and propagation (LeNet-300-100)


def _lenet300_with_pruned(groups: dict[str, list[int]]):
    torch.manual_seed(0)
    bm = bayesianize(lenet300_100())
    with torch.no_grad():
        for name, idx in groups.items():
            layer = bm.get_submodule(name)
            layer.z_mu.fill_(1.0)
            layer.z_logvar.fill_(-9.0)
            layer.z_logvar[idx] = 2.0
    return bm


PRUNED = {"fc1": [0, 5, 100, 783], "fc2": [3, 7, 299], "fc3": [1]}


def test_group_masks_threshold_rule():
    bm = _lenet300_with_pruned(PRUNED)
    keeps = group_masks(bm)
    assert set(keeps) == {"fc1", "fc2", "fc3"}
    for name, idx in PRUNED.items():
        k = keeps[name]
        assert k.dtype == torch.bool
        assert sorted(torch.nonzero(~k).flatten().tolist()) == sorted(idx)
    # per-layer thresholds: fc1 at 5 keeps everything (log α = 2 < 5), others keep their defaults
    keeps = group_masks(bm, {"fc1": 5.0})
    assert bool(keeps["fc1"].all())
    assert int((~keeps["fc2"]).sum()) == 3
    # one float for all
    keeps = group_masks(bm, 2.5)
    assert all(bool(k.all()) for k in keeps.values())
    # the rule is strict: log α == threshold is pruned
    with torch.no_grad():
        bm.fc3.z_logvar[4] = -2.5
    la = bm.fc3.log_alpha()[4].item()
    assert not bool(group_masks(bm, {"fc3": la})["fc3"][4])
    assert bool(group_masks(bm, {"fc3": la + 1e-3})["fc3"][4])


def test_groups_switched_off_by_group_mask_stay_pruned():
    """A group the user switched off (group_mask) is not in the compressed model, whatever its log α: the
    compressed model computes what the masked one does."""
    bm = _lenet300_with_pruned(PRUNED)
    with torch.no_grad():
        bm.fc2.group_mask[[10, 11]] = False  # log α = −9 there: the threshold alone would keep them
    keeps = group_masks(bm)
    assert sorted(torch.nonzero(~keeps["fc2"]).flatten().tolist()) == sorted(PRUNED["fc2"] + [10, 11])
    result = compress(bm.eval(), round_weights=False)
    assert result.report["architecture"] == f"{784 - 4}-{300 - 5}-{100 - 1}"
    masked = copy.deepcopy(bm)
    apply_masks(masked, keeps)
    x = torch.randn(16, 784)
    torch.testing.assert_close(result.model(x), masked(x), rtol=1e-5, atol=1e-5)


def test_propagate_lenet300():
    bm = _lenet300_with_pruned(PRUNED)
    keeps = group_masks(bm)
    m = propagate(bm, keeps)
    assert set(m) == {"fc1", "fc2", "fc3"}
    assert all(isinstance(v, LayerMask) for v in m.values())
    assert torch.equal(m["fc1"].in_mask, keeps["fc1"])
    assert torch.equal(m["fc1"].out_mask, m["fc2"].in_mask)
    assert torch.equal(m["fc2"].in_mask, keeps["fc2"])
    assert torch.equal(m["fc2"].out_mask, m["fc3"].in_mask)
    assert torch.equal(m["fc3"].in_mask, keeps["fc3"])
    assert m["fc3"].out_mask.shape == (10,) and bool(m["fc3"].out_mask.all())
    for name in m:
        assert torch.equal(m[name].group_keep, keeps[name])
    assert [int(m[n].in_mask.sum()) for n in ("fc1", "fc2", "fc3")] == [780, 297, 99]
    full = compression_masks(bm)
    for name in m:
        assert torch.equal(full[name].in_mask, m[name].in_mask) and torch.equal(full[name].out_mask, m[name].out_mask)


def test_threshold_errors():
    bm = _lenet300_with_pruned(PRUNED)
    with pytest.raises(PruneError, match="fc7"):
        group_masks(bm, {"fc7": -3.0})
    with pytest.raises(PruneError, match="fc7"):
        compress(bm, {"fc7": -3.0})
    with pytest.raises(PruneError, match="fc2"):
        compression_masks(bm, {"fc2": -100.0})
    with pytest.raises(PruneError, match="fc2"):
        compress(bm, {"fc2": -100.0})
    with pytest.raises(PruneError):
        compression_masks(bm, {"fc1": float("nan")})
    bad = group_masks(bm)
    bad["fc2"] = bad["fc2"][:-1]
    with pytest.raises(PruneError, match="fc2"):
        propagate(bm, bad)


# ---------------------------------------------------------------------------------------------------------------
# shrink: the shrunk plain model == the masked Bayesian model


def _randomise_posterior(bm: nn.Module, seed: int, logvars: dict[str, float] | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in bm.named_modules():
            if isinstance(m, GroupSparseLayer):
                m.z_mu.copy_(1.0 + 0.4 * torch.randn(m.z_mu.shape, generator=gen))
                m.z_logvar.copy_(-9.0 + torch.randn(m.z_logvar.shape, generator=gen))
                m.weight_mu.mul_(1.0 + 0.3 * torch.randn(m.weight_mu.shape, generator=gen))
                lv = (logvars or {}).get(name, -9.0)
                m.weight_logvar.copy_(lv + 0.5 * torch.randn(m.weight_logvar.shape, generator=gen))
                if m.bias_mu is not None:
                    m.bias_mu.copy_(0.2 * torch.randn(m.bias_mu.shape, generator=gen))


def _random_keeps(bm: nn.Module, seed: int, extreme: str | None) -> dict[str, torch.Tensor]:
    """Random keep-masks pruning groups in every layer; `extreme` keeps a single group."""
    gen = torch.Generator().manual_seed(seed)
    keeps = {}
    for name, m in bm.named_modules():
        if isinstance(m, GroupSparseLayer):
            k = torch.rand(m.n_groups, generator=gen) < 0.6
            k[torch.randint(m.n_groups, (1,), generator=gen)] = True
            k[0] = False  # always prune something
            if name == extreme:
                k = torch.zeros(m.n_groups, dtype=torch.bool)
                k[m.n_groups // 2] = True
            keeps[name] = k
    return keeps


def _masked_reference(bm: nn.Module, masks: dict[str, LayerMask]) -> nn.Module:
    ref = copy.deepcopy(bm)
    apply_masks(ref, {n: lm.group_keep for n, lm in masks.items() if lm.group_keep is not None})
    return ref.eval()


def _assert_plain(shrunk: nn.Module) -> None:
    allowed = (nn.Sequential, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, Select)
    for m in shrunk.modules():
        assert not isinstance(m, GroupSparseLayer)
        # torch modules, or shrink's own parameter-free helpers (Select, AppendOnes, ...)
        helper = type(m).__module__ == "bayescomp.compress.runtime" and not list(m.parameters(recurse=False))
        assert isinstance(m, allowed) or helper, type(m)
    for name, _ in shrunk.named_parameters():
        assert not name.endswith(("_mu", "_logvar")), name


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(model_name: str, seed: int):
    torch.manual_seed(seed)
    plain = lenet300_100() if model_name == "lenet300" else lenet5_caffe()
    bm = bayesianize(plain)
    _randomise_posterior(bm, seed)
    return plain, bm


@pytest.mark.parametrize(
    "model_name,extreme",
    [("lenet300", None), ("lenet300", "fc1"), ("lenet300", "fc2"), ("lenet300", "fc3"),
     ("lenet5", None), ("lenet5", "conv1"), ("lenet5", "conv2"), ("lenet5", "fc1"), ("lenet5", "fc2")],
)
def test_shrink_equals_masked_bayesian_model(model_name, extreme, mnist_test):
    plain, bm = _build(model_name, seed=11)
    keeps = _random_keeps(bm, seed=12, extreme=extreme)
    if model_name == "lenet5" and extreme == "fc1":
        keeps["conv2"][400 // 16] = True  # fc1's single kept input lies in channel 25: keep that channel
    decision = propagate(bm, keeps)
    result = compress(bm, masks=decision, round_weights=False)
    shrunk = result.model
    ref = _masked_reference(bm, result.masks)
    _assert_plain(shrunk)
    assert not shrunk.training
    assert _n_params(shrunk) < _n_params(plain)
    gen = torch.Generator().manual_seed(13)
    x_rand = torch.randn(32, 1, 28, 28, generator=gen)
    x_real = mnist_test[0][:64]
    with torch.no_grad():
        for x in (x_rand, x_real):
            expected = ref(x)
            got = shrunk(x)
            assert got.shape == expected.shape == (x.shape[0], 10)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            # the masks matter: the unmasked Bayesian model differs
            assert (bm.eval()(x) - expected).abs().max() > 1e-3

    # kept counts by hand
    if model_name == "lenet300":
        arch = [int(keeps["fc1"].sum()), int(keeps["fc2"].sum()), int(keeps["fc3"].sum())]
        lin = [m for m in shrunk.modules() if isinstance(m, nn.Linear)]
        assert [tuple(m.weight.shape) for m in lin] == [(arch[1], arch[0]), (arch[2], arch[1]), (10, arch[2])]
    else:
        fc1_in = keeps["fc1"] & keeps["conv2"].repeat_interleave(16)
        conv2_out = fc1_in.view(50, 16).any(1)
        arch = [int(keeps["conv1"].sum()), int(conv2_out.sum()), int(fc1_in.sum()), int(keeps["fc2"].sum())]
        convs = [m for m in shrunk.modules() if isinstance(m, nn.Conv2d)]
        lin = [m for m in shrunk.modules() if isinstance(m, nn.Linear)]
        assert [tuple(m.weight.shape) for m in convs] == [(arch[0], 1, 5, 5), (arch[1], arch[0], 5, 5)]
        assert [tuple(m.weight.shape) for m in lin] == [(arch[3], arch[2]), (10, arch[3])]
    assert result.report["architecture"] == "-".join(map(str, arch))
    n_kept = sum(m.weight.numel() for m in shrunk.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert result.report["weights_kept"] == n_kept
    assert result.report["weights_total"] == (266_200 if model_name == "lenet300" else 430_500)


def test_shrink_removes_conv_channel_unused_downstream():
    """A conv2 channel kept by its own gate but whose 16 fc1 inputs are all pruned is removed too."""
    plain, bm = _build("lenet5", seed=21)
    keeps = _random_keeps(bm, seed=22, extreme=None)
    c = int(torch.nonzero(keeps["conv2"])[0])
    keeps["fc1"][c * 16 : (c + 1) * 16] = False
    decision = propagate(bm, keeps)
    assert not bool(decision["conv2"].out_mask[c])
    assert int(decision["conv2"].out_mask.sum()) < int(keeps["conv2"].sum())
    result = compress(bm, masks=decision, round_weights=False)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[1].out_channels == int(keeps["conv2"].sum()) - 1
    ref = _masked_reference(bm, result.masks)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_compress_with_thresholds_end_to_end():
    bm = _lenet300_with_pruned(PRUNED)
    result = compress(bm, round_weights=False)
    assert result.report["architecture"] == "780-297-99"
    ref = _masked_reference(bm, result.masks)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ref(x), atol=1e-5, rtol=1e-5)


def _bn_chain(padding2: int) -> nn.Sequential:
    torch.manual_seed(5)
    h = 8 if padding2 == 1 else 6
    plain = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 6, 3, padding=1),
        bn=nn.BatchNorm2d(6),
        relu=nn.ReLU(),
        conv2=nn.Conv2d(6, 4, 3, padding=padding2),
        flatten=nn.Flatten(),
        fc=nn.Linear(4 * h * h, 3),
    ))
    bn = plain.bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -1.0, 0.2, 2.0, -0.5, 0.1]))
        bn.running_var.copy_(torch.tensor([1.5, 0.7, 2.0, 0.9, 1.2, 0.6]))
        bn.weight.copy_(torch.tensor([1.2, 0.8, -0.7, 1.0, 1.5, 0.9]))
        bn.bias.copy_(torch.tensor([0.1, 0.5, -0.2, -0.1, 0.3, 0.05]))
    return plain


@pytest.mark.parametrize("padding2", [0, 1])
def test_shrink_batchnorm_chain(padding2):
    plain = _bn_chain(padding2)
    bm = bayesianize(plain)
    _randomise_posterior(bm, seed=31)
    bn = plain.bn
    # the constant a pruned conv1 channel carries after BN and ReLU: channels 1 and 4 > 0, channel 3 = 0
    const = torch.relu(bn.bias + bn.weight * (0 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert const[1] > 0 and const[4] > 0 and const[3] == 0
    keeps = {
        "conv1": torch.tensor([True, False, True, False, False, True]),
        "conv2": torch.tensor([True, False, True, True]),
        "fc": torch.rand(bm.fc.n_groups, generator=torch.Generator().manual_seed(32)) < 0.8,
    }
    decision = propagate(bm, keeps)
    result = compress(bm, masks=decision, round_weights=False)
    shrunk = result.model
    _assert_plain(shrunk)
    ref = _masked_reference(bm, result.masks)
    x = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(33))
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), ref(x), atol=1e-5, rtol=1e-5)
        assert (bm.eval()(x) - ref(x)).abs().max() > 1e-3
    convs = [m for m in shrunk.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in shrunk.modules() if isinstance(m, nn.BatchNorm2d)]
    if padding2 == 0:
        # constant channels are folded into conv2's bias: only the 3 gated-on channels remain
        assert convs[0].out_channels == 3 and convs[1].in_channels == 3 and bns[0].num_features == 3
        torch.testing.assert_close(bns[0].running_mean, bn.running_mean[[0, 2, 5]])
    else:
        # a non-zero constant feeding a zero-padded conv is not a bias (the border sees the padding's zeros):
        # it is carried either by keeping its channel or by an explicit channel of ones; the zero channel 3 goes
        assert convs[0].out_channels <= 5 and bns[0].num_features == convs[0].out_channels
        assert 3 <= convs[1].in_channels <= 5
        assert not bool(decision["conv2"].in_mask[3])
        assert bool(decision["conv2"].in_mask[[0, 2, 5]].all())
    assert convs[1].out_channels == 3


def test_compress_rounding(mnist_test):
    torch.manual_seed(41)
    bm = bayesianize(lenet5_caffe())
    _randomise_posterior(bm, seed=41, logvars={"conv1": -6.0, "conv2": -8.0, "fc1": -11.0, "fc2": -7.0})
    keeps = _random_keeps(bm, seed=42, extreme=None)
    decision = propagate(bm, keeps)
    rounded = compress(bm, masks=decision, round_weights=True)
    exact = compress(bm, masks=decision, round_weights=False)
    names = ["conv1", "conv2", "fc1", "fc2"]
    assert set(rounded.bits) == set(names)
    assert rounded.report["bits"] == [rounded.bits[n] for n in names]
    assert rounded.report["rounded"] is True and exact.report["rounded"] is False
    assert len(set(rounded.bits.values())) > 1  # distinct precisions per layer
    # bits by hand from the kept weights' posterior variances
    for n in names:
        m, lm = bm.get_submodule(n), decision[n]
        var = m.posterior_variance().detach()
        keep = lm.out_mask.view(-1, *([1] * (var.dim() - 1))) & lm.in_mask.view(1, -1, *([1] * (var.dim() - 2)))
        if m.group_dim == 0:
            keep = keep & lm.group_keep.view(-1, *([1] * (var.dim() - 1)))
        kept = var[keep.expand_as(var)].double().tolist()
        assert rounded.bits[n] == math.ceil(sum(_bits_by_hand(v) for v in kept) / len(kept) - 1e-9), n
    w_r = [m.weight.detach() for m in rounded.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    w_e = [m.weight.detach() for m in exact.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for n, wr, we in zip(names, w_r, w_e, strict=True):
        b = rounded.bits[n]
        q = wr.double() * 2.0**b
        assert torch.equal(q, torch.round(q)), f"{n}: weights not multiples of 2^-{b}"
        assert (wr - we).abs().max().item() <= 2.0 ** -(b + 1) + 1e-7
        assert not torch.equal(wr, we)
    x = mnist_test[0]
    with torch.no_grad():
        agree = (rounded.model(x).argmax(1) == exact.model(x).argmax(1)).float().mean().item()
    assert agree >= 0.95
    # the rates in the report follow the stated accounting
    rep = rounded.report
    e = rep["exponent_bits"]
    kept = [layer["weights_kept"] for layer in rep["layers"]]
    assert kept == [w.numel() for w in w_r]
    stored_code = sum(k * (1 + e + b) for k, b in zip(kept, rep["bits"], strict=True))
    assert rep["cr_fast"] == pytest.approx(32 * 430_500 / stored_code)
    paper = compress(bm, masks=decision, bit_accounting="paper").report
    assert paper["cr_fast"] == pytest.approx(32 * 430_500 / sum(k * b for k, b in zip(kept, rep["bits"], strict=True)))
    assert paper["cr_architecture"] == pytest.approx(430_500 / sum(kept))
    max_abs = max(w.abs().max().item() for w in w_e)
    assert e == math.ceil(math.log2(max(math.log2(max_abs), 0.0) + 1.0) + 1.0)


def test_compress_does_not_modify_input():
    plain, bm = _build("lenet5", seed=51)
    bm.train()
    before = copy.deepcopy(bm.state_dict())
    keeps = _random_keeps(bm, seed=52, extreme=None)
    compress(bm, masks=propagate(bm, keeps))
    compress(bm, thresholds=-8.5)
    assert bm.training
    after = bm.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(bool(m.group_mask.all()) for m in bm.modules() if isinstance(m, GroupSparseLayer))
    bm.eval()
    compress(bm, thresholds=-8.5)
    assert not bm.training


def _all_weights_on_grid(result) -> dict[str, bool]:
    weighted = [m for m in result.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    names = [layer["name"] for layer in result.report["layers"]]
    out = {}
    for n, m in zip(names, weighted, strict=True):
        q = m.weight.detach().double() * 2.0 ** result.bits[n]
        out[n] = bool(torch.equal(q, torch.round(q)))
    return out


def test_rounding_with_folded_constants_padding0():
    bm = bayesianize(_bn_chain(0))
    _randomise_posterior(bm, seed=61)
    keeps = {"conv1": torch.tensor([True, False, True, False, False, True]),
             "conv2": torch.tensor([True, False, True, True]), "fc": torch.ones(bm.fc.n_groups, dtype=torch.bool)}
    result = compress(bm, masks=propagate(bm, keeps), round_weights=True)
    assert all(_all_weights_on_grid(result).values()), _all_weights_on_grid(result)


def test_rounding_with_folded_constants_padding1():
    bm = bayesianize(_bn_chain(1))
    _randomise_posterior(bm, seed=61)
    keeps = {"conv1": torch.tensor([True, False, True, False, False, True]),
             "conv2": torch.tensor([True, False, True, True]), "fc": torch.ones(bm.fc.n_groups, dtype=torch.bool)}
    result = compress(bm, masks=propagate(bm, keeps), round_weights=True)
    assert all(_all_weights_on_grid(result).values()), _all_weights_on_grid(result)


def test_edited_layer_masks_are_refused_by_name():
    """A decision's group keep-masks decide; in/out masks that do not follow from them are refused, not cut."""
    bm = _lenet300_with_pruned(PRUNED)
    decision = compression_masks(bm)
    decision["fc2"].out_mask = decision["fc2"].out_mask.clone()
    decision["fc2"].out_mask[0] = not bool(decision["fc2"].out_mask[0])
    with pytest.raises(PruneError, match="fc2: its in/out masks are not those its group keep-masks give"):
        compress(bm, masks=decision)
    with pytest.raises(ValueError, match="masks= or keeps="):
        compress(bm, masks=compression_masks(bm), keeps=group_masks(bm))
