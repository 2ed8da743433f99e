"""Multi-head attention: `AttentionHeads` against `nn.MultiheadAttention`, bayesianize's replacement (out_proj with
one group per head), and the head surgery (a shrunk module with fewer heads equals the masked Bayesian one)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bayescomp
from bayescomp.compress.heads import head_keep, shrink_attention
from bayescomp.convert import CompressionWarning, replace_attention
from bayescomp.nn import AttentionHeads, GroupSparseLayer, LinearGroupHS, LinearGroupNJ, head_group_sizes

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=0.0, atol=1e-5)


def _mha(batch_first: bool, bias: bool = True, heads: int = 4, dim: int = 16) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=batch_first)
    with torch.no_grad():  # non-zero biases (torch starts them at 0)
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha.eval()


def _inputs(batch_first: bool, n=3, lq=5, lk=5, dim=16):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(n, lq, dim, generator=g), torch.randn(n, lk, dim, generator=g)
    v = torch.randn(n, lk, dim, generator=g)
    if not batch_first:
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    return q, k, v


def _masks(n=3, heads=4, lq=5, lk=5):
    g = torch.Generator().manual_seed(2)
    kpm = torch.zeros(n, lk, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, 0] = True
    bool2d = torch.rand(lq, lk, generator=g) < 0.3
    bool2d[:, 0] = False  # every query sees one key
    bool2d[:, 1] = False
    return {
        "none": {},
        "key_padding": {"key_padding_mask": kpm},
        "float_key_padding": {"key_padding_mask": torch.randn(n, lk, generator=g)},
        "bool_2d": {"attn_mask": bool2d},
        "float_2d": {"attn_mask": torch.randn(lq, lk, generator=g)},
        "float_3d": {"attn_mask": torch.randn(n * heads, lq, lk, generator=g)},
        "both": {"attn_mask": bool2d, "key_padding_mask": kpm},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(lq), "is_causal": True},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(_masks()))
def test_attention_heads_equals_multihead_attention(batch_first, mask):
    mha = _mha(batch_first)
    ours = AttentionHeads.from_torch(mha).eval()
    q, k, v = _inputs(batch_first)
    kw = _masks()[mask]
    ref_out, ref_w = mha(q, k, v, **kw)
    out, w = ours(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)
    ref_out, ref_w = mha(q, k, v, need_weights=True, average_attn_weights=False, **kw)
    torch.testing.assert_close(ours(q, k, v, average_attn_weights=False, **kw)[1], ref_w, **TOL)
    out, w = ours(q, k, v, need_weights=False, **kw)
    assert w is None
    torch.testing.assert_close(out, mha(q, k, v, need_weights=False, **kw)[0], **TOL)


def test_cross_attention_unbatched_and_no_bias():
    mha = _mha(True, bias=False)
    ours = AttentionHeads.from_torch(mha).eval()
    assert ours.q_proj.bias is None and ours.out_proj.bias is None
    q, k, v = _inputs(True, lq=4, lk=7)
    torch.testing.assert_close(ours(q, k, v)[0], mha(q, k, v)[0], **TOL)
    torch.testing.assert_close(ours(q[0], k[0], v[0])[0], mha(q[0], k[0], v[0])[0], **TOL)  # (L, E)
    torch.testing.assert_close(ours(q[0], k[0], v[0])[1], mha(q[0], k[0], v[0])[1], **TOL)


def test_unsupported_options_refused_by_name():
    with pytest.raises(ValueError, match="add_bias_kv"):
        AttentionHeads.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="kdim"):
        AttentionHeads.from_torch(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="divisible"):
        AttentionHeads(10, 3)


class _Block(nn.Module):
    """A transformer block as models write it: `attn(x, x, x, need_weights=False)[0]`."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(x.mean(1))


def test_replace_attention_keeps_the_function_and_leaves_the_input_model():
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(2, 6, 16)
    new = replace_attention(model)
    assert isinstance(new.attn, AttentionHeads) and type(model.attn) is nn.MultiheadAttention
    torch.testing.assert_close(new(x), model(x), **TOL)
    assert replace_attention(model, exclude=["attn"]) is model
    assert head_group_sizes(new) == {"attn.out_proj": 4}


