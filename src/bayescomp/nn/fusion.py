"""`fuse_weight_kl`: compute each group-sparse layer's KL inside its training forward (one backward for both)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .base import GroupSparseLayer


@contextmanager
def fuse_weight_kl(model: nn.Module) -> Iterator[None]:
    """Within this block, each training forward of a group-sparse layer also computes its KL: a Linear
    layer's whole KL (scales, weights, bias: its forward is one node, `lrt.gated_linear_lrt`), a
    convolution's weights and bias.

    The next `kl()` of the layer then returns that value, and its gradient is added inside the layer's
    own backward pass: the σ² = exp(log σ²) of the forward is reused, and no second set of weight-sized
    gradient buffers is made and summed (for LeNet-300-100's fc1, one exp and about four passes over its
    235,200 weights fewer per step), and a Linear layer's scale KL needs no autograd node of its own.
    `fit` uses it; the result is the same as without it.

    The contract it relies on, which `fit` keeps: after each forward, the loss adds `kl()` and ONE
    backward pass runs through both (a `kl()` computed after a later forward, after the parameters
    changed, or outside the block is computed afresh). Do not use it when the KL is backpropagated in a
    separate `backward()` call from the data term.
    """
    layers = [m for m in model.modules() if isinstance(m, GroupSparseLayer)]
    for layer in layers:
        layer._fuse_kl = True
    try:
        yield
    finally:
        for layer in layers:
            layer._fuse_kl = False
            layer._kl_stash = None
