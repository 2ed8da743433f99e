"""Group-sparse Bayesian layers (see `base.GroupSparseLayer` for the contract)."""

from .base import GroupSparseLayer
from .gnj import Conv2dGroupNJ, LinearGroupNJ
from .kl import kl_gaussian_std_normal, kl_log_uniform

__all__ = [
    "GroupSparseLayer",
    "LinearGroupNJ",
    "Conv2dGroupNJ",
    "kl_gaussian_std_normal",
    "kl_log_uniform",
]
