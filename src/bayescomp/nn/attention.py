"""Multi-head attention with its projections as separate Linear layers, so that they can be group-sparse.

`nn.MultiheadAttention` keeps the query, key and value projections in one packed tensor (`in_proj_weight`) and
computes inside one functional call, so no layer of it can be replaced. `AttentionHeads` computes the same thing
with four Linear modules (`q_proj`, `k_proj`, `v_proj`, `out_proj`):

    q = x_q W_qᵀ + b_q,  k = x_k W_kᵀ + b_k,  v = x_v W_vᵀ + b_v   split into heads h of `head_dim` features,
    A_h = softmax(q_h k_hᵀ / √head_dim + mask),   o_h = A_h v_h,   y = [o_1 … o_H] W_oᵀ + b_o.

Head h's values o_h are the h-th block of `head_dim` inputs of `out_proj`: with one scale z per such block
(`group_size = head_dim`, see `head_group_sizes`) a pruned group removes the whole head — its rows of q/k/v and
its columns of `out_proj` (`bayescomp.compress.heads.shrink_attention`). A shrunk module has fewer heads than the
original: `heads` holds the original index of each (a per-head attention mask of the original is indexed with it).

The call signature is `nn.MultiheadAttention`'s: `attn(q, k, v, key_padding_mask=None, need_weights=True,
attn_mask=None, average_attn_weights=True, is_causal=False)` returns `(output, weights or None)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionHeads(nn.Module):
    """Multi-head attention (self- or cross-) with explicit q/k/v/out projections; see the module doc.

    >>> attn = AttentionHeads(16, 4, batch_first=True)
    >>> x = torch.randn(2, 5, 16)
    >>> attn(x, x, x, need_weights=False)[0].shape
    torch.Size([2, 5, 16])
    """

    heads: Tensor

    def __init__(self, embed_dim: int, num_heads: int, *, head_dim: int | None = None, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False, heads: list[int] | Tensor | None = None,
                 total_heads: int | None = None) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 0:
            raise ValueError(f"embed_dim must be ≥ 1 and num_heads ≥ 0, got {embed_dim}, {num_heads}")
        if head_dim is None:
            if num_heads < 1 or embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
            head_dim = embed_dim // num_heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = float(dropout), batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        index = torch.arange(num_heads) if heads is None else torch.as_tensor(heads, dtype=torch.long)
        if index.shape != (num_heads,):
            raise ValueError(f"heads must list {num_heads} original head indices, got {tuple(index.shape)}")
        self.register_buffer("heads", index.clone())
        self.total_heads = num_heads if total_heads is None else int(total_heads)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> AttentionHeads:
        """The same function as `mha` (weights copied): self- and cross-attention with equal key/value widths;
        `add_bias_kv`, `add_zero_attn` and other kdim/vdim are refused (`ValueError` naming the option)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"nn.MultiheadAttention with kdim/vdim ({mha.kdim}, {mha.vdim}) other than embed_dim "
                             f"({mha.embed_dim}) is not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, bias=bias, dropout=mha.dropout, batch_first=mha.batch_first)
        w = mha.in_proj_weight.detach()
        e = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(w[i * e : (i + 1) * e])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias.detach()[i * e : (i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return new.to(device=w.device, dtype=w.dtype).train(mha.training)

    def _split(self, t: Tensor) -> Tensor:
        """(N, L, H·d) -> (N, H, L, d)."""
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _scores_mask(self, n: int, lq: int, lk: int, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                     is_causal: bool, like: Tensor) -> Tensor | None:
        """The additive mask of the scores, broadcastable to (N, H, L, S) (None: no mask)."""
        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill_(m, float("-inf"))
            return m.to(like.dtype)

        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=like.device).triu_(1)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                mask = additive(attn_mask).view(1, 1, lq, lk)
            elif attn_mask.dim() == 3:  # (N·H, L, S) with the original heads: this module's heads picked out
                mask = additive(attn_mask).view(n, self.total_heads, lq, lk)[:, self.heads.to(attn_mask.device)]
            else:
                raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N·num_heads, L, S), got {attn_mask.dim()}-D")
        if key_padding_mask is not None:
            kpm = additive(key_padding_mask).view(n, 1, 1, lk)
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """`nn.MultiheadAttention.forward`'s arguments and result; `key`, `value` default to `query`."""
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E): each example draws its own scales in training
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        mask = self._scores_mask(n, lq, lk, attn_mask, key_padding_mask, is_causal, scores)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        heads_out = torch.matmul(weights, v).transpose(1, 2).reshape(n, lq, self.num_heads * self.head_dim)
        out = self.out_proj(heads_out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, (w.squeeze(0) if unbatched else w)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}" + (f", dropout={self.dropout}" if self.dropout else "")
                + (f", heads={self.heads.tolist()} of {self.total_heads}" if self.num_heads != self.total_heads else ""))


def head_group_sizes(model: nn.Module) -> dict[str, int]:
    """{name of an `AttentionHeads`' out_proj: head_dim} for every attention module of `model`: the group size
    that gives out_proj one scale per head (a head's value features are one block of out_proj's inputs)."""
    return {f"{name}.out_proj" if name else "out_proj": m.head_dim
            for name, m in model.named_modules() if isinstance(m, AttentionHeads)}
