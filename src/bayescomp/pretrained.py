"""compress_pretrained(): a user's trained network, compressed by a named training recipe in one call.

The steps are the CLI's (`pipeline.run`) without its run folder: bayesianize the network keeping its
weights as posterior means, fit the posterior (`train.fit`, on tensors or any DataLoader), choose the
thresholds by the recipe's rule (or take the caller's), prune, fine-tune the kept groups, compress
exactly those. The recipe (`recipes.training_recipe`) says how long and at which rates; every
argument left at None takes the recipe's value.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .compress import CompressedModel, PruneError, apply_masks, compress, group_masks
from .compress.budget import target_example
from .compress.thresholds import (
    EveryLayer,
    HistogramSplit,
    PerLayer,
    PriorDefault,
    SizeTarget,
    ThresholdRule,
    choose_thresholds,
)
from .convert import bayesianize
from .recipes import TrainingRecipe, training_recipe
from .train import TrainConfig, finetune_config, fit, mean_config
from .train.loop import flush_denormals, format_duration


def _config(recipe: TrainingRecipe, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs, recipe.batch_size, recipe.lr, recipe.warmup(epochs), seed, kl_weight=recipe.kl_weight,
                       lr_schedule=recipe.lr_schedule, lr_decay_epochs=recipe.decay_epochs(epochs),
                       lr_scale=dict(recipe.lr_scale), z_draw=recipe.z_draw)


def _rule(recipe: TrainingRecipe, given: Any, size: SizeTarget | None = None) -> tuple[ThresholdRule, str]:
    """(threshold rule, how it chooses): the caller's size target; the caller's threshold for every layer (a
    number); else the recipe's rule — the histogram split, or (a recipe without a rule) each prior's default
    threshold — for the layers the caller does not name."""
    if size is not None:
        target = (f"target_kept={size.target_kept:g}" if size.target_kept is not None
                  else f"max_multiply_adds={size.max_multiply_adds}")
        return size, f"size target ({target})"
    if given is not None and not isinstance(given, Mapping):
        return EveryLayer(float(given)), "given"
    if recipe.auto_thresholds == "histogram":
        rule: ThresholdRule = HistogramSplit(no_split=recipe.no_split)
        how = f"histogram ({recipe.no_split})"
    else:
        rule, how = PriorDefault(), "the priors' defaults"
    named = {k: float(v) for k, v in (given or {}).items()}
    return (PerLayer(named, others=rule) if named else rule), how


def compress_pretrained(
    model: nn.Module,
    train: Any,
    *,
    prior: str = "gnj",
    recipe: str | TrainingRecipe = "fast",
    epochs: int | None = None,
    finetune_epochs: int | None = None,
    mean_epochs: int | None = None,
    z_draw: str | None = None,
    thresholds: float | Mapping[str, float] | None = None,
    target_kept: float | None = None,
    max_multiply_adds: int | None = None,
    n_train: int | None = None,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    max_var: float | Mapping[str, float] | None = None,
    seed: int = 0,
    progress: bool = True,
    **prior_options: Any,
) -> CompressedModel:
    """Compress a trained plain network: the compressed result (`result.model`, `result.report`).

    - `train`: the training data, a DataLoader of (inputs, labels) batches (its batch size is used; the
      recipe's `batch_size` applies to tensors) or a pair of tensors. N, the training-set size that scales the KL,
      is `n_train`, else the size of the loader's dataset.
    - `prior`: "gnj" or "ghs" (`prior_options`: e.g. `tau0=` for the horseshoe).
    - `recipe`: "fast" (default; from a trained network in minutes) or "paper", or a `TrainingRecipe`.
      `epochs`, `finetune_epochs`, `mean_epochs` (the mean fine-tuning after the fine-tuning: the noise off,
      `train.mean_config`): override the recipe's.
    - `z_draw`: "example" or "batch", how training draws the group scales z (`nn.draw_z`); None: the recipe's (the
      fast recipe's for a model of the user's: "example", the paper's draw).
    - `thresholds`: None: the recipe's rule (the fast recipe: each prior's default threshold, log α −3 for
      GNJ, 2.5 for GHS; a recipe with the histogram rule: the split of each layer's log α histogram); a float
      for every layer; a mapping: those layers at the given values, the rule for the others.
    - `target_kept` (a share of the weights, in (0, 1]) or `max_multiply_adds` (per example): a size target in
      place of the thresholds (None: the recipe's `target_kept`, if any, where no thresholds are given): each
      layer's threshold is chosen so that the compressed model fits, groups ranked by log α across layers
      (`compress.budget`), before the fine-tuning. Checked before any training.
    - `example_input`: a batch the model accepts, needed for a model that is not an `nn.Sequential` chain
      (residual sums, concatenations: it is traced with torch.fx).
    - `max_var`: the variance clamp σ² ≤ max_var (all layers, or per layer name); default none.

    The input model is not modified. Progress: one line per epoch with the time left for the whole call.
    The report adds `recipe`, `train_seconds`, `finetune_seconds`, `seconds`, `thresholds_rule` and the
    per-epoch `history`.
    """
    rec = (recipe if isinstance(recipe, TrainingRecipe) else training_recipe(recipe)).for_prior(prior)
    if z_draw is not None:
        rec = replace(rec, z_draw=z_draw)
    epochs = rec.epochs if epochs is None else epochs
    finetune_epochs = rec.finetune_epochs if finetune_epochs is None else finetune_epochs
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"fine-tuning epochs must be an integer ≥ 0, got {finetune_epochs!r}")
    mean_epochs = rec.mean_epochs if mean_epochs is None else mean_epochs
    if not isinstance(mean_epochs, int) or mean_epochs < 0:
        raise ValueError(f"mean fine-tuning epochs must be an integer ≥ 0, got {mean_epochs!r}")
    if mean_epochs and not finetune_epochs:
        raise ValueError(f"mean_epochs={mean_epochs} follows the fine-tuning: give finetune_epochs ≥ 1 too")
    if rec.auto_thresholds not in (None, "histogram"):  # refused before any training
        raise ValueError(f"compress_pretrained applies the histogram rule or the priors' defaults, not the recipe's "
                         f"{rec.auto_thresholds!r} rule")
    if target_kept is None and max_multiply_adds is None and thresholds is None:
        target_kept = rec.target_kept  # the recipe's size target, if it has one
    size = None
    if target_kept is not None or max_multiply_adds is not None:  # refused before any training, as the rest
        target_example(model, target_kept, max_multiply_adds, example_input)
        if thresholds is not None:
            raise ValueError("give thresholds= or a size target (target_kept=, max_multiply_adds=), not both")
        size = SizeTarget(target_kept, max_multiply_adds, example_input)
    config = _config(rec, epochs, seed)
    config.validate()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    bmodel = bayesianize(copy.deepcopy(model).train(), prior, keep_weights=True, max_var=max_var, **prior_options)
    total = epochs + finetune_epochs + mean_epochs
    history: list[dict[str, Any]] = []

    def announce(row: dict[str, Any]) -> None:
        history.append(row)
        left = total - len(history)
        if progress and left and finetune_epochs:  # (fit's own line gives the time left of its epochs)
            tqdm.write(f"compress_pretrained: {len(history)}/{total} epochs, "
                       f"~{format_duration(left * (time.perf_counter() - t0) / len(history))} left in all")

    if progress:
        tqdm.write(f"compress_pretrained: recipe {rec.name!r}, prior {prior}, {epochs} epochs"
                   + (f" + {finetune_epochs} fine-tuning" if finetune_epochs else "")
                   + (f" + {mean_epochs} of the means" if mean_epochs else ""))
    trained = fit(bmodel, train, config, progress=progress, on_epoch=announce, n_train=n_train)
    rule, how = _rule(rec, thresholds, size)
    chosen = choose_thresholds(bmodel, rule)  # resolved once: the cut, the fine-tuning and the compression use it
    keeps = group_masks(bmodel, chosen)
    empty = [name for name, keep in keeps.items() if not bool(keep.any())]
    if empty:
        raise PruneError(f"the thresholds prune every group of layer(s) {', '.join(empty)}: no network is left "
                         f"(thresholds {chosen})")
    ft_seconds = 0.0
    if finetune_epochs:
        apply_masks(bmodel, keeps)
        with flush_denormals():  # the pruned groups' weights decay towards 0 (`train.loop.flush_denormals`)
            tune = finetune_config(config, finetune_epochs, rec.finetune_lr, rec.finetune_kl_weight)
            ft_seconds = fit(bmodel, train, tune, progress=progress, on_epoch=announce, n_train=n_train).seconds
            if mean_epochs:  # the posterior means alone, the noise off
                tune = mean_config(config, mean_epochs, rec.finetune_lr)
                ft_seconds += fit(bmodel, train, tune, progress=progress, on_epoch=announce, n_train=n_train).seconds
    bmodel.eval()
    result = compress(bmodel, chosen, keeps=keeps, example_input=example_input)
    result.report.update(recipe=rec.name, train_seconds=trained.seconds, finetune_seconds=ft_seconds,
                         seconds=time.perf_counter() - t0, thresholds_rule=how, history=history)
    return result
