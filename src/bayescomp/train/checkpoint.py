"""Atomic, safely loadable checkpoints (tensors and plain containers only; never unpickled code)."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or from another model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename it over `path`.

    Readers see the old file or the new one, never half of one; on any error nothing is left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a user's file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_error(exc: BaseException) -> str:
    """Why `torch.load(..., weights_only=True)` refused a file, in one line.

    A file that holds anything but tensors and plain containers (a pickled object, code) is named as such,
    without PyTorch's advice to reload it with `weights_only=False`: that would run whatever the file holds,
    and bayescomp never does it for a file it is handed.
    """
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        blocked = re.search(r"unsupported (?:GLOBAL|global) ([\w.]+)", text)
        what = f" ({blocked.group(1)})" if blocked else ""
        return (f"it holds Python objects other than tensors and plain containers{what}, which bayescomp does "
                "not load (it never unpickles code from a file)")
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return f"{type(exc).__name__}: {line}"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; any failure becomes a `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcode, forbidden global, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return state
