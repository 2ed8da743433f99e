"""The settings of a training run (`TrainConfig`) and the schedules they define: the KL weight β per step
(warm-up) and the learning rate per step (constant or cosine)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..nn.base import PARAMETER_KINDS
from ..nn.zdraw import Z_DRAWS

#: learning-rate schedules `fit` knows (see `lr_at`)
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Settings of one training run (all plain values, stored in checkpoints and reports).

    - `epochs`: passes over the training set.
    - `batch_size`: examples per optimiser step. Data-parallel, this is the GLOBAL batch, split evenly over
      the processes (it must be divisible by their number).
    - `lr`: Adam's learning rate (PyTorch's other Adam defaults).
    - `lr_schedule`: "constant" (default, the paper's Adam): `lr` throughout. "cosine": the learning rate
      falls from `lr` to 0 along half a cosine (`lr_at`), which damps the step-to-step noise of the last
      epochs. The curve is laid out over `epochs`, so a cosine run cannot be extended.
    - `lr_decay_epochs`: with "cosine", how many of the last epochs the fall takes (the rate is `lr` before
      them); None (default): the whole run. A short fall at the end lets the groups the prior switches off
      finish collapsing at the full rate first (a whole-run cosine slows that, and fewer groups separate).
    - `warmup_epochs`: β of the KL term ramps linearly from 0 to `kl_weight` over this many epochs; 0 (default):
      β = `kl_weight` from the start. β is a function of the global step, so a resumed run continues the same ramp.
    - `kl_weight`: the final β (default 1: the ELBO). Below 1 the KL counts less than the data: a tempered
      posterior that keeps more groups and fits better; above 1, sparser. The warm-up ramps 0 → `kl_weight`.
    - `seed`: data order, augmentation and sampling noise; the same seed gives the same run, bit for bit
      (on the same machine, library versions and number of processes), resumed or not.
    - `grad_clip`: None (default): no clipping. Otherwise the gradient norm is clipped to this value
      every step, and a non-finite norm stops training with `TrainingDivergedError` naming the parameter.
    - `eval_every`: evaluate on the test set every this many epochs (and after the last one); default 1.
    - `check_grads`: False (default): per step, only the loss is checked for NaN/inf (a non-finite
      gradient then shows as a non-finite loss one step later, which names the parameter). True: every
      gradient is checked after each backward pass and the first non-finite one is named at once (a
      little slower).
    - `lr_scale`: per parameter kind ("mean", "variance", "scale": `nn.parameter_kind`), a factor on the
      learning rate of those parameters (the schedule scales them all alike); a kind not named: 1. Adam's
      step is about `lr` per step whatever the gradient's size, so a log-variance or a group scale that has
      to travel from its initial value (log σ² = −9) to a pruned group's (log α above the threshold, several
      units away) needs thousands of steps at 1e-3: `recipes.FAST` gives them a larger rate.
    - `z_draw`: "example" (default, the paper's): each example draws its own group scales z; "batch": one z per
      batch, shared by its examples (`nn.zdraw.draw_z`: the same ELBO, fewer random numbers, noisier).
    - `sample`: True (default): each step draws the weights and scales from the posterior and the loss is the
      (KL-weighted) negative ELBO. False: the network computes with its posterior means, as at evaluation (the
      layers in `eval` mode, batch-norm statistics frozen), and the loss is the cross-entropy alone: only the
      means move (`mean_config`, the mean fine-tuning after the cut).

    Not set here: the variance clamp σ² ≤ `max_var` belongs to the layers (`bayesianize(..., max_var=)`,
    per layer or for all; default None: no clamp; the model recipes set the paper's values). `fit` applies
    it after every optimiser step.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 0.0
    seed: int = 0
    grad_clip: float | None = None
    kl_weight: float = 1.0
    eval_every: int = 1
    lr_schedule: str = "constant"
    lr_decay_epochs: float | None = None
    check_grads: bool = False
    lr_scale: dict[str, float] = field(default_factory=dict)
    z_draw: str = "example"
    sample: bool = True

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_decay_epochs is not None:
            if self.lr_schedule == "constant":
                raise ValueError("lr_decay_epochs needs a decaying learning-rate schedule (lr_schedule='cosine')")
            if not (0 < self.lr_decay_epochs <= self.epochs):
                raise ValueError(f"lr_decay_epochs must be in (0, epochs={self.epochs}], got {self.lr_decay_epochs}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warm-up epochs must be ≥ 0, got {self.warmup_epochs}")
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight > 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"KL weight must be positive and finite, got {self.kl_weight!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"gradient clip must be positive, got {self.grad_clip}")
        if not isinstance(self.lr_scale, dict):
            raise ValueError(f"lr_scale must be a mapping of parameter kind to factor, got {self.lr_scale!r}")
        for kind, factor in self.lr_scale.items():
            if kind not in PARAMETER_KINDS:
                raise ValueError(f"lr_scale names an unknown parameter kind {kind!r}; the kinds: {', '.join(PARAMETER_KINDS)}")
            if not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
                raise ValueError(f"lr_scale of {kind!r} must be a positive finite number, got {factor!r}")
        if self.z_draw not in Z_DRAWS:
            raise ValueError(f"z_draw must be one of {', '.join(Z_DRAWS)}, got {self.z_draw!r}")
        if not isinstance(self.sample, bool):
            raise ValueError(f"sample must be True or False, got {self.sample!r}")
        if not isinstance(self.check_grads, bool):
            raise ValueError(f"check_grads must be True or False, got {self.check_grads!r}")


def finetune_config(config: TrainConfig, epochs: int, lr: float | None = None,
                    kl_weight: float | None = None) -> TrainConfig:
    """The settings of fine-tuning after pruning: `config`'s (batch, rate, KL weight, seed, clipping) for `epochs`
    epochs, with no KL warm-up, the KL weight `kl_weight` (default: `config.kl_weight`) and the learning rate
    falling from `lr` (default: `config.lr`) to 0 along half a cosine over them.

    Why the fall. Over a whole training run it stops the groups the prior switches off from collapsing
    (fewer separate; README, group horseshoe). Once the pruning decision is fixed (the layers' `group_mask`)
    there is nothing left to collapse, and the fall only settles the kept weights at the end.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fine-tuning epochs must be a positive integer, got {epochs!r}")
    return replace(config, epochs=epochs, warmup_epochs=0.0, lr_schedule="cosine", lr_decay_epochs=None,
                   lr=config.lr if lr is None else lr,
                   kl_weight=config.kl_weight if kl_weight is None else kl_weight)



def mean_config(config: TrainConfig, epochs: int, lr: float | None = None) -> TrainConfig:
    """The settings of the mean fine-tuning after the cut: `finetune_config`'s, with the noise off (`sample`
    False): the network computes with its posterior means and only they move, on the cross-entropy.

    Why. The compressed model *is* the rounded posterior means of the kept groups; the Bayesian fine-tuning fits
    them under weight noise, which a network this small pays for. On LeNet-5-Caffe cut to 0.9% (GNJ, seeds 0
    and 1 of the fast recipe, the same posteriors and cuts), 3 epochs from 1e-3 after the Bayesian fine-tuning
    took the validation error from 1.27 / 1.45% to 1.25 / 1.33% (round K5q, benchmarks/results/recipe_search.jsonl).
    The bits are still read off the posterior variances, which this phase leaves as they were.
    """
    return replace(finetune_config(config, epochs, lr), sample=False)


#: settings that shape the trajectory: a checkpoint resumes only a run with the same ones (`epochs` may grow)
RUN_DEFINING = ("batch_size", "lr", "warmup_epochs", "seed", "grad_clip", "kl_weight", "lr_schedule",
                 "lr_decay_epochs", "lr_scale", "z_draw", "sample")



def kl_beta(step: int, steps_per_epoch: int, warmup_epochs: float, weight: float = 1.0) -> float:
    """The KL weight β at a global step: linear 0 → `weight` over the warm-up epochs, then `weight`."""
    if warmup_epochs <= 0:
        return weight
    return weight * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


def lr_at(step: int, total_steps: int, lr: float, schedule: str = "constant", decay_steps: int | None = None) -> float:
    """The learning rate of global step `step` (0-based) of a run of `total_steps` steps.

    - "constant": `lr`.
    - "cosine": `lr` until the last `decay_steps` steps (default: all of them), then
      lr·½(1 + cos(π·k/decay_steps)) at the k-th of those (k = 0 …): `lr` where the fall starts, lr/2
      halfway, lr·½(1 − cos(π/decay_steps)) ≈ 0 at the last step (never exactly 0, so every step moves
      the parameters).
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        d = total_steps if decay_steps is None else max(1, min(int(decay_steps), total_steps))
        k = step - (total_steps - d)
        return lr if k <= 0 else lr * 0.5 * (1.0 + math.cos(math.pi * min(k, d) / d))
    raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def length_change_refused(schedule: str, started_epochs: int | None, epochs: int) -> str | None:
    """Why a run started for `started_epochs` epochs cannot resume for `epochs` under `schedule`; None if it
    can (a constant rate, the same length, or a start that did not record its length)."""
    if schedule == "constant" or started_epochs is None or started_epochs == epochs:
        return None
    return (f"epochs={started_epochs!r} (now {epochs!r}; the {schedule} learning-rate schedule is laid out over "
            "the run's epochs and cannot be extended)")
