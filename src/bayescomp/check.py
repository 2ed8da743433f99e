"""check(): what bayescomp will do with a model, and what compression would refuse — before any training.

The model is bayesianized (a copy) and run through the compression engine itself (`compress.tracing`,
`compress.analysis`, `compress.surgery`) with every group kept and then with half of them kept, so a
refusal here is exactly the one `compress` would raise after training.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .convert import Exclude, LayerPlan, UnsupportedLayerError, bayesianize, group_layers, plan_layers

Example = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class Refusal:
    """One thing compression would refuse: where (a module path or a graph node), why, and the fix."""

    where: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason} (fix: {self.fix})"


@dataclass
class CheckReport:
    """The plan for each module with parameters (`convert.LayerPlan`) and the refusals; `str()` is a table."""

    layers: list[LayerPlan]
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when compression would go through."""
        return not self.refusals

    def __str__(self) -> str:
        rows = [("layer", "type", "action", "groups", "why")]
        rows += [(p.name, p.kind, p.action, "" if p.groups is None else str(p.groups), p.reason) for p in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
        lines = [line.rstrip() for line in lines]
        if self.refusals:
            lines.append(f"compression would refuse ({len(self.refusals)}):")
            lines += [f"  {r}" for r in self.refusals]
        else:
            lines.append("compression: ok")
        return "\n".join(lines)


def _fix(exc: UnsupportedLayerError) -> str:
    path = getattr(exc, "path", "")
    if path:
        return (f"bayesianize(..., exclude=[{path!r}]) keeps it dense and whole, or register a channel-wise module "
                "with bayescomp.register_channelwise")
    return "move that computation into a submodule and exclude it (bayesianize(..., exclude=[name])), or use supported ops"


def _refusal(exc: Exception) -> Refusal:
    where, _, reason = str(exc).partition(": ")
    if not reason:
        where, reason = "model", str(exc)
    if isinstance(exc, UnsupportedLayerError):
        return Refusal(where, reason, _fix(exc))
    return Refusal(where, f"{type(exc).__name__}: {reason}", "report it: compression failed unexpectedly")


def _half_keeps(bmodel: nn.Module) -> dict[str, Tensor]:
    return {n: torch.arange(m.n_groups) % 2 == 0 for n, m in group_layers(bmodel).items()}


@torch.no_grad()
def refusals(bmodel: nn.Module, example_input: Example) -> list[Refusal]:
    """What compression would refuse for a Bayesian model (all groups kept, then every other group kept).

    Raises `ValueError` when `example_input` does not fit the model (a user error, not a refusal).
    """
    from .compress.analysis import analyse, decision_masks
    from .compress.masks import PruneError
    from .compress.surgery import Builder
    from .compress.tracing import trace

    model = copy.deepcopy(bmodel).eval()
    try:
        gm = trace(model, example_input)
    except UnsupportedLayerError as exc:
        return [_refusal(exc)]
    all_keeps = {n: torch.ones(m.n_groups, dtype=torch.bool) for n, m in group_layers(model).items()}
    found: list[Refusal] = []
    for keeps in (all_keeps, _half_keeps(model)):
        try:
            an = analyse(model, gm, keeps)
            Builder(an, decision_masks(an), None).build()
        except PruneError:
            continue  # every other group is no decision a trained model must survive
        except Exception as exc:  # noqa: BLE001 - every failure of the engine is a refusal to report
            r = _refusal(exc)
            if r not in found:
                found.append(r)
    return found


def check(model: nn.Module, example_input: Example, prior: str = "gnj", *, exclude: Exclude = (),
          strict: bool = False) -> CheckReport:
    """What `bayesianize(model, prior, exclude=exclude)` converts, leaves dense and why, and anything
    compression would refuse (with the reason and the fix), for a plain model and a batch it accepts.

    With `strict`, a layer left dense because bayescomp cannot convert it is a refusal too.

    >>> print(bayescomp.check(model, torch.zeros(2, 1, 28, 28)))        # doctest: +SKIP
    """
    plans = plan_layers(model, exclude)
    found = [Refusal(p.name, p.reason, f"exclude=[{p.name!r}] leaves it dense")
             for p in plans if strict and p.action == "dense" and p.reason != "excluded"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left dense are in the report
        bmodel = bayesianize(model, prior, exclude=exclude)
    layers = group_layers(bmodel)
    plans = [dataclasses.replace(p, groups=layers[p.name].n_groups) if p.name in layers else p for p in plans]
    return CheckReport(plans, found + refusals(bmodel, example_input))
