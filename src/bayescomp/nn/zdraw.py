"""`draw_z`: how a training forward draws the group scales z: one per example, or one per batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .base import GroupSparseLayer

#: how z may be drawn in training (`draw_z`, `TrainConfig.z_draw`)
Z_DRAWS = ("example", "batch")


@contextmanager
def draw_z(model: nn.Module, per: str = "example") -> Iterator[None]:
    """Within this block each group-sparse layer of `model` draws its scales z, in training, once per `per`:

    - "example" (the paper's, and its code's): every example of a batch its own z, an (n, groups) draw;
    - "batch": one z, a (1, groups) draw, shared by the batch's examples.

    Both give an unbiased estimate of the same ELBO and its gradient; they differ in its variance. The weights'
    local reparameterisation (the pre-activation's noise, one per example and output) is the same in both.
    Why "batch" exists: the draw. On LeNet-300-100 a training step draws about 200,000 normal numbers, three in
    four of them for z (128 × (784 + 300 + 100)), and the draws are the largest cost of a Bayesian step beyond
    its matrix products (benchmarks/README.md, Speed). Where the ELBO's noise from the shared z does not hurt
    (chosen on a validation split: `recipes.FAST`), drawing once per batch saves that time.
    """
    if per not in Z_DRAWS:
        raise ValueError(f"z is drawn per one of {', '.join(Z_DRAWS)}, got {per!r}")
    layers = [m for m in model.modules() if isinstance(m, GroupSparseLayer)]
    before = [layer._z_shared for layer in layers]
    for layer in layers:
        layer._z_shared = per == "batch"
    try:
        yield
    finally:
        for layer, shared in zip(layers, before, strict=True):
            layer._z_shared = shared
