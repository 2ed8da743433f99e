"""Group normal-Jeffreys (BC-GNJ, "group variational dropout") layers.

Prior: p(z_i) ∝ 1/|z_i| and p(w_ij | z_i) = N(0, z_i²).
Posterior: q(z_i) = N(μ_zi, σ_zi²), q(w̃_ij) = N(μ_ij, σ_ij²) with w = z·w̃, parameterised by
(z_mu, z_logvar) as in Molchanov et al.'s additive-noise reparameterisation.
The group's dropout rate is α_i = σ_zi² / μ_zi²; its log is the pruning score.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import INIT_STD, LOGVAR_INIT, sampled_z
from .kinds import ConvKind, LinearKind
from .kl import group_nj_kl_backward, group_nj_kl_forward, kl_group_nj
from .scalars import const

_EPS = 1e-8


class _GroupNJ:
    """The normal-Jeffreys scale variables; mixed into a layer kind."""

    prior = "gnj"
    #: keep group i while log α_i < this, unless told otherwise (the tutorial's visualisation uses −3)
    default_threshold = -3.0
    #: a mode of the log α histogram below this is a mode of groups that carry signal (α < 0.05): the
    #: histogram split (`compress.thresholds`) never prunes it
    noise_floor = -3.0
    z_mu: nn.Parameter
    z_logvar: nn.Parameter
    n_groups: int

    def _init_z(self) -> None:
        self.z_mu = nn.Parameter(torch.empty(self.n_groups).normal_(1.0, INIT_STD))
        self.z_logvar = nn.Parameter(torch.empty(self.n_groups).normal_(LOGVAR_INIT, INIT_STD))

    def z_mean(self) -> Tensor:
        return self.z_mu

    def z_variance(self) -> Tensor:
        return self.z_logvar.exp()

    def sample_z(self, n: int) -> Tensor:
        """z = μ + σ·ε per example and group, shape (n, n_groups): one autograd node (`_z_draw`, `_z_grads`)."""
        return sampled_z(self, n)

    def sample_z_reference(self, eps: Tensor) -> Tensor:
        """`sample_z` for given standard-normal draws ε, as the plain autograd expression."""
        return torch.addcmul(self.z_mu, torch.exp(self.z_logvar * 0.5), eps)

    # ---- the parts of a fused training step (`base.GroupSparseLayer`, `lrt.gated_linear_lrt`) ----------------
    def _z_params(self) -> tuple[Tensor, ...]:
        return (self.z_mu, self.z_logvar)

    def _z_draw(self, params: tuple[Tensor, ...], n: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        """z = μ + e^{½ log σ²}·ε and what its gradient needs."""
        mu, logvar = params
        eps = torch.randn(n, mu.shape[0], device=mu.device, dtype=mu.dtype)
        std = torch.exp(logvar * const(0.5, logvar))
        return torch.addcmul(mu, std, eps), (eps, std)

    def _z_grads(self, saved: tuple[Tensor, ...], gz: Tensor) -> tuple[Tensor, ...]:
        """∂/∂μ = Σ_k g, ∂/∂log σ² = ½σ·Σ_k g·ε for g = ∂L/∂z."""
        eps, std = saved
        return gz.sum(0), torch.mul(gz, eps).sum(0).mul_(std).mul_(const(0.5, std))

    def _kl_z_forward(self, params: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        return group_nj_kl_forward(params[0], params[1], _EPS)

    def _kl_z_backward(self, saved: tuple[Tensor, ...], g: Tensor) -> tuple[Tensor, ...]:
        return group_nj_kl_backward(saved, g)

    def log_alpha(self) -> Tensor:
        """log α_i = log σ_zi² − log μ_zi²: the log dropout rate of group i."""
        return self.z_logvar - torch.log(self.z_mu.pow(2) + _EPS)

    def kl_z(self) -> Tensor:
        return kl_group_nj(self.z_mu, self.z_logvar, _EPS)


class LinearGroupNJ(_GroupNJ, LinearKind):
    """`nn.Linear` twin with a normal-Jeffreys scale per input unit (per block of `group_size` inputs).

    >>> layer = LinearGroupNJ(784, 300)
    >>> layer(torch.randn(2, 784)).shape
    torch.Size([2, 300])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, max_var: float | None = None,
                 group_size: int = 1) -> None:
        LinearKind.__init__(self, in_features, out_features, bias, max_var, group_size)
        self._init_z()


class Conv2dGroupNJ(_GroupNJ, ConvKind):
    """`nn.Conv2d` twin with a normal-Jeffreys scale per output channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, max_var: float | None = None) -> None:
        ConvKind.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, max_var)
        self._init_z()


class Conv1dGroupNJ(_GroupNJ, ConvKind):
    """`nn.Conv1d` twin with a normal-Jeffreys scale per output channel (the 2-d layer with one spatial axis).

    >>> Conv1dGroupNJ(4, 8, 3)(torch.randn(2, 4, 10)).shape
    torch.Size([2, 8, 8])
    """

    nd = 1
    __init__ = Conv2dGroupNJ.__init__  # the same arguments (not a subclass: a Conv1d layer is no Conv2d layer)
