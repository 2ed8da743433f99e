"""Helpers shared by test modules."""

from __future__ import annotations

import torch
from torch import nn

from bayescomp.nn import GroupSparseLayer


def randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial batch-norm statistics and posteriors, so that folding errors would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            if isinstance(m, GroupSparseLayer):
                m.z_mu.copy_(1 + 0.3 * torch.randn(m.n_groups, generator=gen))
