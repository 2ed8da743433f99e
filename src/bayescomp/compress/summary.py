"""The report fields of a compression decision (every rate from `rates.rates`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..nn import GroupSparseLayer
from .masks import LayerMask
from .rates import LayerCount, rates


def summarize(
    layers: Sequence[tuple[str, nn.Module, LayerMask, int]],
    bits: Mapping[str, int],
    exponent_bits: int,
    thresholds: Mapping[str, float],
    accounting: str,
) -> dict[str, Any]:
    """Report fields for weighted layers given as (name, original module, mask, weights kept), in execution order.

    The architecture string lists kept inputs of each fully connected layer and kept output channels of
    each convolution (the paper's Table 1 notation); every rate comes from `rates.rates`.
    """
    counts, per_layer, arch = [], [], []
    priors = sorted({m.prior for _, m, _, _ in layers if isinstance(m, GroupSparseLayer)})
    for name, m, lm, kept in layers:
        total = (m.posterior_mean() if isinstance(m, GroupSparseLayer) else m.weight).numel()
        b = bits.get(name)
        counts.append(LayerCount(name, total, kept, b))
        linear = hasattr(m, "in_features")
        arch.append(int(lm.in_mask.sum()) if linear else int(lm.out_mask.sum()))
        per_layer.append({
            "name": name,
            "kind": "linear" if linear else f"conv{len(m.kernel_size)}d",
            "groups_total": getattr(m, "n_groups", None),
            "groups_kept": None if lm.group_keep is None else int(lm.group_keep.sum()),
            "threshold": thresholds.get(name) if isinstance(m, GroupSparseLayer) else None,
            "bits": b,
            "inputs_total": lm.in_mask.numel(),
            "inputs_kept": int(lm.in_mask.sum()),
            "outputs_total": lm.out_mask.numel(),
            "outputs_kept": int(lm.out_mask.sum()),
            "weights_total": total,
            "weights_kept": kept,
        })
    report: dict[str, Any] = {
        "prior": priors[0] if len(priors) == 1 else "+".join(priors),
        "architecture": "-".join(str(a) for a in arch),
        "bits": [bits.get(name) for name, _, _, _ in layers],
        "exponent_bits": exponent_bits,
        "bit_accounting": accounting,
        "thresholds": {name: thresholds.get(name) for name, _, _, _ in layers if name in thresholds},
    }
    report.update(rates(counts, exponent_bits, accounting))
    report["layers"] = per_layer
    return report
