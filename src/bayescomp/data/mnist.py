"""MNIST: a checked reader for the original IDX files, and a fetcher from a local folder or the official mirrors.

The reader accepts the four standard files gzipped (preferred) or raw, checks them against known digests so a
corrupt or substituted download fails loudly instead of silently training on garbage, validates the IDX
headers, and caches the decoded tensors in-process because experiments reload the same split many times.
"""

from __future__ import annotations

import functools
import gzip
import http.client
import io
import math
import os
import pathlib
import struct
import zlib

import numpy as np
import torch

from ..base import atomic_write
from . import paths
from .paths import DataError, md5_hex, read_bytes, resolve_data_dir, sha256_hex

__all__ = ["MNIST_MIRRORS", "fetch_mnist", "load_mnist"]

#: split name -> file-name prefix of the official files.
_PREFIX = {"train": "train", "test": "t10k"}

#: SHA-256 of the gzipped originals (as distributed by the usual mirrors and in shared/datasets/mnist).
GZ_SHA256 = {
    "train-images-idx3-ubyte": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}

#: Published MD5 of the uncompressed originals.
RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

FILES: tuple[str, ...] = tuple(RAW_MD5)

#: Mirrors serving the four ``.gz`` files; module-level so tests and offline setups can empty it.
MNIST_MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]

_IMAGE_MAGIC_NDIM, _LABEL_MAGIC_NDIM = 3, 1
_UINT8 = 0x08


# --------------------------------------------------------------------------------------------------------------
# reading


def _split_prefix(split: str) -> str:
    """Map ``"train"``/``"test"`` to the official file prefix; anything else is a programming error."""
    try:
        return _PREFIX[split]
    except (KeyError, TypeError):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}") from None


def _locate(folder: pathlib.Path, name: str) -> pathlib.Path:
    """Return ``folder/name.gz`` if present, else ``folder/name``; raise DataError naming what is missing."""
    if not folder.is_dir():
        raise DataError(
            f"{folder}: MNIST folder not found (needed for {name}); run bayescomp.data.fetch_mnist() "
            f"or point BAYESCOMP_DATA at a root holding mnist/"
        )
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder / name}[.gz]: MNIST file not found; run bayescomp.data.fetch_mnist() to get it")


def _unpack_checked(name: str, path: pathlib.Path, blob: bytes, verify: bool) -> bytes:
    """Return the uncompressed IDX bytes of ``blob`` (read from ``path``), checked against the known digests.

    A ``.gz`` passes if its SHA-256 is the distributed one, or failing that if its *contents* have the
    published MD5: a file re-gzipped by another tool is still the genuine data.
    """
    if path.name.endswith(".gz"):
        sha_ok = verify and sha256_hex(blob) == GZ_SHA256[name]
        try:
            raw = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
        if verify and not sha_ok and md5_hex(raw) != RAW_MD5[name]:
            raise DataError(
                f"{path}: checksum mismatch (neither its SHA-256 nor the MD5 of its contents is the published "
                f"one); delete it and run fetch_mnist() again"
            )
        return raw
    if verify and md5_hex(blob) != RAW_MD5[name]:
        raise DataError(
            f"{path}: checksum mismatch (MD5 {md5_hex(blob)} != published {RAW_MD5[name]}); "
            f"delete it and run fetch_mnist() again"
        )
    return blob


