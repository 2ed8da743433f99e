"""Size targets: compress(target_kept=...) and compress(max_multiply_adds=...) meet the budget within one group per
layer, on the compressed model as built."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bayescomp
from bayescomp.compress import PruneError, SizeTarget, apply_masks
from bayescomp.compress.budget import size_target_thresholds
from bayescomp.models import lenet5_caffe, lenet300_100, resnet_mnist
from bayescomp.nn import GroupSparseLayer

MNIST = (2, 1, 28, 28)


def _spread(ctor, prior: str, seed: int) -> nn.Module:
    """The Bayesian twin of ctor(), its scores spread over several units of log α, different in every layer (as
    after training)."""
    torch.manual_seed(seed)
    bmodel = bayescomp.bayesianize(ctor(), prior=prior)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bmodel.modules():
            if isinstance(m, GroupSparseLayer):
                noise = 1.5 * torch.randn(m.n_groups, generator=gen)
                if hasattr(m, "z_mu"):  # normal-Jeffreys: z's mean
                    m.z_mu.copy_(torch.exp(noise))
                else:  # horseshoe: the log-normal mean of the local scale
                    m.a_mu.add_(noise)
    return bmodel.eval()


def _weights(result) -> int:
    return result.report["weights_kept"]


def _macs(result) -> int:
    return result.report["multiply_adds_kept"]


def _check_within_one_group(bmodel, result, measure, budget, x) -> int:
    """Taking back any layer's lowest-score removed group (with its ties) makes the model exceed the budget;
    returns how many layers had a group to take back (the others keep every group)."""
    keeps = {n: lm.group_keep.clone() for n, lm in result.masks.items() if lm.group_keep is not None}
    checked = 0
    for name, keep in keeps.items():
        m = bmodel.get_submodule(name)
        la = m.log_alpha().detach().cpu()
        removed = ~keep & m.group_mask.cpu() & torch.isfinite(la)
        if not bool(removed.any()):
            continue
        back = keep | (removed & (la == la[removed].min()))
        bigger = bayescomp.compress(bmodel, keeps={**keeps, name: back}, example_input=x)
        assert measure(bigger) > budget, name
        checked += 1
    return checked


def test_target_kept_lenet300():
    b = _spread(lenet300_100, "gnj", 0)
    x = torch.zeros(*MNIST)
    result = bayescomp.compress(b, target_kept=0.1, example_input=x)
    rep = result.report
    budget = math.floor(0.1 * rep["weights_total"])
    assert rep["weights_kept"] <= budget
    assert rep["weights_kept_pct"] <= 10.0
    st = rep["size_target"]
    assert st["rule"] == "size-target" and st["target_kept"] == 0.1 and st["budget"] == budget
    assert st["reached"] == rep["weights_kept"]
    assert st["full"] == rep["weights_total"]
    assert _check_within_one_group(b, result, _weights, budget, x) == 3
    # each layer's threshold is the score of its lowest-score removed group: keep while log α < it
    for name, lm in result.masks.items():
        la = b.get_submodule(name).log_alpha().detach()
        assert float(la[~lm.group_keep].min()) == pytest.approx(rep["thresholds"][name], abs=0)
    # the chain starts fully connected: its multiply-adds are known without an example input
    again = bayescomp.compress(b, target_kept=0.1)
    assert again.report["weights_kept"] == rep["weights_kept"]
    assert again.report["multiply_adds_total"] == 266_200


def test_max_multiply_adds_lenet5():
    b = _spread(lenet5_caffe, "ghs", 1)
    x = torch.zeros(*MNIST)
    budget = 300_000
    result = bayescomp.compress(b, max_multiply_adds=budget, example_input=x)
    rep = result.report
    assert rep["multiply_adds_total"] == 2_293_000
    assert rep["multiply_adds_kept"] <= budget
    assert rep["multiply_adds_kept"] == bayescomp.multiply_adds(result.model, x[:1])
    assert rep["size_target"]["measure"] == "multiply_adds" and rep["size_target"]["budget"] == budget
    # (a layer may keep every group: one whose inputs are all cut upstream costs nothing, so it fits)
    assert _check_within_one_group(b, result, _macs, budget, x) >= 2


def test_target_on_a_residual_graph():
    b = _spread(resnet_mnist, "gnj", 2)
    x = torch.zeros(*MNIST)
    result = bayescomp.compress(b, target_kept=0.3, example_input=x, round_weights=False)
    budget = math.floor(0.3 * result.report["weights_total"])
    assert result.report["weights_kept"] <= budget
    assert _check_within_one_group(b, result, _weights, budget, x) >= 1
    # the compressed graph computes what the masked Bayesian model computes
    masked = copy.deepcopy(b)
    apply_masks(masked, {n: lm.group_keep for n, lm in result.masks.items() if lm.group_keep is not None})
    xs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = masked.eval()(xs)
        assert (result.model(xs) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


class _ConvOut(nn.Module):
    """A fully convolutional net whose output is a convolution's channels (they keep their width)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3))


