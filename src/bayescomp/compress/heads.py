"""Whole attention heads removed: the surgery of an `AttentionHeads` module (`bayescomp.nn.attention`).

A Bayesian attention module's out_proj has one group per head (`group_size = head_dim`): its group h gates head h's
value features, so with group h pruned the masked model adds nothing of head h to the output, whatever head h's
queries, keys and values are. The shrunk module drops head h altogether — its `head_dim` rows of q_proj, k_proj and
v_proj and its `head_dim` columns of out_proj — and computes the masked model's output with fewer heads.

The decision (`head_keep`: one bool per head, from out_proj's log α) is separate from the surgery
(`shrink_attention`), so that a keep-mask can be inspected or edited before anything is cut. Weights are the
posterior means with each layer's own gates applied (a pruned input group of q/k/v is a zero column, an input origin
folded into the bias), not rounded to a bit precision.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..nn import AttentionHeads, GroupSparseLayer
from .masks import LayerMask
from .precision import round_to_bits

#: the projections of an `AttentionHeads`, each a weighted layer of the decision named `<attention path>.<part>`
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def head_keep(attn: AttentionHeads, threshold: float | None = None) -> Tensor:
    """Bool per head: kept while out_proj's log α of the head is below `threshold` (None: the prior's default),
    and its group mask is on. A plain out_proj keeps every head."""
    out = attn.out_proj
    if not isinstance(out, GroupSparseLayer):
        return torch.ones(attn.num_heads, dtype=torch.bool)
    if out.n_groups != attn.num_heads:
        raise ValueError(f"out_proj has {out.n_groups} groups for {attn.num_heads} heads: bayesianize the model "
                         "with bayescomp.bayesianize (it gives out_proj group_size = head_dim)")
    cut = out.default_threshold if threshold is None else float(threshold)
    with torch.no_grad():
        return ((out.log_alpha() < cut) & out.group_mask).detach().cpu()


@torch.no_grad()
def linear_weights(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight and bias a (plain or group-sparse) Linear computes with at evaluation, for inputs x themselves:
    its gates, its group mask (a pruned group: zero columns) and its input origin c applied (bias − c·Σ_j W_j)."""
    if not isinstance(layer, GroupSparseLayer):
        return layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    weight = layer.posterior_mean().detach() * layer._per_unit(layer.group_mask.to(layer.weight_mu.dtype))
    bias = layer.posterior_bias()
    origin = layer._origin
    if origin:
        bias = (torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias)
        bias = bias - origin * weight.sum(1)
    return weight, bias


def plain_linear(layer: nn.Module, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A plain `nn.Linear` computing what `layer` (plain or group-sparse, masked) computes at evaluation, restricted
    to the outputs `rows` and the inputs `cols` (bool masks; None: all)."""
    weight, bias = linear_weights(layer)
    if rows is not None:
        rows = rows.to(weight.device)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def shrink_attention(attn: AttentionHeads, keep: Tensor | None = None) -> AttentionHeads:
    """A plain `AttentionHeads` with the heads `keep` only (bool per head; None: out_proj's group mask, i.e. the
    masked model's heads), equal to the masked Bayesian module at evaluation. `attn` is not modified.

    Head h's rows of q/k/v and columns of out_proj go with it; the queries keep their 1/√head_dim scale. With no
    head kept the module outputs out_proj's bias (its masked model does the same).
    """
    if keep is None:
        out = attn.out_proj
        keep = out.group_mask.detach().cpu() if isinstance(out, GroupSparseLayer) else torch.ones(attn.num_heads, dtype=torch.bool)
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool or keep.shape != (attn.num_heads,):
        raise ValueError(f"keep must be a bool tensor of shape ({attn.num_heads},) (one per head), "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    features = keep.repeat_interleave(attn.head_dim)  # head h = features h·d … (h+1)·d − 1 of q, k, v
    heads = attn.heads.detach().cpu()[keep]
    bias = attn.out_proj.bias_mu is not None if isinstance(attn.out_proj, GroupSparseLayer) else attn.out_proj.bias is not None
    new = AttentionHeads(attn.embed_dim, int(keep.sum()), head_dim=attn.head_dim, bias=bias, dropout=attn.dropout,
                         batch_first=attn.batch_first, heads=heads, total_heads=attn.total_heads)
    new.q_proj = plain_linear(attn.q_proj, rows=features)
    new.k_proj = plain_linear(attn.k_proj, rows=features)
    new.v_proj = plain_linear(attn.v_proj, rows=features)
    new.out_proj = plain_linear(attn.out_proj, cols=features)
    return new.to(attn.heads.device).train(attn.training)


@torch.no_grad()
def decided_attention(attn: AttentionHeads, path: str, masks: Mapping[str, LayerMask],
                      bits: Mapping[str, int] | None = None) -> AttentionHeads:
    """The compressed engine's surgery of the `AttentionHeads` at `path` under a decision (`analysis.attention_masks`):
    each projection computes with its own group keep (not its `group_mask` buffer: `compress(keeps=...)` does not
    modify the model), the heads kept are out_proj's kept groups (`shrink_attention`), and each projection named
    in `bits` has its weights rounded to that many mantissa bits. `attn` is not modified."""
    work = copy.deepcopy(attn)
    for part in PROJECTIONS:
        layer, lm = getattr(work, part), masks[f"{path}.{part}"]
        if isinstance(layer, GroupSparseLayer) and lm.group_keep is not None:
            layer.group_mask.copy_(lm.group_keep.to(layer.group_mask.device))
    keep = masks[f"{path}.out_proj"].group_keep
    new = shrink_attention(work, None if keep is None else keep.detach().cpu().clone())
    for part in PROJECTIONS:
        name = f"{path}.{part}"
        if bits is not None and name in bits:
            proj = getattr(new, part)
            proj.weight.copy_(round_to_bits(proj.weight, bits[name]))
    return new
