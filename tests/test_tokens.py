"""Compression on token inputs (issue 23, items 3-4): Linear layers on (batch, tokens, features), LayerNorm,
Embedding, and the shape ops of a ViT-style classifier (patch embedding, cls token, positional parameter,
an attention written with plain Linear q/k/v, view/transpose/matmul/softmax, an MLP with GELU, pooling).

The property, as everywhere: the compressed plain model computes what the masked Bayesian model computes
at evaluation (max abs difference ≤ 1e-5 on random inputs), the model's output width is preserved, and
pruned groups really remove weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_keeps, randomise
from torch import nn

import bayescomp
from bayescomp.compress import apply_masks, compress, register_channelwise
from bayescomp.compress.rules import MODULE_RULES
from bayescomp.nn import GroupSparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    """Multi-head self-attention from plain Linear layers (no nn.MultiheadAttention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        h = self.heads
        q = self.q(x).view(B, T, h, C // h).transpose(1, 2)
        k = self.k(x).view(B, T, h, C // h).transpose(1, 2)
        v = self.v(x).view(B, T, h, C // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (C // h) ** -0.5
        att = att.softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, layer_scale: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5) if layer_scale else None

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        y = self.fc2(self.drop(self.act(self.fc1(self.ln2(x)))))
        return x + (y * self.gamma if self.gamma is not None else y)


class ConvViT(nn.Module):
    """Patches by a strided Conv2d, a cls token by cat, a positional parameter added, cls pooling."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.blocks = nn.Sequential(Block(dim, heads, False), Block(dim, heads, True))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class LinearViT(nn.Module):
    """Patches by a Linear layer on (batch, tokens, pixels), mean pooling over the tokens."""

    def __init__(self, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Linear(12, dim)
        self.pos = nn.Parameter(torch.randn(1, 6, dim))
        self.block = Block(dim, 2, True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.block(self.patch(x) + self.pos)
        return self.head(self.norm(x).mean(1))


def _keeps(bmodel, seed: int):
    gen = torch.Generator().manual_seed(seed)
    randomise(bmodel, gen)
    return random_keeps(bmodel, gen, 0.6)


def _equal_to_masked(model: nn.Module, x: torch.Tensor, seed: int = 0, keeps=None, exclude=(), more=()):
    """bayesianize → random keeps → compress; the compressed model equals the masked one on x and `more`."""
    torch.manual_seed(seed)
    bmodel = bayescomp.bayesianize(model, "gnj", exclude=list(exclude))
    keeps = _keeps(bmodel, seed) if keeps is None else keeps(bmodel)
    result = compress(bmodel, keeps=keeps, round_weights=False, example_input=x)
    masked = bmodel.eval()
    apply_masks(masked, keeps)
    with torch.no_grad():
        for xs in (x, *more):
            expected, got = masked(xs), result.model(xs)
            assert got.shape == expected.shape  # the output width (and every other size) is preserved
            assert (got - expected).abs().max().item() <= 1e-5
    assert not any(isinstance(m, GroupSparseLayer) for m in result.model.modules())
    return result


def _fewer(result) -> None:
    assert result.report["weights_kept"] < result.report["weights_total"]


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_patch_vit_with_cls_token_equals_the_masked_model(seed):
    x = torch.randn(3, 3, 8, 8)
    result = _equal_to_masked(ConvViT(), x, seed, more=[torch.randn(7, 3, 8, 8)])  # another batch size too
    _fewer(result)
    layers = {r["name"]: r for r in result.report["layers"]}
    assert layers["head"]["outputs_kept"] == 5  # the output layer never loses outputs
    fc1 = result.model.get_submodule("blocks.0.fc1")  # fc2's pruned inputs remove fc1's outputs
    assert fc1.out_features == int(result.masks["blocks.0.fc2"].in_mask.sum()) < 16


def test_linear_patch_vit_with_mean_pooling_and_layer_scale_equals_the_masked_model():
    x = torch.randn(4, 6, 12)
    result = _equal_to_masked(LinearViT(), x, 3, more=[torch.randn(2, 6, 12)])
    _fewer(result)
    assert result.report["layers"][-1]["outputs_kept"] == 4


def test_pruned_input_features_of_a_linear_on_tokens_are_shared_across_tokens():
    """Groups of a Linear on (B, T, F) are its input features: pruning one removes the producer's output
    channel for every token, here the previous Linear's output row."""
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 3))
    x = torch.randn(4, 5, 6)
    def keeps(bm):
        return {"0": torch.ones(6, dtype=torch.bool), "2": torch.arange(10) % 3 != 0}
    result = _equal_to_masked(model, x, keeps=keeps)
    first, second = [m for m in result.model.modules() if isinstance(m, nn.Linear)]
    assert (first.out_features, second.in_features, second.out_features) == (6, 6, 3)  # 10 - 4 pruned
    _fewer(result)


def test_a_linear_output_on_tokens_keeps_its_width():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7))
    result = _equal_to_masked(model, torch.randn(2, 5, 6), 4)
    assert result.model(torch.randn(3, 5, 6)).shape == (3, 5, 7)


