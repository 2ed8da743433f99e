"""bayescomp.check(): before any training, what is converted, what stays dense, and what compression refuses."""

import pytest
import torch
from torch import nn

import bayescomp
from bayescomp import UnsupportedLayerError


class Cumsum(nn.Module):  # an op bayescomp has no rule for, inside a submodule
    def forward(self, x):
        return torch.cumsum(x, 1)


class WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.block = Cumsum()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.block(self.fc1(x)))


class LayerScale(nn.Module):  # a parameter used directly in the model's own forward
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.gamma = nn.Parameter(torch.ones(8))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gamma)


class Tokens(nn.Module):  # a Linear on (batch, tokens, features)
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(4 * 8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x).flatten(1))


def test_report_lists_converted_dense_and_followed_layers_with_groups():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    report = bayescomp.check(model, torch.zeros(2, 1, 6, 6))
    assert report.ok
    plan = {p.name: (p.action, p.groups) for p in report.layers}
    assert plan == {"0": ("bayesianize", 4), "1": ("follow", None), "2": ("dense", None), "4": ("bayesianize", 64)}
    text = str(report)
    assert "PReLU" in text and "unsupported" in text and "compression: ok" in text


def test_an_op_without_a_rule_is_refused_with_the_exclusion_that_fixes_it():
    x = torch.randn(2, 6)
    report = bayescomp.check(WithBlock(), x)
    assert not report.ok
    (refusal,) = report.refusals
    assert "cumsum" in refusal.where and "exclude=['block']" in refusal.fix
    assert "exclude=['block']" in str(report)
    with pytest.raises(UnsupportedLayerError, match="cumsum"):
        bayescomp.bayesianize(WithBlock(), example_input=x)
    assert bayescomp.check(WithBlock(), x, exclude=["block"]).ok  # the fix works
    bayescomp.bayesianize(WithBlock(), exclude=["block"], example_input=x)


def test_a_parameter_used_in_the_models_own_forward_is_followed():
    # a layer scale x * self.gamma is a channel-wise product by a constant vector, sliced with the channels
    # (tests/test_tokens.py compares the compressed model with the masked one)
    report = bayescomp.check(LayerScale(), torch.randn(2, 6))
    assert report.ok, str(report)


def test_reflect_padding_is_left_dense_and_refused_when_strict():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(2, 1, 4, 4)
    report = bayescomp.check(model, x)
    assert report.ok and report.layers[0].action == "dense" and "padding_mode='reflect'" in report.layers[0].reason
    strict = bayescomp.check(model, x, strict=True)
    assert not strict.ok and strict.refusals[0].where == "0" and "exclude=['0']" in strict.refusals[0].fix
    with pytest.raises(UnsupportedLayerError, match="padding_mode='reflect'"):
        bayescomp.bayesianize(model, strict=True)


@pytest.mark.parametrize("make", [WithBlock, LayerScale, Tokens])
def test_check_agrees_with_compress(make):
    """check's verdict is compress's: a model it passes compresses, one it refuses is refused by compress."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6) if make is Tokens else torch.randn(2, 6)
    ok = bayescomp.check(make(), x).ok
    bmodel = bayescomp.bayesianize(make())
    try:
        bayescomp.compress(bmodel, example_input=x)
        compressed = True
    except UnsupportedLayerError:
        compressed = False
    assert ok == compressed


def test_check_leaves_the_model_as_it_is_and_refuses_an_input_that_does_not_fit():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bayescomp.check(model, torch.randn(3, 6))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not bayescomp.nn.LinearGroupNJ for m in model.modules())
    with pytest.raises(ValueError, match="example_input does not fit"):
        bayescomp.check(model, torch.randn(3, 5))


class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
    def forward(self, x):
        return x if bool(x.sum() > 0) else -x


def test_an_untraceable_module_is_refused_with_the_exclusion_that_fixes_it():
    model = nn.Sequential(nn.Linear(4, 4), Branchy(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    report = bayescomp.check(model, x)
    assert not report.ok and "cannot trace" in report.refusals[0].reason and "exclude=['1']" in report.refusals[0].fix
    assert bayescomp.check(model, x, exclude=["1"]).ok
