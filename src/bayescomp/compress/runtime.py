"""The modules a compressed model runs besides plain PyTorch layers, shared by the surgery and `io`.

* `Select`: keep some features along dimension 1 (a fixed gather);
* `AppendOnes`: one extra channel of ones, carrying removed channels' constants into a zero-padded conv;
* `Realign`: rebuild a channel set, putting back constant channels the shrunk network does not carry;
* `FastMaxPool2d`: `nn.MaxPool2d` with a faster 2×2 case on the CPU (stored as ``MaxPool2d``).

They hold buffers only (no parameters), so a model file stores them by type name and sizes.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn


class Select(nn.Module):
    """Keep the features `index` along dimension 1 (a fixed gather; exports to ONNX as Gather)."""

    def __init__(self, index: Tensor | list[int], n_in: int | None = None) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())
        self.n_in = n_in

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.n_in}" if self.n_in is not None else f"{self.index.numel()}"


class AppendOnes(nn.Module):
    """Append one channel of ones (dimension 1): carries the constants of removed channels exactly."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_ones(x.shape[0], 1, *x.shape[2:])], dim=1)


class Realign(nn.Module):
    """Rebuild a channel set: ``out[:, dst] = x[:, src]``; every other channel is its constant `fill`.

    Used where an op must see channels that the shrunk network does not carry because they are
    constant (e.g. one operand of a residual sum whose channel was pruned while the other varies).
    """

    def __init__(self, src: Tensor, dst: Tensor, fill: Tensor) -> None:
        super().__init__()
        self.register_buffer("src", torch.as_tensor(src, dtype=torch.long).clone())
        self.register_buffer("dst", torch.as_tensor(dst, dtype=torch.long).clone())
        self.register_buffer("fill", fill.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = [x.shape[0], self.fill.numel(), *x.shape[2:]]
        out = self.fill.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2))).expand(shape).contiguous()
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{self.src.numel()} carried + {self.fill.numel() - self.src.numel()} constant channels"


_TWO = (2, (2, 2))


class FastMaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` whose 2×2, stride-2 case is computed as two element-wise maxima of strided slices.

    For kernel 2, stride 2 (or None), padding 0, dilation 1, floor mode and no indices, on a 3-D or 4-D
    floating-point input of height and width ≥ 2 and at least `min_elements` numbers, the forward is

        a = torch.maximum(x[..., :h, 0:w:2], x[..., :h, 1:w:2])      # h, w: height and width rounded down
        out = torch.maximum(a[..., 0::2, :], a[..., 1::2, :])        # to even: floor mode drops the last row/column

    Every other configuration (ResNet's 3×3/2 stem with padding 1, ceil mode, indices, …) and every other
    input runs `nn.MaxPool2d.forward` unchanged.

    Why: on the CPU, PyTorch 2.13's max_pool2d kernel for NCHW tensors is several times slower than these
    two passes on large inputs. ``OMP_NUM_THREADS=1 python -m timeit -s "import torch; from
    bayescomp.compress.runtime import FastMaxPool2d; x = torch.randn(256, 8, 24, 24); p = FastMaxPool2d(2);
    p.min_elements = 0" "p(x)"`` against the same with ``p = torch.nn.MaxPool2d(2)`` (2-core x86 machine
    under load, 1 thread, best of 5): 0.73 ms against 6.9 ms; for (256, 20, 24, 24), 3.7 ms against 21.9
    ms. In the compressed LeNet-5-Caffe the first pooling was the largest single cost of inference at
    batch 256. The two passes are six tensor operations, each with a fixed overhead, so on small inputs
    max_pool2d is faster: (1, 13, 8, 8), 21 µs against 7.4 µs; (1, 12, 24, 24), 26 µs against 21 µs;
    (2, 8, 24, 24), 27 µs against 26 µs; (1, 20, 24, 24), 29 µs against 42 µs. Hence `min_elements`,
    about where the two broke even: smaller inputs (batch 1 of LeNet-5) run max_pool2d.

    The values are those of `nn.MaxPool2d`: a maximum of the same four numbers, so `torch.equal` holds on
    inputs without NaN (and the bits agree on inputs without zeros). Both propagate NaN: a window holding a
    NaN gives NaN in both, the other windows the same values.
    One difference in bits only: where a window's maximum is a tie between +0.0 and −0.0, the two kernels
    may pick different signs of zero (equal values). Gradients agree where each window has a single
    maximum; on ties max_pool2d sends the whole gradient to one of the tied inputs, torch.maximum
    splits it among them.

    The module stores and loads as `nn.MaxPool2d` (same type name and fields in model files, see
    `io.plain`); ONNX export writes a standard MaxPool node (`io.export`).
    """

    #: inputs with fewer numbers run max_pool2d (faster there, see above); 0 takes the fast path whenever it can
    min_elements = 8192

    def _two_by_two(self) -> bool:
        return (self.kernel_size in _TWO and (self.stride in _TWO or self.stride in (None, ()))  # None: = kernel
                and self.padding in (0, (0, 0)) and self.dilation in (1, (1, 1)) and not self.ceil_mode
                and not self.return_indices)

    def forward(self, x: Tensor) -> Tensor:
        if (x.numel() >= max(self.min_elements, 1) and x.dim() in (3, 4) and x.is_floating_point()
                and x.shape[-2] >= 2 and x.shape[-1] >= 2 and self._two_by_two()):
            h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
            a = torch.maximum(x[..., :h, 0:w:2], x[..., :h, 1:w:2])
            return torch.maximum(a[..., 0::2, :], a[..., 1::2, :])
        return super().forward(x)

    @classmethod
    def like(cls, pool: nn.MaxPool2d) -> FastMaxPool2d:
        """A FastMaxPool2d with `pool`'s settings (and training flag)."""
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)
        return new.train(pool.training)


def with_pooling(model: nn.Module, fast: bool) -> nn.Module:
    """A copy of `model` whose `nn.MaxPool2d` modules are `FastMaxPool2d` (`fast`), or whose `FastMaxPool2d`
    modules are plain `nn.MaxPool2d` (not `fast`; e.g. for an exporter that should see the standard op).

    Other modules, subclasses of `nn.MaxPool2d` included, are copied as they are.
    """
    source = FastMaxPool2d if not fast else nn.MaxPool2d

    def swapped(m: nn.MaxPool2d) -> nn.MaxPool2d:
        if fast:
            return FastMaxPool2d.like(m)
        plain = nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
        return plain.train(m.training)

    if type(model) is source:
        return swapped(model)
    copied = copy.deepcopy(model)
    for name, m in list(copied.named_modules()):
        if name and type(m) is source:
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, swapped(m))
    if isinstance(model, fx.GraphModule):  # a deep copy of a GraphModule is named "GraphModule": keep the name
        copied = fx.GraphModule(copied, copied.graph, class_name=type(model).__name__).train(model.training)
    return copied
