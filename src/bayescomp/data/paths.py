"""Data-root resolution and the small I/O helpers shared by the dataset readers.

The data root holds one folder per dataset (``mnist/``, ``cifar10/``). It is chosen, in order, from an explicit
argument, the ``BAYESCOMP_DATA`` environment variable, or a per-user cache directory, so that library code,
the CLI and tests agree on where data lives without any of them creating directories as a side effect.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.request
from collections.abc import Callable, Iterable
from typing import IO, Any

from tqdm import tqdm

from ..base import BayescompError

__all__ = ["DATASETS", "ENV_VAR", "INPUT_SHAPES", "DataError", "input_shape", "resolve_data_dir"]

DATASETS: tuple[str, ...] = ("mnist", "cifar10")
#: the shape of one example of each dataset, as its reader returns it (channels, height, width)
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
ENV_VAR = "BAYESCOMP_DATA"

#: Opens a URL; module-level so tests (and offline deployments) can replace it and never touch the network.
urlopen: Callable[..., Any] = urllib.request.urlopen

_CHUNK = 1 << 20


class DataError(BayescompError, ValueError):
    """A user-fixable data problem: missing directory or file, checksum mismatch, or malformed contents."""


def input_shape(dataset: str) -> tuple[int, ...]:
    """The shape of one example of `dataset` (e.g. (1, 28, 28) for MNIST), as its reader returns it."""
    try:
        return INPUT_SHAPES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}") from None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the absolute data root: ``data_dir``, else ``$BAYESCOMP_DATA``, else the user cache dir.

    The cache dir is ``$XDG_CACHE_HOME/bayescomp`` (when that is set to an absolute path, per the XDG spec)
    or ``~/.cache/bayescomp``. Nothing is created here; readers report missing folders themselves.
    """
    if data_dir is not None and str(data_dir) != "":
        root = pathlib.Path(data_dir)
    elif os.environ.get(ENV_VAR):
        root = pathlib.Path(os.environ[ENV_VAR])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
        root = base / "bayescomp"
    return root.expanduser().resolve()


def md5_hex(data: bytes) -> str:
    """MD5 of ``data`` as hex (used only as a published integrity check, not for security)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest()


def md5_file(path: pathlib.Path) -> str:
    """MD5 of a file, streamed so large archives need not fit in memory."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(path: pathlib.Path) -> bytes:
    """Read a whole file, turning OS errors into a one-line :class:`DataError` naming the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def download(url: str, out: IO[bytes], *, timeout: float, progress: bool, desc: str) -> None:
    """Stream ``url`` into the binary file object ``out``, with an optional tqdm bar.

    Network errors propagate (``OSError``/``urllib.error.URLError``); callers record them as tried routes.
    """
    with urlopen(url, timeout=timeout) as resp:
        status = getattr(resp, "status", 200)
        if status is not None and status >= 400:
            raise OSError(f"HTTP {status}")
        length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) is not None else None
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))


def join_lines(items: Iterable[str]) -> str:
    """Join route/failure descriptions into one line for an error message."""
    return "; ".join(items)
