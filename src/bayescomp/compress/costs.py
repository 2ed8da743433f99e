"""What a forward pass costs: multiply-adds counted from the shapes a pass meets.

A fully connected layer computes, per output value, one multiply-add per input feature; a convolution,
per output value, one per weight of the filter that output reads (in_channels/groups · kernel volume).
So the count of one layer call is `numel(output) · fan_in`, read off the output's shape by a forward hook.
A group-sparse layer counts as its plain twin (its evaluation forward is its plain twin's forward at the
posterior mean, times the gates), so a Bayesian model and the model compressed from it are counted alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn import GroupSparseLayer

Example = Tensor | tuple[Tensor, ...]

#: the plain layers counted (a group-sparse layer is counted as its plain twin)
COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_fan_in(module: nn.Module) -> int | None:
    """Multiply-adds per output value of a counted layer (None: the module is not counted)."""
    if not isinstance(module, (*COUNTED, GroupSparseLayer)):
        return None
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.in_channels // module.groups) * math.prod(module.kernel_size)


def attention_projections(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    """Multiply-adds of the q/k/v/out projections of one `nn.MultiheadAttention` call on (query, key, value).

    Every query token is projected by E×E weights in and E×E out, every key token by kdim×E, every value
    token by vdim×E (E = embed_dim): 2·n_q·E² + n_k·kdim·E + n_v·vdim·E, for any batch layout (the token
    count of a tensor is its size over its last dimension).
    """
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[names[i]] for i in range(3))
    e = module.embed_dim
    return (2 * (q.numel() // e) * e * e + (k.numel() // module.kdim) * module.kdim * e
            + (v.numel() // module.vdim) * module.vdim * e)


def _batch_size(example_input: Example) -> int:
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    if not isinstance(first, Tensor) or first.dim() == 0 or first.shape[0] < 1:
        raise ValueError("example_input must be a batch (a tensor, or a tuple of tensors, whose first dimension "
                         "counts the examples)")
    return int(first.shape[0])


@torch.no_grad()
def multiply_adds(model: nn.Module, example_input: Example) -> int:
    """Multiply-adds of one forward pass of `model` (in evaluation mode) on ONE example.

    `example_input`: a batch the model accepts (a tensor, or a tuple of the forward's tensors), the
    examples along dimension 0; the pass runs on it and the count is divided by its size.

    Counted: every call of an `nn.Linear` (on inputs of any rank: every output value is one dot product of
    `in_features` terms), `nn.Conv1d`/`Conv2d`/`Conv3d` (grouped too: `in_channels/groups · kernel volume`
    per output value) and a group-sparse layer, as its plain twin's forward at the posterior mean. A layer
    called twice counts twice. Not counted: biases, activations, normalisation, pooling, element-wise
    ops, the gates of a group-sparse layer, and any matrix product not made by one of those modules
    (`F.linear` or `torch.matmul` in a forward, attention scores). An `AttentionHeads` counts its four
    projections (q/k/v/out, Linear modules: a shrunk one with fewer heads counts fewer), not its scores Q·Kᵀ
    or their product with V; a plain `nn.MultiheadAttention`, whose projections are not module calls, counts
    the same four (`attention_projections`), so a transformer and its converted twin are counted alike.
    """
    n = _batch_size(example_input)
    total = 0

    def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * layer_fan_in(module)

    def count_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> None:
        nonlocal total
        total += attention_projections(module, args, kwargs)

    handles = [m.register_forward_hook(count) for m in model.modules() if layer_fan_in(m) is not None]
    handles += [m.register_forward_hook(count_attention, with_kwargs=True) for m in model.modules()
                if isinstance(m, nn.MultiheadAttention)]
    was_training = model.training
    model.eval()
    try:
        model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // n


__all__ = ["COUNTED", "attention_projections", "layer_fan_in", "multiply_adds"]
