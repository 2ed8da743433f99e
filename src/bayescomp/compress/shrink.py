"""shrink(): the masks applied for real — a smaller plain network with pruned units removed.

The result is a flat `nn.Sequential` of plain `nn.Linear`, `nn.Conv2d`, `nn.BatchNorm*d`, the
original activation/pooling/flatten modules (a 2×2 `nn.MaxPool2d` becomes `FastMaxPool2d`, which computes
the same values faster), `Select` where a layer reads only some of the
features its predecessor produces (e.g. the kept pixels of the input image), and `AppendOnes` where
the constants of removed channels feed a zero-padded convolution. No Bayesian parameter
is left: weights are the posterior means E[w] (masked, optionally rounded to the layer's bits),
biases the posterior-mean biases plus any constant inputs folded in (see `masks`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from ..nn import GroupSparseLayer, zero_padded
from .chain import CHANNEL_AFFINE, WEIGHTED, chain, is_linear
from .masks import LayerMask, PruneError
from .precision import round_to_bits


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
    bayescomp.compress.shrink import FastMaxPool2d; x = torch.randn(256, 8, 24, 24); p = FastMaxPool2d(2);
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


def _copy_layer(m: nn.Module) -> nn.Module:
    """What a compressed model holds for a parameter-free module of the original: a copy, a plain
    `nn.MaxPool2d` as `FastMaxPool2d`."""
    return FastMaxPool2d.like(m) if type(m) is nn.MaxPool2d else copy.deepcopy(m)


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


@torch.no_grad()
def effective_params(module: nn.Module, lm: LayerMask) -> tuple[Tensor, Tensor]:
    """Full-size weight and bias the masked layer computes with at evaluation (gates applied)."""
    if isinstance(module, GroupSparseLayer):
        weight = module.posterior_mean().detach().clone()
        bias = module.posterior_bias()
        if lm.group_keep is not None:
            shape = [1] * weight.dim()
            shape[module.group_dim] = -1
            weight = weight * lm.group_keep.to(weight.dtype).view(shape)
            if bias is not None and module.group_dim == 0:
                bias = bias * lm.group_keep.to(bias.dtype)
    else:
        weight = module.weight.detach().clone()
        bias = None if module.bias is None else module.bias.detach().clone()
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight, bias


class AppendOnes(nn.Module):
    """Append one channel of ones (dimension 1): carries the constants of removed channels exactly."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_ones(x.shape[0], 1, *x.shape[2:])], dim=1)


def fold_origin(module: nn.Module, weight: Tensor, bias: Tensor) -> Tensor:
    """The bias of the plain layer for a layer that computes on x − c (its input origin c; `weight` as
    stored): bias − c·Σ_j W[o, j] per output o (summed over kernel taps too), so the plain layer takes x
    itself; `bias` unchanged where c = 0.

    Summed over every input, the removed ones included: a removed input's constant c_j then enters the
    layer as c_j − c, as it does in the masked model (`_constant_inputs` adds the c_j part).
    """
    origin = getattr(module, "_origin", 0.0) if isinstance(module, GroupSparseLayer) else 0.0
    return bias if origin == 0.0 else bias - origin * weight.flatten(1).sum(1)


def _constant_inputs(weight: Tensor, lm: LayerMask) -> tuple[Tensor, Tensor]:
    """Σ_j W[:, j]·c_j over the removed inputs j carrying a constant c_j ≠ 0 (a kernel for convs)."""
    const = lm.in_const.to(weight.dtype).to(weight.device)
    fold = torch.isfinite(const) & (const != 0) & ~lm.in_mask.to(weight.device)
    kernel = torch.einsum("oi...,i->o...", weight[:, fold], const[fold])
    return kernel, fold.any()


@torch.no_grad()
def shrink(model: nn.Module, masks: Mapping[str, LayerMask], bits: Mapping[str, int] | None = None) -> nn.Sequential:
    """A plain `nn.Sequential` computing what the masked model computes at evaluation.

    `bits` (layer name → mantissa bits) rounds each named layer's kept weights to 2^−bits.
    Raises `PruneError` if the masks do not fit the model.
    """
    out: list[tuple[str, nn.Module]] = []
    avail: Tensor | None = None  # which of the current features the shrunk network still carries
    pending_flatten = False
    for name, m in chain(model):
        safe = name.replace(".", "_")
        if isinstance(m, WEIGHTED):
            if name not in masks:
                raise PruneError(f"no mask for layer {name}")
            lm = masks[name]
            weight, bias = effective_params(m, lm)
            if bits is not None and name in bits:
                weight = round_to_bits(weight, bits[name])
            kernel, has_const = _constant_inputs(weight, lm)
            ones_channel = bool(has_const) and not is_linear(m) and zero_padded(m)
            if bool(has_const) and not ones_channel:
                bias = bias + (kernel if kernel.dim() == 1 else kernel.flatten(1).sum(1))
            bias = fold_origin(m, weight, bias)
            n_in = lm.in_mask.numel()
            if avail is None:
                avail = torch.ones(n_in, dtype=torch.bool)
            elif pending_flatten:
                if n_in % avail.numel():
                    raise PruneError(f"{name}: cannot map {avail.numel()} flattened channels onto {n_in} inputs")
                avail = avail.repeat_interleave(n_in // avail.numel())
            pending_flatten = False
            if avail.numel() != n_in:
                raise PruneError(f"{name}: mask over {n_in} inputs but {avail.numel()} features arrive")
            if bool((lm.in_mask & ~avail).any()):
                raise PruneError(f"{name}: keeps inputs that an earlier layer removed")
            if not torch.equal(lm.in_mask, avail):
                index = torch.nonzero(lm.in_mask[avail]).flatten()
                out.append((f"{safe}_select", Select(index, int(avail.sum()))))
            w = weight[lm.out_mask][:, lm.in_mask]
            b = bias[lm.out_mask]
            if ones_channel:
                out.append((f"{safe}_ones", AppendOnes()))
                extra = kernel[lm.out_mask].unsqueeze(1)
                if bits is not None and name in bits:  # a stored weight like any other: on the layer's grid
                    extra = round_to_bits(extra, bits[name])
                w = torch.cat([w, extra], dim=1)
            if is_linear(m):
                new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=True)
            else:
                new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1, bias=True)
            new = new.to(device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            new.bias.copy_(b)
            out.append((safe, new))
            avail = lm.out_mask.clone()
        elif isinstance(m, CHANNEL_AFFINE):
            out.append((safe, _slice_batch_norm(m, avail)))
        elif isinstance(m, nn.Flatten):
            pending_flatten = avail is not None
            out.append((safe, copy.deepcopy(m)))
        else:
            out.append((safe, _copy_layer(m)))
    shrunk = nn.Sequential()
    for name, mod in out:
        shrunk.add_module(name, mod)
    return shrunk.eval()


def _slice_batch_norm(bn: nn.Module, keep: Tensor | None) -> nn.Module:
    new = copy.deepcopy(bn)
    if keep is None or bool(keep.all()):
        return new
    if keep.numel() != bn.num_features:
        raise PruneError(f"batch norm with {bn.num_features} channels follows a layer with {keep.numel()} outputs")
    new.num_features = int(keep.sum())
    for attr in ("weight", "bias"):
        p = getattr(bn, attr)
        if p is not None:
            setattr(new, attr, nn.Parameter(p.detach()[keep].clone()))
    for attr in ("running_mean", "running_var"):
        buf = getattr(bn, attr)
        if buf is not None:
            setattr(new, attr, buf[keep].clone())
    return new
