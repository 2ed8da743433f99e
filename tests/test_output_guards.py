"""compress(): the model's output width is preserved, and a compression that keeps almost everything warns."""

import warnings

import pytest
import torch
from torch import nn

import bayescomp
from bayescomp import CompressionWarning
from bayescomp.compress import apply_masks


def _equal_to_masked(bmodel, result, x):
    bmodel.eval()
    apply_masks(bmodel, {n: lm.group_keep for n, lm in result.masks.items() if lm.group_keep is not None})
    with torch.no_grad():
        return (bmodel(x) - result.model(x)).abs().max().item()


def test_a_final_convolution_keeps_every_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bmodel = bayescomp.bayesianize(model)
    x = torch.randn(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        result = bayescomp.compress(bmodel, {"0": 0.0, "2": -100.0}, round_weights=False, example_input=x)
    assert bool(result.masks["2"].group_keep.all()) and bool(result.masks["2"].out_mask.all())
    out = result.model(x)
    assert out.shape == (4, 5) and bool((out.std(0) > 0).all())  # no class logit is a constant
    assert _equal_to_masked(bmodel, result, x) <= 1e-5


def test_a_final_linear_keeps_every_output():
    torch.manual_seed(0)
    bmodel = bayescomp.bayesianize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(5, 6)
    keeps = {"0": torch.ones(6, dtype=torch.bool), "2": torch.arange(8) < 3}
    result = bayescomp.compress(bmodel, keeps=keeps, round_weights=False)
    assert result.model(x).shape == (5, 4) and bool(result.masks["2"].out_mask.all())
    assert _equal_to_masked(bmodel, result, x) <= 1e-5


def test_keeping_almost_everything_warns_with_score_ranges_and_thresholds():
    bmodel = bayescomp.bayesianize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))  # untrained
    with pytest.warns(CompressionWarning, match=r"keeps 100\.0% .*0: scores -?\d+\.\d\.\.-?\d+\.\d, threshold 3"):
        bayescomp.compress(bmodel, 3.0)


def test_a_real_pruning_does_not_warn():
    bmodel = bayescomp.bayesianize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))
    keeps = {"0": torch.arange(6) < 3, "2": torch.arange(8) < 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        result = bayescomp.compress(bmodel, keeps=keeps)
    assert result.report["weights_kept_pct"] < 99
