"""nn.MultiheadAttention through `bayescomp.compress` (issue 23, item 3): `bayesianize` turns it into an
`AttentionHeads` (one z per head on out_proj), the engine keeps that module as a leaf with its own keep over heads,
and the compressed model computes what the masked Bayesian model computes (max abs difference ≤ 1e-5 on random
inputs) with fewer heads; the report counts the projections' kept weights as arithmetic by hand gives them."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_keeps
from torch import nn

import bayescomp
from bayescomp.compress import apply_masks, compress, multiply_adds
from bayescomp.convert import CompressionWarning
from bayescomp.nn import AttentionHeads, GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")
DIM, HEADS, CLASSES = 16, 4, 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.fc1, self.act, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class MHAViT(nn.Module):
    """Patch embedding (Conv2d), 2 blocks of nn.MultiheadAttention + GELU MLP + LayerNorm, mean pooling, head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 4, stride=4)
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def _bayesian(prior: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    bmodel = bayescomp.bayesianize(MHAViT(), prior, **({"tau0": 0.1} if prior == "ghs" else {}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a posterior away from its start: E[z] and μ vary per group and weight
        for m in bmodel.modules():
            if isinstance(m, GroupSparseLayer):
                m.weight_mu.add_(0.2 * torch.randn(m.weight_mu.shape, generator=gen))
                if prior == "gnj":
                    m.z_mu.copy_(0.5 + torch.rand(m.z_mu.shape, generator=gen))
                else:
                    m.a_mu.add_(0.3 * torch.randn(m.a_mu.shape, generator=gen))
    return bmodel.eval()


def _keeps(bmodel: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    keeps = random_keeps(bmodel, torch.Generator().manual_seed(seed))
    keeps["blocks.0.attn.out_proj"] = torch.tensor([True, False, True, False])  # heads 1 and 3 removed
    keeps["blocks.1.attn.out_proj"] = torch.tensor([False, False, True, True])
    return keeps


def _masked(bmodel: nn.Module, keeps) -> nn.Module:
    masked = copy.deepcopy(bmodel)
    apply_masks(masked, keeps)
    return masked.eval()


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_compressed_transformer_equals_the_masked_model_with_fewer_heads(prior):
    bmodel = _bayesian(prior, seed=3)
    attns = [m for m in bmodel.modules() if isinstance(m, AttentionHeads)]
    assert len(attns) == 2 and all(isinstance(a.out_proj, GroupSparseLayer) for a in attns)
    keeps = _keeps(bmodel, seed=4)
    x = torch.randn(2, 3, 8, 8)
    result = compress(bmodel, keeps=keeps, example_input=x, round_weights=False)
    masked = _masked(bmodel, keeps)
    for seed in range(3):
        xr = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want, got = masked(xr), result.model(xr)
        assert got.shape == (4, CLASSES)
        assert (got - want).abs().max().item() <= 1e-5
    shrunk = {n: m for n, m in result.model.named_modules() if isinstance(m, AttentionHeads)}
    assert sorted(shrunk) == ["blocks.0.attn", "blocks.1.attn"]
    assert shrunk["blocks.0.attn"].num_heads == 2 and shrunk["blocks.0.attn"].heads.tolist() == [0, 2]
    assert shrunk["blocks.1.attn"].num_heads == 2 and shrunk["blocks.1.attn"].heads.tolist() == [2, 3]
    for a in shrunk.values():
        assert a.out_proj.out_features == DIM and a.q_proj.out_features == 2 * (DIM // HEADS)
        assert not any(isinstance(m, GroupSparseLayer) for m in a.modules())


def test_report_counts_the_kept_heads_weights_by_hand():
    bmodel = _bayesian("gnj", seed=5)
    keeps = _keeps(bmodel, seed=6)
    x = torch.randn(2, 3, 8, 8)
    result = compress(bmodel, keeps=keeps, example_input=x, round_weights=True)
    layers = {row["name"]: row for row in result.report["layers"]}
    d = DIM // HEADS
    for block in ("blocks.0.attn", "blocks.1.attn"):
        kept_features = 2 * d  # two heads kept in each block (see `_keeps`)
        for part in ("q_proj", "k_proj", "v_proj"):
            row = layers[f"{block}.{part}"]
            assert row["weights_total"] == DIM * DIM and row["weights_kept"] == kept_features * DIM
            assert row["outputs_kept"] == kept_features
            assert row["inputs_kept"] == int(keeps[f"{block}.{part}"].sum())
        row = layers[f"{block}.out_proj"]
        assert row["weights_kept"] == DIM * kept_features and row["groups_kept"] == 2 and row["groups_total"] == HEADS
        assert row["bits"] is not None
    assert result.report["weights_kept"] == sum(r["weights_kept"] for r in result.report["layers"])
    stored = sum(m.weight.numel() for m in result.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert result.report["weights_kept"] == stored
    # rounded weights: the bits read off the projections are applied to the shrunk projections
    q = result.model.get_submodule("blocks.0.attn.q_proj").weight
    step = 2.0 ** -result.bits["blocks.0.attn.q_proj"]
    assert torch.allclose(q / step, torch.round(q / step), atol=1e-3)
    # multiply-adds: the four projections count (tokens · outputs · inputs each), the attention scores do not
    tokens = 4  # (8 / 4)² patches
    h = torch.randn(1, tokens, DIM)
    assert multiply_adds(bmodel.get_submodule("blocks.0.attn"), (h, h, h)) == 4 * tokens * DIM * DIM
    assert multiply_adds(result.model.get_submodule("blocks.0.attn"), (h, h, h)) == 4 * tokens * DIM * 2 * d


def test_threshold_decision_reads_out_proj_log_alpha_per_head():
    bmodel = _bayesian("gnj", seed=7)
    out = bmodel.get_submodule("blocks.1.attn.out_proj")
    with torch.no_grad():  # heads 0 and 2 far above any threshold: pruned
        out.z_logvar.copy_(torch.tensor([8.0, -9.0, 8.0, -9.0]))
        out.z_mu.copy_(torch.tensor([0.01, 1.0, 0.01, 1.0]))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(CompressionWarning):  # keeps every weight
        result = compress(bmodel, thresholds=1e9, example_input=x, round_weights=False)
    result_cut = compress(bmodel, example_input=x, round_weights=False)
    assert result.model.get_submodule("blocks.1.attn").num_heads == HEADS  # a threshold above every log α
    shrunk = result_cut.model.get_submodule("blocks.1.attn")
    assert shrunk.heads.tolist() == [1, 3]
    assert result_cut.masks["blocks.1.attn.out_proj"].group_keep.tolist() == [False, True, False, True]


class Tokens(nn.Module):
    """Linear embedding, one attention, a mean over tokens, a head: every layer but the attention storable."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(6, DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first)
        self.head = nn.Linear(DIM, CLASSES)
        self.tokens_dim = 1 if batch_first else 0

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(dim=self.tokens_dim))


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_sequence_first_attention_compresses_to_the_masked_model(prior):
    torch.manual_seed(2)
    bmodel = bayescomp.bayesianize(Tokens(batch_first=False), prior).eval()
    keeps = random_keeps(bmodel, torch.Generator().manual_seed(3))
    keeps["attn.out_proj"] = torch.tensor([True, True, False, True])
    result = compress(bmodel, keeps=keeps, example_input=torch.randn(5, 2, 6), round_weights=False)
    xr = torch.randn(7, 3, 6)  # (tokens, batch, features)
    assert (result.model(xr) - _masked(bmodel, keeps)(xr)).abs().max().item() <= 1e-5
    assert result.model.get_submodule("attn").num_heads == 3


def test_check_is_clean_and_the_shrunk_attention_saves(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    report = bayescomp.check(MHAViT(), x)
    assert report.refusals == [], str(report)
    bmodel = bayescomp.bayesianize(Tokens(), "gnj").eval()
    xt = torch.randn(2, 5, 6)
    assert bayescomp.check(Tokens(), xt).refusals == []
    keeps = random_keeps(bmodel, torch.Generator().manual_seed(1))
    keeps["attn.out_proj"] = torch.tensor([False, True, True, False])
    result = compress(bmodel, keeps=keeps, example_input=xt, round_weights=False)
    masked = _masked(bmodel, keeps)
    xr = torch.randn(3, 7, 6)  # another batch size and token count than the example's
    assert (result.model(xr) - masked(xr)).abs().max().item() <= 1e-5
    assert result.model.get_submodule("attn").num_heads == 2
    path = tmp_path / "model.bcz"
    rounded = compress(bmodel, keeps=keeps, example_input=xt)  # rounded, as a file stores it
    bayescomp.save(rounded, path)
    loaded = bayescomp.load(path)
    assert loaded.get_submodule("attn").heads.tolist() == [1, 2]  # the original indices of the heads kept
    assert (loaded(xr) - rounded.model(xr)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("batch_first", [True, False])
def test_plain_multihead_attention_counts_its_projections_like_its_converted_twin(batch_first):
    """A plain `nn.MultiheadAttention` (projections not module calls) counts 2·n_q·E² + n_k·kdim·E + n_v·vdim·E,
    by hand, the same as the `AttentionHeads` it converts to; kdim/vdim and keyword arguments too."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first).eval()
    q = torch.randn(2, 3, DIM) if batch_first else torch.randn(3, 2, DIM)  # 6 query tokens
    kv = torch.randn(2, 5, DIM) if batch_first else torch.randn(5, 2, DIM)  # 10 key / value tokens
    by_hand = 2 * 6 * DIM * DIM + 10 * DIM * DIM + 10 * DIM * DIM
    n = q.shape[0]  # multiply_adds divides by dimension 0 of the first input
    assert multiply_adds(mha, (q, kv, kv)) == by_hand // n
    assert multiply_adds(AttentionHeads.from_torch(mha), (q, kv, kv)) == by_hand // n

    class Keywords(nn.Module):  # keys and values passed by name
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(DIM, HEADS, kdim=3, vdim=5, batch_first=True)

        def forward(self, x, k, v):
            return self.attn(x, key=k, value=v, need_weights=False)[0]

    x, k, v = torch.randn(2, 3, DIM), torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    assert multiply_adds(Keywords(), (x, k, v)) == (2 * 6 * DIM * DIM + 8 * 3 * DIM + 8 * 5 * DIM) // 2