@pytest.mark.parametrize("prior,cls", [("gnj", LinearGroupNJ), ("ghs", LinearGroupHS)])
def test_bayesianize_gives_out_proj_one_group_per_head(prior, cls):
    torch.manual_seed(0)
    model = _Block().eval()
    bmodel = bayescomp.bayesianize(model, prior=prior)
    attn = bmodel.attn
    assert isinstance(attn, AttentionHeads)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(getattr(attn, name), cls), name
    assert attn.out_proj.group_size == 4 and attn.out_proj.n_groups == 4 and attn.out_proj.log_alpha().shape == (4,)
    assert attn.q_proj.group_size == 1 and attn.q_proj.n_groups == 16
    if prior == "gnj":  # with E[z] = 1 the posterior-mean network is the plain one
        with torch.no_grad():
            for m in bmodel.modules():
                if isinstance(m, GroupSparseLayer):
                    m.z_mu.fill_(1.0)
        x = torch.randn(2, 6, 16)
        torch.testing.assert_close(bmodel.eval()(x), model(x), **TOL)
    # a training step reaches every parameter of the attention's projections
    bmodel.train()
    (bmodel(torch.randn(4, 6, 16)).pow(2).sum() + bayescomp.kl_divergence(bmodel)).backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unsupported_attention_left_dense_with_a_warning():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bmodel = bayescomp.bayesianize(M())
    assert type(bmodel.attn) is nn.MultiheadAttention
    assert any(issubclass(w.category, CompressionWarning) and "attn" in str(w.message) for w in caught)


def _bayesian_attention(prior: str, batch_first: bool, seed: int) -> AttentionHeads:
    torch.manual_seed(seed)
    holder = nn.Sequential()
    holder.add_module("attn", _mha(batch_first))
    attn = bayescomp.bayesianize(holder, prior=prior, **({"tau0": 0.1} if prior == "ghs" else {})).attn
    with torch.no_grad():  # a posterior away from its start: E[z] and μ vary per group and weight
        for m in attn.modules():
            if isinstance(m, GroupSparseLayer):
                m.weight_mu.add_(0.2 * torch.randn_like(m.weight_mu))
                if prior == "gnj":
                    m.z_mu.copy_(0.5 + torch.rand_like(m.z_mu))
                else:
                    m.a_mu.add_(0.3 * torch.randn_like(m.a_mu))
    return attn.eval()


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("keep", [[True, False, True, False], [False, False, False, True], [True] * 4, [False] * 4])
def test_shrunk_attention_equals_the_masked_model(prior, batch_first, keep):
    attn = _bayesian_attention(prior, batch_first, seed=len(prior) + sum(keep))
    keep = torch.tensor(keep)
    with torch.no_grad():
        attn.out_proj.group_mask.copy_(keep)
        attn.q_proj.group_mask[3] = False  # an input feature pruned in q and v: a zero column there
        attn.v_proj.group_mask[7] = False
    shrunk = shrink_attention(attn)
    assert shrunk.num_heads == int(keep.sum()) and shrunk.heads.tolist() == torch.nonzero(keep).flatten().tolist()
    assert not any(isinstance(m, GroupSparseLayer) for m in shrunk.modules())
    assert shrunk.q_proj.weight.shape == (4 * int(keep.sum()), 16) and shrunk.out_proj.weight.shape[1] == 4 * int(keep.sum())
    q, k, v = _inputs(batch_first)
    for kw in _masks().values():  # a per-head (3-D) mask of the original is read for the kept heads
        torch.testing.assert_close(shrunk(q, k, v, need_weights=False, **kw)[0],
                                   attn(q, k, v, need_weights=False, **kw)[0], **TOL)
    # only the masked heads matter: changing a pruned head's q/k/v weights leaves the masked output unchanged
    if not bool(keep.all()):
        h = int(torch.nonzero(~keep)[0])
        before = attn(q, k, v)[0]
        with torch.no_grad():
            attn.v_proj.weight_mu[4 * h : 4 * h + 4] += 1.0
            attn.q_proj.weight_mu[4 * h : 4 * h + 4] -= 1.0
        torch.testing.assert_close(attn(q, k, v)[0], before, **TOL)


def test_head_keep_reads_out_proj_log_alpha():
    attn = _bayesian_attention("gnj", True, seed=3)
    with torch.no_grad():
        attn.out_proj.z_mu.copy_(torch.tensor([1.0, 1.0, 0.01, 1.0]))
        attn.out_proj.z_logvar.copy_(torch.log(torch.tensor([0.01, 0.5, 0.01, 1e-4])))
    # log α = log σ² − log μ²: −4.6, −0.69, +4.6, −9.2
    assert head_keep(attn).tolist() == [True, False, False, True]  # the GNJ default −3
    assert head_keep(attn, threshold=0.0).tolist() == [True, True, False, True]
    with torch.no_grad():
        attn.out_proj.group_mask[0] = False
    assert head_keep(attn, threshold=0.0).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="one per head"):
        shrink_attention(attn, torch.tensor([True, False]))