class FusedQKV(nn.Module):
    """The timm way: one Linear gives q, k and v, reshaped into heads, permuted and unbound (or chunked)."""

    def __init__(self, dim: int = 8, heads: int = 2, unbind: bool = True) -> None:
        super().__init__()
        self.heads, self.unbind = heads, unbind
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        B, N, C = x.shape
        if self.unbind:
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = [t.view(B, N, self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        att = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


@pytest.mark.parametrize("unbind", [True, False])
def test_a_fused_qkv_projection_split_by_unbind_or_chunk_is_carried_whole(unbind):
    result = _equal_to_masked(FusedQKV(unbind=unbind), torch.randn(3, 5, 8), 7, more=[torch.randn(2, 5, 8)])
    layers = {r["name"]: r for r in result.report["layers"]}
    assert layers["qkv"]["outputs_kept"] == 24  # split into q, k and v: every output read
    assert layers["qkv"]["inputs_kept"] < 8 and layers["proj"]["inputs_kept"] < 8  # their own groups still go
    _fewer(result)


# ---- each shape op and layer kind on its own ----------------------------------------------------------------

class Ops(nn.Module):
    """Linear (B, T, 6) → 8 features → one op → Linear 8 → 3, so that the op sits between two pruned layers."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8 * (4 if op == "merge" else 1), 3)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        y = self.fc1(x)
        op = self.op
        if op == "unsqueeze":
            y = y.unsqueeze(1).squeeze(1)
        elif op == "view_tokens_into_batch":
            B, T, C = y.shape
            y = y.view(B * T, C)
            return self.fc2(y).view(B, T, -1)
        elif op == "merge":  # (B, T, F) → (B, T·F): a flatten-like block map of the channels
            y = y.reshape(y.shape[0], -1)
        elif op == "transpose":
            y = F.relu(y.transpose(1, 2)).transpose(1, 2)
        elif op == "permute":
            y = y.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        elif op == "where":
            y = torch.where(x[..., :1] > 0, y, -y)
        elif op == "where_param":
            y = torch.where(y > 0, y, self.gamma)
        elif op == "cat_tokens":
            y = torch.cat([y[:, :1] * 2.0, y], dim=1)
        elif op == "select_token":
            y = y[:, 0]
        elif op == "mean_tokens":
            y = y.mean(1)
        elif op == "softmax_tokens":
            y = torch.softmax(y, dim=1)
        elif op == "layer_scale":
            y = y * self.gamma + self.gamma
        elif op == "layer_norm":
            y = self.ln(y)
        elif op == "split_heads":  # the channel axis split in two: carried whole
            B, T, C = y.shape
            y = y.view(B, T, 2, C // 2).reshape(B, T, C)
        elif op == "sdpa":  # attention by the fused function: read whole, an opaque result
            B, T, C = y.shape
            h = y.view(B, T, 2, C // 2).transpose(1, 2)
            y = F.scaled_dot_product_attention(h, h, h).transpose(1, 2).reshape(B, T, C)
        elif op == "reshape_to_a_shape":  # sizes given as one computed shape: carried whole
            y = y.reshape(y.shape)
        elif op == "gelu_dropout":
            y = F.dropout(F.gelu(y), 0.5, self.training)
        return self.fc2(y)


OPS = ["unsqueeze", "view_tokens_into_batch", "merge", "transpose", "permute", "where", "where_param", "cat_tokens",
       "select_token", "mean_tokens", "softmax_tokens", "layer_scale", "layer_norm", "split_heads", "sdpa", "reshape_to_a_shape", "gelu_dropout"]


@pytest.mark.parametrize("op", OPS)
def test_each_shape_op_and_layer_kind_equals_the_masked_model(op):
    x = torch.randn(3, 4, 6)
    def keeps(bm):  # fc2 drops inputs 1, 4 and 6 (of 8; of each block of 8 after a merge)
        k2 = torch.ones(bm.fc2.n_groups, dtype=torch.bool)
        k2[[1, 4, 6]] = False
        return {"fc1": torch.arange(6) != 2, "fc2": k2}
    result = _equal_to_masked(Ops(op), x, keeps=keeps, more=[torch.randn(5, 4, 6)])
    fc1 = result.model.get_submodule("fc1")
    assert fc1.in_features == 5  # fc1's own pruned group
    channelwise = op not in ("layer_norm", "split_heads", "merge", "sdpa", "reshape_to_a_shape")
    if channelwise:  # fc2's pruned inputs reach back to fc1's outputs through the op
        assert fc1.out_features == 5, op
    else:  # LayerNorm and a split read every channel; a merge here keeps the blocks' union
        assert fc1.out_features == 8, op


def test_unflatten_of_a_conv_is_carried_whole():
    class Unflatten(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            x = self.conv(x).flatten(1)
            x = x.view(x.size(0), 4, 6, 6)
            return self.fc(x.flatten(1))

    _equal_to_masked(Unflatten(), torch.randn(2, 3, 8, 8), 5)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, t):
        return self.fc2(F.relu(self.fc1(self.emb(t))).mean(1))


def test_embedding_columns_are_sliced_with_the_features_its_consumer_keeps():
    t = torch.randint(0, 11, (3, 5))
    def keeps(bm):
        return {"fc1": torch.arange(8) % 2 == 0, "fc2": torch.ones(6, dtype=torch.bool)}
    result = _equal_to_masked(Tokens(), t, keeps=keeps, more=[torch.randint(0, 11, (2, 5))])
    assert result.model.get_submodule("emb").weight.shape == (11, 4)


def test_an_excluded_embedding_stays_dense_and_whole():
    t = torch.randint(0, 11, (3, 5))
    def keeps(bm):
        return {"fc1": torch.arange(8) % 2 == 0, "fc2": torch.ones(6, dtype=torch.bool)}
    result = _equal_to_masked(Tokens(), t, keeps=keeps, exclude=["emb"])
    assert result.model.get_submodule("emb").weight.shape == (11, 8)


def test_an_excluded_layer_norm_and_linear_on_tokens_stay_whole():
    model = Ops("layer_norm")
    x = torch.randn(3, 4, 6)
    bmodel = bayescomp.bayesianize(model, "gnj", exclude=["ln", "fc1"])
    assert type(bmodel.ln) is nn.LayerNorm and type(bmodel.fc1) is nn.Linear
    result = _equal_to_masked(model, x, 2, exclude=["ln", "fc1"])
    assert result.model.get_submodule("fc1").weight.shape == (8, 6)


class TokenScale(nn.Module):  # a user's channel-wise module on the last axis
    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.s


def _slice_scale(m: TokenScale, keep: torch.Tensor) -> TokenScale:
    new = TokenScale(int(keep.sum()))
    new.s.data.copy_(m.s.data[keep])
    return new


def test_a_registered_channelwise_module_on_the_last_axis_is_sliced(monkeypatch):
    monkeypatch.setitem(MODULE_RULES, TokenScale, MODULE_RULES[nn.ReLU])  # restored after the test
    register_channelwise(TokenScale, slicer=_slice_scale, dim=-1)
    model = nn.Sequential(nn.Linear(6, 8), TokenScale(8), nn.Linear(8, 3))
    def keeps(bm):
        return {"0": torch.ones(6, dtype=torch.bool), "2": torch.arange(8) < 5}
    result = _equal_to_masked(model, torch.randn(3, 4, 6), keeps=keeps)
    scale = next(m for m in result.model.modules() if isinstance(m, TokenScale))
    assert scale.s.numel() == 5


def test_a_channelwise_module_registered_without_a_dim_follows_its_inputs_axis(monkeypatch):
    """dim=None: the module follows whatever axis its input carries channels on (here the features, last)."""
    monkeypatch.setitem(MODULE_RULES, TokenScale, MODULE_RULES[nn.ReLU])
    register_channelwise(TokenScale, slicer=_slice_scale, dim=None)
    model = nn.Sequential(nn.Linear(6, 8), TokenScale(8), nn.Linear(8, 3))
    def keeps(bm):
        return {"0": torch.ones(6, dtype=torch.bool), "2": torch.arange(8) >= 2}
    result = _equal_to_masked(model, torch.randn(3, 5, 6), keeps=keeps)
    assert next(m for m in result.model.modules() if isinstance(m, TokenScale)).s.numel() == 6


def test_register_channelwise_refuses_a_dim_that_is_not_an_int(monkeypatch):
    monkeypatch.setitem(MODULE_RULES, TokenScale, MODULE_RULES[nn.ReLU])
    with pytest.raises(TypeError, match="dim must be an int or None"):
        register_channelwise(TokenScale, slicer=_slice_scale, dim="last")


# ---- what is still refused, named before training with the fix ------------------------------------------------

class CumsumTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), 1))


class SortTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x).sort(1).values)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.fc(x))


@pytest.mark.parametrize("make, where, why", [
    (CumsumTokens, "cumsum", "does not know how it maps channels"),
    (SortTokens, "sort", "does not return a single tensor"),
    (Twice, "fc", "called more than once"),
])
def test_check_names_what_is_still_refused_and_the_fix(make, where, why):
    x = torch.randn(2, 4, 6)
    report = bayescomp.check(make(), x)
    assert not report.ok
    (refusal,) = report.refusals
    assert where in refusal.where and why in refusal.reason and "exclude" in refusal.fix
    with pytest.raises(bayescomp.UnsupportedLayerError, match=why):
        compress(bayescomp.bayesianize(make()), example_input=x)


def test_check_passes_the_vit_before_training():
    assert bayescomp.check(ConvViT(), torch.randn(2, 3, 8, 8)).ok
    assert bayescomp.check(LinearViT(), torch.randn(2, 6, 12)).ok
