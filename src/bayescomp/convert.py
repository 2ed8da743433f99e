"""bayesianize(): replace a plain model's Linear/Conv2d/Conv1d layers by their group-sparse twins."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .nn import (
    AttentionHeads,
    Conv1dGroupHS,
    Conv1dGroupNJ,
    Conv2dGroupHS,
    Conv2dGroupNJ,
    GroupSparseLayer,
    LinearGroupHS,
    LinearGroupNJ,
    head_group_sizes,
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
#: bayesianize's own keywords (named in the error for an unknown one)
KEYWORDS = ("exclude", "strict", "example_input", "keep_weights", "max_var", "input_origin")

# Leaf modules with parameters that pass through untouched (they are neither pruned nor penalised).

def _passes_through(module: nn.Module) -> bool:
    """A module with parameters that stays as it is: one the compression follows channels through (batch
    norm, layer/group norm, an embedding, a module declared with `compress.register_channelwise`)."""
    from .compress.rules import module_rule  # here, not at import time: compress imports this module

    rule = module_rule(module)
    return rule is not None and rule.kind in ("channelwise", "barrier", "embedding")


class UnsupportedLayerError(TypeError):
    """A module that bayescomp cannot convert or shrink; the message names its path."""


class CompressionWarning(UserWarning):
    """Something the user should act on that does not stop the run: a layer left dense, a compression
    that keeps (almost) everything."""


Exclude = Sequence["str | type[nn.Module]"]


@dataclass(frozen=True)
class LayerPlan:
    """What `bayesianize` does with one module: ``"bayesianize"`` it, leave it ``"dense"`` (excluded, or a
    kind it cannot convert: `reason`), or ``"follow"`` it (a channel-wise layer with parameters, such as batch
    norm, that compression slices with the channels it carries). `groups`: a converted layer's group count."""

    name: str
    kind: str
    action: str
    reason: str = ""
    groups: int | None = None


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a convertible-looking layer cannot be converted (None: it can)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        return f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported (only zeros)"
    return None


def _check_exclude(model: nn.Module, exclude: Exclude) -> None:
    if isinstance(exclude, (str, type)):
        raise TypeError("exclude takes a list of module names or module types, e.g. exclude=['head', nn.Embedding]")
    names = {n for n, _ in model.named_modules() if n}
    for e in exclude:
        if isinstance(e, str):
            if e not in names:
                raise ValueError(f"exclude names {e!r}, which is not a module of the model; its modules are: "
                                 f"{', '.join(sorted(names)[:20])}{' ...' if len(names) > 20 else ''}")
        elif not (isinstance(e, type) and issubclass(e, nn.Module)):
            raise TypeError(f"exclude takes module names (str) or nn.Module subclasses, not {e!r}")


def _excluded(name: str, module: nn.Module, exclude: Exclude) -> bool:
    return any(name == e if isinstance(e, str) else isinstance(module, e) for e in exclude)


def plan_layers(model: nn.Module, exclude: Exclude = ()) -> list[LayerPlan]:
    """What `bayesianize(model, exclude=exclude)` does with each module that holds parameters, in order.

    A module named in `exclude` (or of a type in it) stays dense with everything inside it; so does a
    module with parameters of a kind bayescomp neither converts nor follows (reason "unsupported: ...").
    Raises `UnsupportedLayerError` for a model that is already Bayesian.
    """
    _check_exclude(model, exclude)
    plans: list[LayerPlan] = []
    whole: list[str] = []  # modules left dense with everything inside them
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in whole):
            continue
        if isinstance(module, GroupSparseLayer):
            raise UnsupportedLayerError(f"{name or type(module).__name__}: the model is already Bayesian")
        kind = type(module).__name__
        hit = bool(name) and _excluded(name, module, exclude)
        if type(module) in CONVERTIBLE:
            why = "excluded" if hit else _unsupported_reason(module)
            plans.append(LayerPlan(name, kind, "dense", why) if why else LayerPlan(name, kind, "bayesianize"))
            continue
        if hit:
            plans.append(LayerPlan(name, kind, "dense", "excluded"))
            whole.append(name)
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if _passes_through(module):
            plans.append(LayerPlan(name, kind, "follow", "barrier: keeps the channels around it"
                                   if _rule_kind(module) == "barrier" else "channel-wise: sliced with the channels it carries"))
        elif not list(module.children()) or _rule_kind(module) == "dense":
            hint = "" if _rule_kind(module) else " (a channel-wise module of yours: bayescomp.register_channelwise)"
            plans.append(LayerPlan(name, kind, "dense", f"unsupported: bayescomp does not convert {kind}{hint}"))
            whole.append(name)
    return plans


def _rule_kind(module: nn.Module) -> str | None:
    from .compress.rules import module_rule  # here, not at import time: compress imports this module

    rule = module_rule(module)
    return None if rule is None else rule.kind


def _check_prior(prior: str) -> dict[type[nn.Module], type[GroupSparseLayer]]:
    try:
        return PRIORS[prior]
    except KeyError:
        raise ValueError(f"unknown prior {prior!r}; choose one of: {', '.join(sorted(PRIORS))}") from None