def test_output_convolution_keeps_width():
    b = _spread(_ConvOut, "gnj", 3)
    x = torch.zeros(1, 1, 6, 6)
    result = bayescomp.compress(b, max_multiply_adds=5000, example_input=x)
    assert result.masks["out"].out_mask.all()
    assert result.report["multiply_adds_kept"] <= 5000
    # the floor: a and b keep one channel each (9 multiply-adds per pixel each), out all 5 (1 each), 6·6 pixels
    assert result.report["size_target"]["floor"] == 36 * 9 + 36 * 9 + 36 * 5
    assert _check_within_one_group(b, result, _macs, 5000, x) == 2


def test_below_the_floor_names_it():
    b = _spread(lenet300_100, "gnj", 0)
    with pytest.raises(PruneError, match=r"below the floor.*keeps \d+ weights"):
        bayescomp.compress(b, target_kept=1e-6)
    with pytest.raises(PruneError, match="below the floor"):
        bayescomp.compress(b, max_multiply_adds=1)


def test_target_one_keeps_everything():
    b = _spread(lenet300_100, "gnj", 0)
    result = bayescomp.compress(b, target_kept=1.0)
    assert result.report["weights_kept"] == result.report["weights_total"]


def test_rule_object_and_choices():
    b = _spread(lenet300_100, "gnj", 0)
    rule = SizeTarget(target_kept=0.05)
    choices = rule.choose(b)
    assert {c.method for c in choices.values()} == {"size-target"}
    assert choices == size_target_thresholds(b, target_kept=0.05)
    by_rule = bayescomp.compress(b, rule)
    by_floats = bayescomp.compress(b, {n: c.value for n, c in choices.items()})
    assert by_rule.report["weights_kept"] == by_floats.report["weights_kept"]
    assert by_rule.report["size_target"]["target_kept"] == 0.05
    assert "size_target" not in by_floats.report


@pytest.mark.parametrize("kwargs,match", [
    ({"target_kept": 0.0}, "target_kept"),
    ({"target_kept": 1.5}, "target_kept"),
    ({"max_multiply_adds": 0}, "max_multiply_adds"),
    ({"max_multiply_adds": 2.5}, "max_multiply_adds"),
    ({"target_kept": 0.1, "max_multiply_adds": 100}, "one size target"),
    ({"target_kept": 0.1, "thresholds": -3.0}, "not both"),
])
def test_bad_targets(kwargs, match):
    b = bayescomp.bayesianize(lenet300_100(), prior="gnj")
    with pytest.raises(ValueError, match=match):
        bayescomp.compress(b, **kwargs)


def test_multiply_adds_of_a_conv_chain_need_the_input():
    b = bayescomp.bayesianize(lenet5_caffe(), prior="gnj")
    with pytest.raises(ValueError, match="example_input"):
        bayescomp.compress(b, max_multiply_adds=100_000)
