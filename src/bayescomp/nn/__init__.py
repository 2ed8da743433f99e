"""Group-sparse Bayesian layers (see `base.GroupSparseLayer` for the contract)."""

from .attention import AttentionHeads, head_group_sizes
from .base import PARAMETER_KINDS, GroupSparseLayer, parameter_kind, zero_padded
from .fusion import fuse_weight_kl
from .ghs import Conv1dGroupHS, Conv2dGroupHS, LinearGroupHS
from .gnj import Conv1dGroupNJ, Conv2dGroupNJ, LinearGroupNJ
from .kl import kl_gaussian_std_normal, kl_log_uniform
from .zdraw import Z_DRAWS, draw_z

__all__ = [
    "AttentionHeads",
    "head_group_sizes",
    "GroupSparseLayer",
    "PARAMETER_KINDS",
    "parameter_kind",
    "zero_padded",
    "fuse_weight_kl",
    "draw_z",
    "Z_DRAWS",
    "LinearGroupNJ",
    "Conv2dGroupNJ",
    "Conv1dGroupNJ",
    "LinearGroupHS",
    "Conv2dGroupHS",
    "Conv1dGroupHS",
    "kl_gaussian_std_normal",
    "kl_log_uniform",
]
