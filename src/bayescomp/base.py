"""The floor every package stands on: the root of bayescomp's errors, atomic file writes, safe tensor loading.

It imports nothing from bayescomp, so any module may import it.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["BayescompError", "atomic_write", "load_error", "safe_load"]


class BayescompError(Exception):
    """A problem a user can cause and fix (a wrong path, a corrupt or foreign file, ...), said in one line.

    Each package's own errors derive from it and from the built-in error they have always been
    (`PackedFileError` is a `ValueError`, `CheckpointError` a `RuntimeError`), so both ways of catching work.
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function that writes to the open binary file) to `path` atomically.

    It goes to a temp file beside `path` (``.<name>.<random>.tmp``), is flushed to disk, then renamed over
    `path`: readers see the old file or the new one, never half of one, and on any error, an interrupt
    included, nothing is left behind. The folder must exist. The file gets the usual permissions (umask).
    """
    path = Path(path)
    write = data if callable(data) else (lambda f: f.write(data))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
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


def safe_load(
    path: str | os.PathLike,
    what: str,
    error: type[Exception] = BayescompError,
    map_location: str | torch.device = "cpu",
) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never unpickled code.

    A missing file raises `error("<what> not found: <path>")`; one that cannot be read, or that holds
    anything else, raises `error("cannot read <what> <path>: <why>")` (see `load_error`).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcode, forbidden global, ...
        raise error(f"cannot read {what} {path}: {load_error(exc)}") from exc
