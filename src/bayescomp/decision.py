"""A run's compression decision: the threshold rule its options name, and what it chooses.

The rules themselves are `compress.thresholds`' objects (each with one `choose`); this module only says
which one a run's options stand for (`run_rule`): its size target (--target-kept, --max-multiply-adds), its
--auto-thresholds rule (with the layers named in
--thresholds over the histogram's), else its --thresholds, else the recipe's thresholds for its model and
prior, else the priors' defaults. A run's thresholds are resolved once, here, into {layer: float}, and
`compress` receives them resolved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from .compress.thresholds import (
    HistogramSplit,
    PerLayer,
    SizeTarget,
    ThresholdChoice,
    ThresholdRule,
    ValidationBudget,
    rule_for,
)
from .factories import example_input
from .recipes import recipe
from .rundir import RunError
from .runoptions import validate


def run_rule(opts: Any, val: tuple[torch.Tensor, torch.Tensor] | None = None,
             example: torch.Tensor | None = None) -> ThresholdRule:
    """The threshold rule of a run with options `opts`; `val`, `example`: the validation split and the
    example input that the validation rule and a size target compress with."""
    if getattr(opts, "target_kept", None) is not None or getattr(opts, "max_multiply_adds", None) is not None:
        return SizeTarget(opts.target_kept, opts.max_multiply_adds, example)
    if opts.auto_thresholds == "histogram":
        rule: ThresholdRule = HistogramSplit(no_split=opts.no_split)
        if isinstance(opts.thresholds, Mapping):  # the named layers as given, the rule the others
            rule = PerLayer(dict(opts.thresholds), others=rule)
        return rule
    if opts.auto_thresholds == "validation":
        if val is None:
            raise RunError("the validation rule needs the validation split held out of the training set")
        return ValidationBudget(*val, opts.val_budget, variance_scale=opts.variance_scale, example_input=example)
    given = opts.thresholds if opts.thresholds is not None else recipe(opts.model).thresholds.get(opts.prior)
    return rule_for(given)


def choose_thresholds(opts: Any, bmodel: torch.nn.Module, val, example: torch.Tensor | None
                      ) -> tuple[dict[str, float], dict[str, ThresholdChoice] | None]:
    """(thresholds, choice) a run compresses with: every layer's threshold from its rule (`run_rule`), and the
    rule's per-layer record where an automatic rule chose them (None where they were set by hand)."""
    rule = run_rule(opts, val, example)
    choice = rule.choose(bmodel)
    thresholds = {name: float(c.value) for name, c in choice.items()}
    chosen = opts.auto_thresholds is not None or isinstance(rule, SizeTarget)
    return thresholds, choice if chosen else None


def named_over(own: Any, given: Any) -> Any:
    """Thresholds `given` for a run whose own are `own`: a mapping naming some layers changes only those (the
    others keep the run's own); a number, or a mapping over a run without per-layer thresholds, is as given."""
    if isinstance(given, Mapping) and isinstance(own, Mapping):
        return {**own, **given}
    return given


def _given(bmodel: torch.nn.Module, name: str, value: float) -> ThresholdChoice:
    """The choice record of a threshold the user set for one layer."""
    return PerLayer({name: value}).choose(bmodel)[name]


def decide_again(rule: Any | None, bmodel: torch.nn.Module, previous: Mapping[str, Any],
                 thresholds: Any) -> tuple[Any, dict[str, Any] | None]:
    """(thresholds, threshold_choice) to compress a finished run's posterior `bmodel` with again.

    The run's own thresholds and choice (its report, `previous`), or, given `rule` (the run's options with
    another `no_split`, `no_split_again`), its histogram rule's choice made again with those.
    `thresholds` naming some layers change only those (`named_over`), recorded in the choice as given; a
    single number replaces them all. A run whose thresholds were set by hand has no choice (None).
    """
    own, choice = previous.get("thresholds") or None, previous.get("threshold_choice")
    if rule is not None:
        own, chosen = choose_thresholds(rule, bmodel, None, example_input(rule.model))
        choice = {name: c.to_dict() for name, c in (chosen or {}).items()}
    if thresholds is None:
        return own, choice
    thresholds = named_over(own, thresholds)
    if choice:
        resolved = {n: float(c.value) for n, c in rule_for(thresholds).choose(bmodel).items()}
        choice = {name: choice[name] if name in choice and choice[name].get("value") == value
                  else _given(bmodel, name, value).to_dict()
                  for name, value in resolved.items()}
    return thresholds, choice


def no_split_again(opts: Any, no_split: str) -> Any:
    """A run's options with its histogram rule's `no_split` changed (refused for a run of another rule)."""
    opts.no_split = no_split
    validate(replace(opts, init_from=None))  # the start the run came from is not needed any more
    return opts


__all__ = ["choose_thresholds", "decide_again", "named_over", "no_split_again", "run_rule"]
