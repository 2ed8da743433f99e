"""Atomic, safely loadable checkpoints (tensors and plain containers only; never unpickled code)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..base import BayescompError, atomic_write, safe_load


class CheckpointError(BayescompError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or from another model."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; any failure becomes a `CheckpointError`."""
    state = safe_load(path, "checkpoint", CheckpointError, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return state
