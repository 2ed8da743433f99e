"""Checks of single option values, each refusing a bad value with a one-line message that names the option.

Pure functions over plain values, called before any data is loaded or any folder is made (`pipeline.validate`,
`recompress`, `threshold_sweep`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .rundir import RunError

#: the largest seed torch accepts (an unsigned 64-bit integer)
MAX_SEED = 2**64 - 1
#: the largest magnitude a float32 tensor holds
FLOAT32_MAX = 3.4028234663852886e38

#: how the training settings' own errors (`TrainConfig.validate`) begin, and the option each is about
_TRAIN_FLAGS = (("epochs", "--epochs"), ("batch size", "--batch-size"), ("learning-rate schedule", "--lr-schedule"),
                ("learning rate", "--lr"), ("lr_decay_epochs", "--lr-decay-epochs"), ("warm-up", "--warmup-epochs"),
                ("KL weight", "--kl-weight"), ("gradient clip", "--grad-clip"), ("lr_scale", "--lr-scale"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_seed(seed: Any, flag: str = "--seed") -> None:
    """A seed is an integer torch can take: 0 … 2**64 − 1."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise RunError(f"{flag} must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {seed!r}")


def check_number(value: Any, flag: str, *, positive: bool = False, minimum: float | None = None,
                 float32: bool = False) -> None:
    """A finite number (`positive`: > 0; `minimum`: ≥ it; `float32`: within float32's range)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and float32:
        ok = abs(value) <= FLOAT32_MAX
    if not ok:
        what = "a positive finite number" if positive else f"a finite number ≥ {minimum:g}" if minimum is not None \
            else "a finite number within float32's range (±3.4e38)" if float32 else "a finite number"
        raise RunError(f"{flag} must be {what}, got {value!r}")


def check_thresholds(value: Any, flag: str = "--thresholds") -> None:
    """log α thresholds: None, a number, or {layer: number}; NaN is refused (±inf keep or prune every group)."""
    if value is None:
        return
    items = value.items() if isinstance(value, Mapping) else [("", value)]
    for name, v in items:
        if not _is_number(v) or math.isnan(v):
            where = f" for {name}" if name else ""
            raise RunError(f"{flag}{where} must be a number (a log α threshold), got {v!r}")


def train_error(exc: Exception) -> RunError:
    """A training-settings error (`TrainConfig.validate`) as a RunError that names the option it is about."""
    text = str(exc)
    flag = next((f for start, f in _TRAIN_FLAGS if text.startswith(start)), None)
    return RunError(f"{flag}: {text}" if flag else text)


__all__ = ["FLOAT32_MAX", "MAX_SEED", "check_number", "check_seed", "check_thresholds", "train_error"]
