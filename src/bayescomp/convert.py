"""bayesianize(): replace a plain model's Linear/Conv2d/Conv1d layers by their group-sparse twins."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .nn import (
    Conv1dGroupHS,
    Conv1dGroupNJ,
    Conv2dGroupHS,
    Conv2dGroupNJ,
    GroupSparseLayer,
    LinearGroupHS,
    LinearGroupNJ,
)

#: prior name -> {plain layer type: its group-sparse twin}
PRIORS: dict[str, dict[type[nn.Module], type[GroupSparseLayer]]] = {
    "gnj": {nn.Linear: LinearGroupNJ, nn.Conv2d: Conv2dGroupNJ, nn.Conv1d: Conv1dGroupNJ},
    "ghs": {nn.Linear: LinearGroupHS, nn.Conv2d: Conv2dGroupHS, nn.Conv1d: Conv1dGroupHS},
}
#: the plain layer types bayesianize converts (exact types: a subclass may compute something else)
CONVERTIBLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Conv1d)
#: keyword options each prior accepts (passed through bayesianize to the layers)
PRIOR_OPTIONS: dict[str, tuple[str, ...]] = {"gnj": (), "ghs": ("tau0", "global_kl")}

# Leaf modules with parameters that pass through untouched (they are neither pruned nor penalised).

def _passes_through(module: nn.Module) -> bool:
    """A module with parameters that stays as it is: one the compression follows channels through (batch
    norm, layer/group norm, a module declared with `compress.register_channelwise`)."""
    from .compress.rules import module_rule  # here, not at import time: compress imports this module

    rule = module_rule(module)
    return rule is not None and rule.kind in ("channelwise", "barrier")


class UnsupportedLayerError(TypeError):
    """A module that bayescomp cannot convert or shrink; the message names its path."""


def _check_prior(prior: str) -> dict[type[nn.Module], type[GroupSparseLayer]]:
    try:
        return PRIORS[prior]
    except KeyError:
        raise ValueError(f"unknown prior {prior!r}; choose one of: {', '.join(sorted(PRIORS))}") from None


def _twin(name: str, module: nn.Module, prior: str, keep_weights: bool, max_var: float | None,
          options: Mapping[str, object], origin: float = 0.0) -> GroupSparseLayer:
    twin = _check_prior(prior)[type(module)]
    if type(module) is nn.Linear:
        layer = twin(module.in_features, module.out_features, bias=module.bias is not None, max_var=max_var,
                     **options)
    else:  # nn.Conv2d, nn.Conv1d; grouped (groups > 1) included: groups run within each convolution group
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{name}: {type(module).__name__} with padding_mode={module.padding_mode!r} "
                                        "is not supported")
        layer = twin(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, bias=module.bias is not None, max_var=max_var, **options,
        )
    if origin:
        try:
            layer.set_input_origin(origin)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if keep_weights:
        layer.load_plain(module.weight.detach(), None if module.bias is None else module.bias.detach())
    return layer.to(device=module.weight.device, dtype=module.weight.dtype)


def bayesianize(
    model: nn.Module,
    prior: str = "gnj",
    *,
    keep_weights: bool = True,
    max_var: float | Mapping[str, float] | None = None,
    input_origin: Mapping[str, float] | None = None,
    **prior_options: object,
) -> nn.Module:
    """A copy of `model` whose `nn.Linear`, `nn.Conv2d` and `nn.Conv1d` layers are group-sparse twins.

    - `prior`: ``"gnj"`` (group normal-Jeffreys) or ``"ghs"`` (group horseshoe; options ``tau0``,
      the global scale of the prior, default 1e-5, and ``global_kl``, "derived" or "paper").
    - `keep_weights`: take the plain layers' weights and biases as the posterior means (a
      pretrained start); otherwise the twins keep their own initialisation.
    - `max_var`: the variance clamp σ² ≤ max_var, for every converted layer (a float) or per
      layer by module name (a mapping, e.g. ``{"fc1": 0.04}`` as in the paper's code).
    - `input_origin`: per layer by module name, the input value that carries no signal (e.g.
      ``{"fc1": -1.0}`` for MNIST in [−1, 1]): the layer computes on x − origin
      (`GroupSparseLayer.set_input_origin`); with `keep_weights` its bias absorbs the shift, so the
      function is the plain layer's.

    A leaf module with parameters that is neither converted nor a normalisation layer raises
    `UnsupportedLayerError` naming its path, as does a model with no layer to convert.
    The input model is left unchanged.
    """
    _check_prior(prior)
    unknown_opts = sorted(set(prior_options) - set(PRIOR_OPTIONS[prior]))
    if unknown_opts:
        raise ValueError(f"prior {prior!r} takes no option {', '.join(unknown_opts)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesianize expects an nn.Module, got {type(model).__name__}")
    per_layer = dict(max_var) if isinstance(max_var, Mapping) else {}
    model = copy.deepcopy(model)
    convertible = {name for name, m in model.named_modules() if type(m) in CONVERTIBLE}
    for option, names in (("max_var", per_layer), ("input_origin", input_origin or {})):
        unknown = sorted(set(names) - convertible)
        if unknown:
            raise ValueError(f"{option} names modules that are not nn.Linear/nn.Conv2d/nn.Conv1d layers of the model: "
                             f"{', '.join(unknown)}")
    converted = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupSparseLayer):
            raise UnsupportedLayerError(f"{name}: the model is already Bayesian")
        if type(module) in CONVERTIBLE:
            mv = per_layer.get(name) if isinstance(max_var, Mapping) else max_var
            origin = (input_origin or {}).get(name, 0.0)
            _replace(model, name, _twin(name, module, prior, keep_weights, mv, prior_options, origin))
            converted += 1
        elif not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            if not _passes_through(module):
                raise UnsupportedLayerError(
                    f"{name or type(module).__name__}: {type(module).__name__} is not supported "
                    "(bayescomp converts nn.Linear, nn.Conv2d and nn.Conv1d; normalisation layers and modules declared with "
                        "bayescomp.register_channelwise pass through)"
                )
    if converted == 0:
        raise UnsupportedLayerError("the model has no nn.Linear, nn.Conv2d or nn.Conv1d layer to convert")
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise UnsupportedLayerError("the model itself is a single layer; wrap it in nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def group_layers(model: nn.Module) -> dict[str, GroupSparseLayer]:
    """The group-sparse layers of a model by module name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GroupSparseLayer)}


def kl_divergence(model: nn.Module) -> Tensor:
    """Σ over the model's group-sparse layers of KL(q || p).

    Add ``kl_divergence(model) / N`` to a mean per-example loss, where N is the number of
    training examples (not the batch size): the sum is the negative ELBO divided by N.
    """
    layers = group_layers(model)
    if not layers:
        raise ValueError("the model has no group-sparse layer; call bayescomp.bayesianize first")
    kls = [layer.kl() for layer in layers.values()]
    return kls[0] if len(kls) == 1 else torch.stack(kls).sum()
