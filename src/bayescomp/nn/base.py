"""The group-sparse layer: one forward pass (local reparameterisation), written once.

A group-sparse layer holds a Gaussian posterior over "unscaled" weights w̃ ~ N(μ, σ²) and a
posterior over one scale z_i per group; the weight is w = z_i · w̃. What differs between priors
(normal-Jeffreys, horseshoe) is only how z is parameterised, sampled and penalised: subclasses
provide `z_mean()`, `z_variance()`, `sample_z(n)`, `kl_z()` and `log_alpha()`. What differs between
layer kinds (Linear, Conv1d/Conv2d) is only the affine map and where the gate sits: `LinearKind` gates
the inputs (one group per input unit), `ConvKind` gates the outputs (one group per output channel).

Forward pass:

* training: z is sampled per example; the pre-activation's mean m and variance v are computed
  with two affine maps (means μ, variances σ²), and one Gaussian sample m + √v·ε is returned
  (Kingma et al.'s local reparameterisation trick; `lrt.py` holds it with its gradient written out);
* evaluation: z is its posterior mean and the output is the posterior-mean network's output,
  i.e. exactly what the compressed plain layer computes with weights `posterior_mean()`.

A boolean buffer `group_mask` (all True by default) multiplies z: it lets a user, or a test,
run the *masked* Bayesian network that pruning promises to reproduce.

An input origin c (`set_input_origin`; 0 by default) makes the layer compute on x − c: an input at
its origin then adds neither signal nor sampling noise (the local reparameterisation's variance is
Σ (x_j − c)²·Var[w_ij]), which is what "no signal" means for data whose blank value is not 0 (MNIST
here is in [−1, 1], background −1). The compressed plain layer takes x itself: W(x − c) + b is folded
into W·x + (b − c·Σ_j W_j) (`compress.weights.fold_origin`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .kl import kl_gaussian_std_normal

LOGVAR_INIT = -9.0
INIT_STD = 1e-2


def zero_padded(conv: nn.Module) -> bool:
    """Whether a convolution (plain or group-sparse) pads its input."""
    p = conv.padding
    return p != "valid" and (p == "same" or any(v > 0 for v in torch.nn.modules.utils._pair(p)))


#: the kinds of a Bayesian model's parameters, for per-kind learning rates (`parameter_kind`)
PARAMETER_KINDS = ("mean", "variance", "scale")


def parameter_kind(name: str, model: nn.Module) -> str:
    """The kind of the parameter `name` of `model`: "variance" (a weight's or bias's log-variance), "scale"
    (a group scale's parameters: z's of GNJ, the log-normal factors of GHS), else "mean" (posterior means
    of weights and biases, and every parameter outside a group-sparse layer, e.g. batch norm's)."""
    owner, _, local = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if not isinstance(module, GroupSparseLayer):
        return "mean"
    if local in ("weight_mu", "bias_mu"):
        return "mean"
    if local in ("weight_logvar", "bias_logvar"):
        return "variance"
    return "scale"


class _SampledZ(torch.autograd.Function):
    """z drawn by a layer's `_z_draw` from its scale parameters, as one autograd node whose gradient is the
    layer's `_z_grads` (the prior's expression written out: one node where autograd records three to fifteen)."""

    @staticmethod
    def forward(ctx, layer, n: int, *params: Tensor) -> Tensor:  # type: ignore[override]
        z, saved = layer._z_draw(params, n)
        ctx.layer = layer
        ctx.save_for_backward(*saved)
        return z

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return None, None, *ctx.layer._z_grads(ctx.saved_tensors, g)


def sampled_z(layer: GroupSparseLayer, n: int) -> Tensor:
    """One z per example and group, shape (n, n_groups), drawn from `layer`'s posterior (see `_SampledZ`)."""
    return _SampledZ.apply(layer, n, *layer._z_params())


class GroupSparseLayer(nn.Module):
    """Base of every group-sparse layer. Not used directly."""

    #: the weight axis along which groups run (1 = inputs of a Linear, 0 = outputs of a Conv)
    group_dim: int
    #: name of the prior, set by subclasses ("gnj", "ghs")
    prior: str
    #: the log_alpha() threshold used when the user gives none, set by subclasses
    default_threshold: float
    #: scores below this are signal: a histogram mode below it is never pruned (set by subclasses)
    noise_floor: float

    #: set by `fuse_weight_kl`: the training forward also returns the weights' KL (see there)
    _fuse_kl: bool = False
    #: (KL tensor, versions of the layer's parameters, whether it is the whole layer's KL or only the weights' and
    #: bias's) left by the last fused forward
    _kl_stash: tuple[Tensor, tuple[int, ...], bool] | None = None
    #: set by `zdraw.draw_z`: training draws one z for the whole batch, shape (1, groups), not one per example
    _z_shared: bool = False

    weight_mu: nn.Parameter
    weight_logvar: nn.Parameter
    bias_mu: nn.Parameter | None
    bias_logvar: nn.Parameter | None
    group_mask: Tensor

    def __init__(self, weight_shape: tuple[int, ...], n_groups: int, bias: bool, max_var: float | None) -> None:
        super().__init__()
        if max_var is not None and not (max_var > 0 and math.isfinite(max_var)):
            raise ValueError(f"max_var must be a positive finite number, got {max_var!r}")
        self.max_var = max_var
        self.weight_mu = nn.Parameter(torch.empty(weight_shape))
        self.weight_logvar = nn.Parameter(torch.empty(weight_shape))
        out = weight_shape[0]
        if bias:
            self.bias_mu = nn.Parameter(torch.zeros(out))
            self.bias_logvar = nn.Parameter(torch.empty(out))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_logvar", None)
        self.register_buffer("group_mask", torch.ones(n_groups, dtype=torch.bool))
        self.register_buffer("input_origin", torch.zeros(()))
        self._origin = 0.0  # the buffer's value as a Python float (read by every forward without a sync)
        self.n_groups = n_groups

    # ---- input origin -------------------------------------------------------------------------
    def set_input_origin(self, origin: float) -> None:
        """Compute on x − `origin` from now on (see the module doc). Not for a zero-padded convolution,
        whose border taps would see x = origin in the padding, which no plain convolution of x reproduces."""
        try:
            origin = float(origin)
        except (TypeError, ValueError):
            raise ValueError(f"input origin must be a finite number, got {origin!r}") from None
        if not math.isfinite(origin):
            raise ValueError(f"input origin must be a finite number, got {origin!r}")
        if origin != 0.0 and self._zero_padded():
            raise ValueError(f"an input origin needs an unpadded convolution: its zero padding of x − origin "
                             f"would stand for x = {origin:g}, which a plain convolution of x (padding 0) cannot do")
        with torch.no_grad():
            self.input_origin.fill_(origin)
        self._origin = origin

    def _zero_padded(self) -> bool:
        return False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # a state saved before input origins existed has none: its layers computed on x itself
        state_dict.setdefault(prefix + "input_origin", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._origin = float(self.input_origin)

    # ---- initialisation -------------------------------------------------------------------
    def _init_variational(self) -> None:
        with torch.no_grad():
            self.weight_logvar.normal_(LOGVAR_INIT, INIT_STD)
            if self.bias_logvar is not None:
                self.bias_logvar.normal_(LOGVAR_INIT, INIT_STD)
                self.bias_mu.zero_()

    def load_plain(self, weight: Tensor, bias: Tensor | None) -> None:
        """Take a plain layer's weights as the posterior means (for a pretrained start).

        With an input origin c the bias becomes b + c·Σ_j W_j (W_j·E[z_j] for a Linear layer), so that the
        evaluation forward on x − c computes what the plain layer computes on x, up to E[z] (a layer without a
        bias cannot absorb the shift: refused).
        """
        if tuple(weight.shape) != tuple(self.weight_mu.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match {tuple(self.weight_mu.shape)}")
        if self._origin != 0.0 and (self.bias_mu is None or bias is None):
            raise ValueError("a layer with an input origin needs a bias to start from a plain layer's weights")
        with torch.no_grad():
            self.weight_mu.copy_(weight)
            if self.bias_mu is not None and bias is not None:
                # the evaluation forward's weights: z gates a Linear's inputs (a conv's gate covers its bias too)
                scaled = weight * self._per_unit(self.z_mean()).view(self._z_shape()) if self.group_dim == 1 else weight
                self.bias_mu.copy_(bias + self._origin * scaled.flatten(1).sum(1))

    # ---- the prior-specific part (subclasses) -----------------------------------------------
    def z_mean(self) -> Tensor:  # pragma: no cover - abstract
        """E_q[z_i] per group: the value of z used at evaluation and in the compressed layer."""
        raise NotImplementedError

    def z_variance(self) -> Tensor:  # pragma: no cover - abstract
        """Var_q[z_i] per group."""
        raise NotImplementedError

    def sample_z(self, n: int) -> Tensor:  # pragma: no cover - abstract
        """One z per example and group, shape (n, n_groups)."""
        raise NotImplementedError

    def kl_z(self) -> Tensor:  # pragma: no cover - abstract
        """KL of the scale variables (and any global scale) from their prior."""
        raise NotImplementedError

    def log_alpha(self) -> Tensor:  # pragma: no cover - abstract
        """One pruning score per group: high means prunable."""
        raise NotImplementedError

    # The same, as parts of one fused training step (`_SampledZ`, `lrt.gated_linear_lrt`): functions of the scale
    # parameters and of what their forward saved, with the gradients written out.
    def _z_params(self) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        """The scale parameters, in the order the four functions below take and return them."""
        raise NotImplementedError

    def _z_draw(self, params: tuple[Tensor, ...], n: int) -> tuple[Tensor, tuple[Tensor, ...]]:  # pragma: no cover
        """`sample_z(n)` from `params`, and the tensors `_z_grads` needs."""
        raise NotImplementedError

    def _z_grads(self, saved: tuple[Tensor, ...], gz: Tensor) -> tuple[Tensor, ...]:  # pragma: no cover
        """The parameters' gradients for ∂L/∂z = gz (not modified)."""
        raise NotImplementedError

    def _z_grads_of_gated_input(self, saved: tuple[Tensor, ...], gu: Tensor, x: Tensor, u: Tensor) -> tuple[Tensor, ...]:
        """`_z_grads` where z gates a Linear layer's inputs, u = x ⊙ z, from gu = ∂L/∂u (overwritten): ∂L/∂z = x ⊙ gu."""
        return self._z_grads(saved, gu.mul_(x))

    def _kl_z_forward(self, params: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:  # pragma: no cover
        """`kl_z()` from `params`, and the tensors `_kl_z_backward` needs."""
        raise NotImplementedError

    def _kl_z_backward(self, saved: tuple[Tensor, ...], g: Tensor) -> tuple[Tensor, ...]:  # pragma: no cover
        """The parameters' gradients of `kl_z()` times g."""
        raise NotImplementedError

    # ---- the shared part ----------------------------------------------------------------------
    def kl(self) -> Tensor:
        """KL(q || p) of the whole layer: scales, weights and bias. Non-negative.

        Under `fuse_weight_kl` the training forward has computed it (all of it, or the weights' and bias's part)
        on the same parameter values; it is used once, then computed afresh.
        """
        stash = self._kl_stash
        if stash is not None:
            self.__dict__["_kl_stash"] = None
            value, versions, whole = stash
            if versions == self._versions():
                return value if whole else self.kl_z() + value
        return self.kl_z() + self._params_kl()

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._parameters.values() if p is not None)

    def _params_kl(self) -> Tensor:
        """KL of the weights and the bias from N(0, 1)."""
        kl = kl_gaussian_std_normal(self.weight_mu, self.weight_logvar)
        if self.bias_mu is not None:
            kl = kl + kl_gaussian_std_normal(self.bias_mu, self.bias_logvar)
        return kl

    def _keep_kl(self, result, whole: bool = False):
        """The output of a fused training forward: stash the KL (of the whole layer if `whole`), return the sample."""
        if not self._fuse_kl:
            return result
        out, kl = result
        self.__dict__["_kl_stash"] = (kl, self._versions(), whole)
        return out

    def _per_unit(self, z: Tensor) -> Tensor:  # per-group values as per-unit ones (a Linear's group_size repeats)
        return z

    def _z_shape(self) -> list[int]:
        shape = [1] * self.weight_mu.dim()
        shape[self.group_dim] = -1
        return shape

    def posterior_mean(self) -> Tensor:
        """E[w] = E[z]·μ for every weight, in the weight's shape (mask not applied)."""
        return self.weight_mu * self._per_unit(self.z_mean()).view(self._z_shape())

    def posterior_variance(self) -> Tensor:
        """Var[w] = Var[z]·(σ² + μ²) + E[z]²·σ² for every weight (z and w̃ independent under q)."""
        shape = self._z_shape()
        ez = self._per_unit(self.z_mean()).view(shape)
        vz = self._per_unit(self.z_variance()).view(shape)
        var_w = self.weight_logvar.exp()
        return vz * (var_w + self.weight_mu.pow(2)) + ez.pow(2) * var_w

    def posterior_bias(self) -> Tensor | None:
        """The bias the evaluation forward adds (scaled by z where the gate covers the bias)."""
        raise NotImplementedError  # pragma: no cover - defined by the kind

    def clamp_variances(self) -> None:
        """Clamp σ² of weights and bias to ≤ max_var (the paper's 'constrained standard deviations').

        Called by the trainer after each optimiser step when `max_var` is set.
        """
        if self.max_var is None:
            return
        bound = math.log(self.max_var)
        with torch.no_grad():
            self.weight_logvar.clamp_(max=bound)
            if self.bias_logvar is not None:
                self.bias_logvar.clamp_(max=bound)

    def _kept(self) -> Tensor | None:
        """The indices of the groups that are on, or None when every one is (`_mask_is_full`).

        Cached against the mask tensor itself and its version counter, which every in-place change bumps
        (`apply_masks`, `load_state_dict`, `mask[i] = False`); assigning a new tensor is a different object. So
        the mask is read (a device sync on CUDA) only when it changed.
        """
        mask = self.group_mask
        cached = self.__dict__.get("_kept_cache")
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = (mask, mask._version, None if bool(mask.all()) else mask.nonzero().flatten())
            self.__dict__["_kept_cache"] = cached
        return cached[2]

    def _mask_is_full(self) -> bool:
        """Whether every group is on: then the gate needs no multiplication by the mask."""
        return self._kept() is None

    def _gate(self, n: int) -> Tensor:
        z = self.sample_z(1 if self._z_shared else n) if self.training else self.z_mean()
        if self._mask_is_full():
            return z  # (training: spares a pass over the (n, groups) samples, and its backward)
        return z * self.group_mask.to(z.dtype)  # (an explicit cast of the n-vector: cheaper than promoting z)

    def forward(self, x: Tensor) -> Tensor:
        if self._origin != 0.0:
            x = x - self._origin
        if self.training and self._fused_forward_applies(x):
            return self._fused_stochastic(x)
        z = self._gate(x.shape[0])
        if self.training:
            return self._stochastic(x, z)
        return self._deterministic(x, z)

    def _fused_forward_applies(self, x: Tensor) -> bool:
        """Whether the training forward can draw z inside one fused node (`_fused_stochastic`)."""
        return False

    # defined by the kind
    def _fused_stochastic(self, x: Tensor) -> Tensor: raise NotImplementedError  # noqa: E704  # pragma: no cover
    def _stochastic(self, x: Tensor, z: Tensor) -> Tensor: raise NotImplementedError  # noqa: E704  # pragma: no cover
    def _deterministic(self, x: Tensor, z: Tensor) -> Tensor: raise NotImplementedError  # noqa: E704  # pragma: no cover
