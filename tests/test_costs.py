"""multiply_adds: counts against arithmetic by hand and against PyTorch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bayescomp
from bayescomp.models import lenet5_caffe, lenet300_100, resnet20_cifar


def _flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """PyTorch's FLOP count of one pass (2 per multiply-add of a matrix product or convolution) / 2, per example."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2 // x.shape[0]


def test_lenet300_by_hand():
    # 784·300 + 300·100 + 100·10
    assert bayescomp.multiply_adds(lenet300_100(), torch.zeros(1, 1, 28, 28)) == 266_200


def test_lenet5_by_hand():
    # conv1: 20 channels · 24·24 outputs · 1·5·5; conv2: 50 · 8·8 · 20·5·5; fc1: 800·500; fc2: 500·10
    expected = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 500 + 800 * 500 + 500 * 10
    assert expected == 2_293_000
    assert bayescomp.multiply_adds(lenet5_caffe(), torch.zeros(1, 1, 28, 28)) == expected


def test_batch_counts_per_example():
    model = lenet5_caffe()
    assert bayescomp.multiply_adds(model, torch.zeros(3, 1, 28, 28)) == 2_293_000


def test_bayesian_twin_counts_as_plain():
    for ctor in (lenet300_100, lenet5_caffe):
        plain = ctor()
        for prior in ("gnj", "ghs"):
            b = bayescomp.bayesianize(plain, prior=prior)
            b.train()
            x = torch.zeros(2, 1, 28, 28)
            assert bayescomp.multiply_adds(b, x) == bayescomp.multiply_adds(plain, x)
            assert b.training  # the mode is given back


class _Mixed(nn.Module):
    """Grouped and depthwise 2-d convolutions, a 1-d convolution, a Linear on a 3-D input, a layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 12, 3, stride=2, padding=1, groups=2)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c1d = nn.Conv1d(12, 6, 5, dilation=2)
        self.seq = nn.Linear(6, 7)
        self.head = nn.Linear(7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.relu(self.c1(x)))           # (n, 12, 5, 5)
        h = self.c1d(h.flatten(2))                     # (n, 6, 17)
        h = self.seq(h.transpose(1, 2))                # (n, 17, 7)
        return self.head(torch.relu(self.head(h)))     # used twice


@pytest.mark.parametrize("ctor,shape", [
    (lenet300_100, (2, 1, 28, 28)),
    (lenet5_caffe, (2, 1, 28, 28)),
    (resnet20_cifar, (1, 3, 32, 32)),
    (_Mixed, (3, 4, 9, 9)),
])
def test_matches_flop_counter(ctor, shape):
    torch.manual_seed(0)
    model = ctor()
    x = torch.randn(*shape)
    assert bayescomp.multiply_adds(model, x) == _flop_counter_macs(model, x)


def test_mixed_by_hand():
    # c1: 12·5·5 outputs · 2·9; dw: 12·5·5 · 1·9; c1d: 6·17 · 12·5; seq: 17·7 · 6; head twice: 2 · 17·7 · 7
    expected = 12 * 25 * 18 + 12 * 25 * 9 + 6 * 17 * 60 + 17 * 7 * 6 + 2 * 17 * 7 * 7
    assert bayescomp.multiply_adds(_Mixed(), torch.zeros(1, 4, 9, 9)) == expected


def test_compressed_model_counts_its_kept_units():
    torch.manual_seed(0)
    b = bayescomp.bayesianize(lenet300_100(), prior="gnj")
    layers = [m for m in b.modules() if isinstance(m, bayescomp.nn.GroupSparseLayer)]
    keeps_n = (100, 30, 20)  # inputs kept of each layer
    with torch.no_grad():
        for m, k in zip(layers, keeps_n, strict=True):
            m.z_mu.fill_(1e-4)  # log α of these is huge: pruned at the default threshold
            m.z_mu[:k] = 1.0
    result = bayescomp.compress(b, example_input=torch.zeros(1, 1, 28, 28))
    expected = 100 * 30 + 30 * 20 + 20 * 10
    assert bayescomp.multiply_adds(result.model, torch.zeros(1, 1, 28, 28)) == expected
    assert result.report["multiply_adds_total"] == 266_200
    assert result.report["multiply_adds_kept"] == expected
    assert result.report["multiply_adds_kept_pct"] == pytest.approx(100 * expected / 266_200)


def test_not_a_batch():
    with pytest.raises(ValueError, match="example_input must be a batch"):
        bayescomp.multiply_adds(lenet300_100(), torch.tensor(1.0))