def _parse_idx(raw: bytes, path: pathlib.Path, ndim: int, tail: tuple[int, ...]) -> np.ndarray:
    """Decode an unsigned-byte IDX blob with ``ndim`` dimensions whose trailing sizes are ``tail``.

    Every header field is checked against the file length so truncation and corruption surface here.
    """
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()} (first two bytes must be zero)")
    if raw[2] != _UINT8:
        raise DataError(f"{path}: unsupported IDX element type 0x{raw[2]:02x} (expected 0x08, unsigned byte)")
    if raw[3] != ndim:
        raise DataError(f"{path}: IDX header declares {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if dims[1:] != tail:
        raise DataError(f"{path}: IDX header declares sizes {dims}, expected (n, {', '.join(map(str, tail))})")
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header declares {expected} data bytes for sizes {dims} but the file holds "
            f"{len(raw) - header} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_file(name: str, path: pathlib.Path, verify: bool) -> np.ndarray:
    """Read, check and decode one of the four MNIST files."""
    raw = _unpack_checked(name, path, read_bytes(path), verify)
    if "images" in name:
        return _parse_idx(raw, path, _IMAGE_MAGIC_NDIM, (28, 28))
    return _parse_idx(raw, path, _LABEL_MAGIC_NDIM, ())


def _stamp(path: pathlib.Path) -> tuple[int, int, int]:
    """Identity of a file's current contents for cache keys (changes when the file is replaced)."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(
    images_path: pathlib.Path,
    labels_path: pathlib.Path,
    stamps: tuple[tuple[int, int, int], tuple[int, int, int]],
    verify: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split into tensors; cached on the file paths, their stamps and ``verify``."""
    del stamps  # part of the cache key only
    prefix = images_path.name.split("-", 1)[0]
    images = _read_file(f"{prefix}-images-idx3-ubyte", images_path, verify)
    labels = _read_file(f"{prefix}-labels-idx1-ubyte", labels_path, verify)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x.div_(255.0).sub_(0.5).mul_(2.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as ``(images, labels)``.

    ``images`` is float32 ``(N, 1, 28, 28)`` scaled to ``[-1, 1]`` and ``labels`` int64 ``(N,)``. Files come from
    ``<data root>/mnist`` (see :func:`resolve_data_dir`), ``.gz`` preferred over raw. With ``verify`` the files are
    checked against the published digests. The tensors are cached and shared between calls: treat them as
    read-only (``.clone()`` before modifying in place).
    """
    prefix = _split_prefix(split)
    folder = resolve_data_dir(data_dir) / "mnist"
    images_path = _locate(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _locate(folder, f"{prefix}-labels-idx1-ubyte")
    stamps = (_stamp(images_path), _stamp(labels_path))
    return _load_cached(images_path, labels_path, stamps, bool(verify))


# --------------------------------------------------------------------------------------------------------------
# fetching


def _present_and_valid(folder: pathlib.Path, name: str) -> bool:
    """True when the file ``load_mnist`` would pick for ``name`` exists and passes verification."""
    try:
        path = _locate(folder, name)
        _unpack_checked(name, path, read_bytes(path), verify=True)
    except DataError:
        return False
    return True


def _stage_from_dir(source: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    """Read and verify ``names`` from a local folder; return ``{destination file name: bytes}``.

    Everything is checked before anything is written, so a bad source leaves the destination untouched.
    """
    if not source.is_dir():
        raise DataError(f"{source}: MNIST source folder not found")
    staged: dict[str, bytes] = {}
    for name in names:
        candidates = [(source / f"{name}.gz", f"{name}.gz"), (source / name, name)]
        found = next(((p, dest) for p, dest in candidates if p.is_file()), None)
        if found is None:
            raise DataError(f"{source / name}[.gz]: not found in the MNIST source folder")
        path, dest_name = found
        blob = read_bytes(path)
        _unpack_checked(name, path, blob, verify=True)
        staged[dest_name] = blob
    return staged


def _install(folder: pathlib.Path, staged: dict[str, bytes]) -> None:
    """Atomically write verified files and drop the other form (raw/gz) of the same file, which may be stale."""
    folder.mkdir(parents=True, exist_ok=True)
    for dest_name, blob in staged.items():
        atomic_write(folder / dest_name, blob)
        other = dest_name[:-3] if dest_name.endswith(".gz") else f"{dest_name}.gz"
        (folder / other).unlink(missing_ok=True)


def _stage_from_mirrors(names: list[str], timeout: float, progress: bool, tried: list[str]) -> dict[str, bytes]:
    """Download the ``.gz`` files from :data:`MNIST_MIRRORS`, verifying each; failures go to ``tried``."""
    staged: dict[str, bytes] = {}
    dead: set[str] = set()
    for name in names:
        for base in MNIST_MIRRORS:
            if base in dead:
                continue
            url = base.rstrip("/") + f"/{name}.gz"
            buf = io.BytesIO()
            try:
                paths.download(url, buf, timeout=timeout, progress=progress, desc=f"{name}.gz")
                _unpack_checked(name, pathlib.Path(f"{name}.gz"), buf.getvalue(), verify=True)
            except DataError as exc:
                tried.append(f"{url}: {exc}")
                continue
            except (OSError, ValueError, EOFError, http.client.HTTPException) as exc:
                tried.append(f"{url}: {exc}")
                dead.add(base)  # unreachable: do not wait for its timeout again for the other files
                continue
            staged[f"{name}.gz"] = buf.getvalue()
            break
    return staged


def fetch_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 10.0,
    progress: bool = True,
) -> pathlib.Path:
    """Make sure ``<data root>/mnist`` holds the four verified MNIST files; return that folder.

    Files already present and valid are kept. With ``source`` the files (``.gz`` or raw) are copied from that
    local folder; otherwise the official mirrors in :data:`MNIST_MIRRORS` are tried. Every file is checked before
    it is written atomically; if some cannot be obtained, :class:`DataError` lists what was tried and where to
    put the files by hand.
    """
    folder = resolve_data_dir(data_dir) / "mnist"
    missing = [name for name in FILES if not _present_and_valid(folder, name)]
    if not missing:
        return folder
    if source is not None:
        _install(folder, _stage_from_dir(pathlib.Path(source), missing))
        return folder
    tried: list[str] = [] if MNIST_MIRRORS else ["mirrors: none configured"]
    staged = _stage_from_mirrors(missing, timeout, progress, tried)
    _install(folder, staged)
    missing = [name for name in missing if f"{name}.gz" not in staged]
    if missing:
        raise DataError(
            f"could not fetch MNIST file(s) {', '.join(missing)}; tried: {paths.join_lines(tried)}; download "
            f"{', '.join(f'{name}.gz' for name in missing)} from an MNIST mirror into {folder}, or into a folder "
            f"you pass as source= (bayescomp data fetch mnist --source DIR)"
        )
    return folder