def _twin(name: str, module: nn.Module, prior: str, keep_weights: bool, max_var: float | None,
          options: Mapping[str, object], origin: float = 0.0, group_size: int = 1) -> GroupSparseLayer:
    twin = _check_prior(prior)[type(module)]
    if type(module) is nn.Linear:
        blocks = {"group_size": group_size} if group_size > 1 else {}
        layer = twin(module.in_features, module.out_features, bias=module.bias is not None, max_var=max_var,
                     **options, **blocks)
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
    exclude: Exclude = (),
    strict: bool = False,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    keep_weights: bool = True,
    max_var: float | Mapping[str, float] | None = None,
    input_origin: Mapping[str, float] | None = None,
    **prior_options: object,
) -> nn.Module:
    """A copy of `model` whose `nn.Linear`, `nn.Conv2d` and `nn.Conv1d` layers are group-sparse twins.

    An `nn.MultiheadAttention` becomes an `AttentionHeads` (same outputs, `replace_attention`) whose projections
    are converted, out_proj with one group per head (`group_size = head_dim`), so that whole heads can be pruned.

    - `prior`: ``"gnj"`` (group normal-Jeffreys) or ``"ghs"`` (group horseshoe; options ``tau0``,
      the global scale of the prior, default 1e-5, and ``global_kl``, "derived" or "paper").
    - `exclude`: module names (a name covers everything inside that module) or module types left plain
      and dense; compression carries them through whole (all their inputs and outputs kept).
    - `strict`: refuse (`UnsupportedLayerError`) a module with parameters of a kind bayescomp cannot
      convert; by default such a module is left dense with a `CompressionWarning` naming it.
    - `example_input`: a batch the model accepts; the converted model is then checked as
      `bayescomp.check` does, and the first thing compression would refuse raises `UnsupportedLayerError`
      now, before any training.
    - `keep_weights`: take the plain layers' weights and biases as the posterior means (a
      pretrained start); otherwise the twins keep their own initialisation.
    - `max_var`: the variance clamp σ² ≤ max_var, for every converted layer (a float) or per
      layer by module name (a mapping, e.g. ``{"fc1": 0.04}`` as in the paper's code).
    - `input_origin`: per layer by module name, the input value that carries no signal (e.g.
      ``{"fc1": -1.0}`` for MNIST in [−1, 1]): the layer computes on x − origin
      (`GroupSparseLayer.set_input_origin`); with `keep_weights` its bias absorbs the shift, so the
      function is the plain layer's.

    A model with no layer to convert raises `UnsupportedLayerError`. The input model is left unchanged.
    """
    _check_prior(prior)
    unknown_opts = sorted(set(prior_options) - set(PRIOR_OPTIONS[prior]))
    if unknown_opts:
        valid = ", ".join((*KEYWORDS, *PRIOR_OPTIONS[prior]))
        raise ValueError(f"prior {prior!r} takes no option {', '.join(unknown_opts)}; bayesianize's keywords are: "
                         f"{valid}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesianize expects an nn.Module, got {type(model).__name__}")
    _check_exclude(model, exclude)
    model = replace_attention(model, exclude)
    plans = plan_layers(model, exclude)
    unsupported = [p for p in plans if p.action == "dense" and p.reason != "excluded"]
    if unsupported:
        names = ", ".join(f"{p.name} ({p.kind})" for p in unsupported)
        fix = f"exclude={[p.name for p in unsupported]!r}"
        if strict:
            raise UnsupportedLayerError(f"{unsupported[0].name}: {unsupported[0].reason}; {fix} leaves it dense")
        warnings.warn(f"left dense, not compressed: {names}; pass {fix} to say so, or strict=True to refuse",
                      CompressionWarning, stacklevel=2)
    per_layer = dict(max_var) if isinstance(max_var, Mapping) else {}
    convertible = {p.name for p in plans if p.action == "bayesianize"}
    for option, names_ in (("max_var", per_layer), ("input_origin", input_origin or {})):
        unknown = sorted(set(names_) - convertible)
        if unknown:
            raise ValueError(f"{option} names modules that are not converted nn.Linear/nn.Conv2d/nn.Conv1d layers of the model: "
                             f"{', '.join(unknown)}")
    if not convertible:
        raise UnsupportedLayerError("the model has no nn.Linear, nn.Conv2d or nn.Conv1d layer to convert"
                                    + (" (the others are left dense)" if any(p.action == "dense" for p in plans) else ""))
    model = copy.deepcopy(model)
    from .compress.rules import DENSE_MARK

    group_sizes = head_group_sizes(model)
    for p in plans:
        module = model.get_submodule(p.name)
        if p.action == "bayesianize":
            mv = per_layer.get(p.name) if isinstance(max_var, Mapping) else max_var
            origin = (input_origin or {}).get(p.name, 0.0)
            _replace(model, p.name, _twin(p.name, module, prior, keep_weights, mv, prior_options, origin,
                                          group_sizes.get(p.name, 1)))
        elif p.action == "dense" and type(module) not in CONVERTIBLE:
            setattr(module, DENSE_MARK, True)  # compression keeps it whole (rules.module_rule)
    if example_input is not None:
        from .check import refusals

        found = refusals(model, example_input)
        if found:
            raise UnsupportedLayerError(str(found[0]))
    return model


def replace_attention(model: nn.Module, exclude: Exclude = ()) -> nn.Module:
    """`model` with each `nn.MultiheadAttention` (not in `exclude`) replaced by an `AttentionHeads` computing the
    same function with separate q/k/v/out Linear projections, which `bayesianize` then converts (out_proj with one
    group per head). A copy when anything is replaced (else `model` itself); an attention module with options
    `AttentionHeads` does not support is left as it is (dense)."""
    names = [name for name, m in model.named_modules() if type(m) is nn.MultiheadAttention and name
             and not _excluded(name, m, exclude) and not any(name.startswith(e + ".") for e in exclude
                                                               if isinstance(e, str))]
    replaced = None
    for name in names:
        try:
            new = AttentionHeads.from_torch(model.get_submodule(name))
        except ValueError:
            continue  # left dense: plan_layers names it as unsupported
        if replaced is None:
            replaced = copy.deepcopy(model)
        _replace(replaced, name, new)
    return model if replaced is None else replaced


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
