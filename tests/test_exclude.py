"""bayesianize(exclude=..., strict=...): layers left dense are carried whole through compression."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayescomp
from bayescomp import CompressionWarning, UnsupportedLayerError
from bayescomp.compress import apply_masks
from bayescomp.convert import group_layers


class Tokens(nn.Module):  # Embedding in front of a Bayesian MLP
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 4)
        self.fc1 = nn.Linear(5 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, t):
        return self.fc2(F.relu(self.fc1(self.emb(t).flatten(1))))


class Attention(nn.Module):  # MultiheadAttention (a tuple output) in front of a Bayesian head
    def __init__(self):
        super().__init__()
        # add_bias_kv: a kind bayesianize cannot replace by AttentionHeads (test_attention.py has the replaced one)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
        self.fc1 = nn.Linear(4 * 6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x)
        return self.fc2(F.relu(self.fc1(a.flatten(1))))


def _transpose():
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def _prelu():
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.PReLU(6), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


CASES = {
    "Embedding": (Tokens, lambda: torch.randint(0, 12, (3, 5)), "emb", nn.Embedding),
    "MultiheadAttention": (Attention, lambda: torch.randn(3, 4, 6), "attn", nn.MultiheadAttention),
    "ConvTranspose2d": (_transpose, lambda: torch.randn(3, 2, 6, 6), "2", nn.ConvTranspose2d),
    "PReLU": (_prelu, lambda: torch.randn(3, 2, 6, 6), "1", nn.PReLU),
}


#: the kinds compression does not follow (an Embedding is followed: its columns are sliced, tests/test_tokens.py)
UNSUPPORTED = {k: v for k, v in CASES.items() if k != "Embedding"}


def _half(bmodel):
    return {n: torch.arange(m.n_groups) % 2 == 0 for n, m in group_layers(bmodel).items()}


def _masked_equals_compressed(bmodel, x):
    keeps = _half(bmodel)
    result = bayescomp.compress(bmodel, keeps=keeps, round_weights=False, example_input=x)
    bmodel.eval()
    apply_masks(bmodel, keeps)
    with torch.no_grad():
        diff = (bmodel(x) - result.model(x)).abs().max().item()
    assert diff <= 1e-5
    assert result.report["weights_kept"] < result.report["weights_total"]  # something was pruned
    return result


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("by", ["name", "type"])
def test_excluded_kind_is_carried_whole_and_compression_equals_the_masked_model(kind, by):
    torch.manual_seed(0)
    make, example, name, cls = CASES[kind]
    model, x = make(), example()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit exclusion warns of nothing
        bmodel = bayescomp.bayesianize(model, exclude=[name if by == "name" else cls], example_input=x)
    assert type(bmodel.get_submodule(name)) is cls
    result = _masked_equals_compressed(bmodel, x)
    kept = dict(result.model.named_modules())
    assert any(type(m) is cls for m in kept.values())
    assert all(torch.equal(p, q) for p, q in zip(model.get_submodule(name).state_dict().values(),
               next(m for m in kept.values() if type(m) is cls).state_dict().values(), strict=True))


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_unsupported_kind_is_left_dense_with_a_warning_naming_it(kind):
    make, _, name, cls = CASES[kind]
    with pytest.warns(CompressionWarning, match=rf"{name} \({kind}\).*exclude=\['{name}'\]"):
        bmodel = bayescomp.bayesianize(make())
    assert type(bmodel.get_submodule(name)) is cls and group_layers(bmodel)


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_strict_refuses_an_unsupported_kind(kind):
    make, _, name, _ = CASES[kind]
    with pytest.raises(UnsupportedLayerError, match=rf"{name}: unsupported.*exclude=\['{name}'\]"):
        bayescomp.bayesianize(make(), strict=True)


def test_an_excluded_linear_keeps_all_its_inputs_and_outputs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(4, 6)
    bmodel = bayescomp.bayesianize(model, exclude=["2"])
    assert type(bmodel[2]) is nn.Linear and set(group_layers(bmodel)) == {"0", "4"}
    result = _masked_equals_compressed(bmodel, x)  # "4" drops inputs 1, 3, 5: "2" keeps its outputs anyway
    row = next(r for r in result.report["layers"] if r["name"] == "2")
    assert (row["inputs_kept"], row["outputs_kept"]) == (8, 7)
    dense = next(m for m in result.model.modules() if isinstance(m, nn.Linear) and m.weight.shape == (7, 8))
    assert torch.equal(dense.weight, model[2].weight) and torch.equal(dense.bias, model[2].bias)


def test_excluding_a_container_keeps_everything_inside_it_dense():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 2))
    bmodel = bayescomp.bayesianize(model, exclude=["1"])
    assert set(group_layers(bmodel)) == {"0", "2"}
    _masked_equals_compressed(bmodel, torch.randn(3, 4))


def test_unknown_keyword_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"takes no option skip; .*exclude.*strict"):
        bayescomp.bayesianize(nn.Sequential(nn.Linear(2, 2)), skip=["0"])


def test_bad_exclusions_are_refused_by_name():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'fc9', which is not a module"):
        bayescomp.bayesianize(model, exclude=["fc9"])
    with pytest.raises(TypeError, match="module names"):
        bayescomp.bayesianize(model, exclude=[3])
    with pytest.raises(TypeError, match="a list"):
        bayescomp.bayesianize(model, exclude="0")
    with pytest.raises(UnsupportedLayerError, match="the others are left dense"):
        bayescomp.bayesianize(model, exclude=[nn.Linear])
