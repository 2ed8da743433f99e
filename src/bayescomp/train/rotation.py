"""A checkpoint kept in rotation: the newest one written atomically, the one before kept as `<name>.prev`,
and the newest readable one loaded back (a damaged newest one falls back to the previous, with a warning)."""

from __future__ import annotations

import glob
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where the checkpoint before the newest one is kept: `<name>.prev` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def discard_checkpoint(path: str | os.PathLike) -> None:
    """Remove a run's checkpoint and the previous one kept beside it (when the run is finished)."""
    Path(path).unlink(missing_ok=True)
    previous_checkpoint(path).unlink(missing_ok=True)


def link_over(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` in one atomic rename (a hard link where the file system has them)."""
    tmp = dst.with_name(f".{src.name}.link.tmp")  # matches atomic_write's ".<name>.*.tmp" temp files
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_rotating(path: Path, state: dict[str, Any]) -> None:
    """Keep the current checkpoint as `<name>.prev`, then write the new one atomically.

    At every instant `path` holds a whole checkpoint (the old one or the new one), and `.prev` the one
    before it, so a checkpoint damaged after it was written (a truncating copy, a bad disk) still leaves
    a good one to resume from.
    """
    if path.is_file():
        link_over(path, previous_checkpoint(path))
    save_checkpoint(path, state)


def remove_stale_temps(path: Path) -> None:
    """Temp files of writes that a killed process left half done (they are never read)."""
    for tmp in glob.glob(os.path.join(glob.escape(str(path.parent)), glob.escape(f".{path.name}.") + "*.tmp")):
        Path(tmp).unlink(missing_ok=True)


def load_newest_checkpoint(path: Path, repair: bool, purpose: str = "resuming") -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint: `path`, else (with a warning that says it is `purpose` from it)
    `<name>.prev`.

    With `repair`, a damaged `path` is replaced by the good previous one, so that the next rotation cannot
    push the damaged file into `.prev`. Raises `CheckpointError` naming both files when neither loads.
    """
    prev = previous_checkpoint(path)
    try:
        return load_checkpoint(path), path
    except CheckpointError as newest_error:
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev)
        except CheckpointError as prev_error:
            raise CheckpointError(f"no usable checkpoint: {newest_error}; and the previous one: {prev_error}") from prev_error
        warnings.warn(f"{newest_error}; {purpose} from the previous checkpoint {prev} (one epoch earlier)",
                      RuntimeWarning, stacklevel=3)
        if repair:
            link_over(prev, path)
        return state, prev

