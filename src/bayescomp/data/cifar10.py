"""CIFAR-10: a safe reader for the official "python version" batches, augmentation, and a fetcher.

The official batches are pickles, and unpickling can run arbitrary code, so they are read with an unpickler
that resolves only the few numpy globals an array needs. Each batch is checked against its published MD5 and
its structure is validated, so that a wrong or damaged file fails with a message naming it.
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import pathlib
import pickle
import tarfile
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..base import atomic_write
from . import paths
from .paths import DataError, md5_file, md5_hex, read_bytes, resolve_data_dir

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "cifar10_augment",
    "cifar10_label_names",
    "fetch_cifar10",
    "load_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
#: Folder inside the official tarball; also accepted inside ``<root>/cifar10/``.
SUBDIR = "cifar-10-batches-py"

TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES: tuple[str, ...] = ("test_batch",)
META = "batches.meta"
FILES: tuple[str, ...] = (*TRAIN_BATCHES, *TEST_BATCHES, META)

#: Published MD5 of each file of the python-version distribution.
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_PIXELS = 3 * 32 * 32


# --------------------------------------------------------------------------------------------------------------
# restricted unpickling


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array reconstructor, wherever this numpy version keeps it (``numpy._core`` from 2.0)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` as Python 3 protocol-2 pickles use it for ``bytes``: latin-1 only."""
    if not isinstance(text, str) or encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"forbidden call _codecs.encode(..., {encoding!r})")
    return text.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays.

    Official batches (Python 2 pickles) reference ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype``; numpy 2 writes ``numpy._core.multiarray._reconstruct``. Batches re-saved by Python 3 with
    protocol 2 also spell ``bytes`` as ``_codecs.encode(text, "latin1")``, allowed here for latin-1 only.
    Any other global (``os.system``, ``builtins.eval``, ...) is refused before it can be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _safe_unpickle(blob: bytes, path: pathlib.Path) -> Any:
    """Unpickle ``blob`` with :class:`_RestrictedUnpickler`; any failure becomes a one-line DataError."""
    try:
        return _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused or invalid pickle ({exc})") from None
    except Exception as exc:  # truncated/corrupt pickles raise EOFError, ValueError, TypeError, ...
        raise DataError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None


def _field(obj: dict[Any, Any], key: str, path: pathlib.Path) -> Any:
    """``obj[key]`` accepting either ``bytes`` (Python 2 pickles) or ``str`` keys."""
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise DataError(f"{path}: batch has no {key!r} entry")


def _check_md5(name: str, path: pathlib.Path, blob: bytes) -> None:
    """Raise DataError unless ``blob`` has the published MD5 of the official file ``name``."""
    got = md5_hex(blob)
    if got != FILE_MD5[name]:
        raise DataError(
            f"{path}: MD5 {got} does not match the official {name} ({FILE_MD5[name]}); "
            f"re-fetch it, or pass verify=False for a non-official copy"
        )


def _parse_batch(blob: bytes, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode one data batch into ``uint8 (n, 3072)`` pixels and ``int64 (n,)`` labels, validating both."""
    obj = _safe_unpickle(blob, path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict batch, got {type(obj).__name__}")
    data = _field(obj, "data", path)
    labels = _field(obj, "labels", path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _PIXELS):
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (n, {_PIXELS}), got {desc}")
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
            raise DataError(f"{path}: 'labels' must be a list of ints")
        y = np.array(labels, dtype=np.int64).reshape(-1)
    elif isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        y = labels.astype(np.int64)
    else:
        raise DataError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}")
    if y.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {y.shape[0]} labels for {data.shape[0]} images")
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
    return data, y


def _parse_meta(blob: bytes, path: pathlib.Path) -> tuple[str, ...]:
    """Decode ``batches.meta`` into its 10 class names."""
    obj = _safe_unpickle(blob, path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    names = _field(obj, "label_names", path)
    if not (isinstance(names, (list, tuple)) and len(names) == 10 and all(isinstance(n, (bytes, str)) for n in names)):
        raise DataError(f"{path}: 'label_names' must be a list of 10 strings")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


# --------------------------------------------------------------------------------------------------------------
# loading


def _locate(folder: pathlib.Path, name: str) -> pathlib.Path:
    """``folder/name``, else ``folder/cifar-10-batches-py/name``; DataError naming the file if neither exists."""
    for candidate in (folder / name, folder / SUBDIR / name):
        if candidate.is_file():
            return candidate
    where = "" if folder.is_dir() else " (folder does not exist)"
    raise DataError(
        f"{folder / name}: CIFAR-10 file not found{where}; put the python-version batches there "
        f"or run bayescomp.data.fetch_cifar10()"
    )


def _stamp(path: pathlib.Path) -> tuple[str, int, int, int]:
    """Cache key part identifying a file's current contents."""
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_arrays(stamps: tuple[tuple[str, int, int, int], ...], verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and concatenate the batches named in ``stamps`` (cached: decoding pickles is slow)."""
    xs, ys = [], []
    for stamp in stamps:
        path = pathlib.Path(stamp[0])
        blob = read_bytes(path)
        if verify:
            _check_md5(path.name, path, blob)
        x, y = _parse_batch(blob, path)
        xs.append(x)
        ys.append(y)
    x_all = np.concatenate(xs) if len(xs) > 1 else np.ascontiguousarray(xs[0])
    x_all.flags.writeable = False
    y_all = np.concatenate(ys)
    y_all.flags.writeable = False
    return x_all, y_all


def load_cifar10(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10 split as ``(images, labels)``: float32 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Reads ``<data root>/cifar10/{data_batch_1..5 | test_batch}`` (or the same under ``cifar-10-batches-py/``).
    Pixels are scaled to ``[0, 1]`` and, with ``normalize``, standardised per channel with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`. ``verify`` checks each file's published MD5. Fresh tensors are
    returned on every call (the decoded bytes are cached).
    """
    if split == "train":
        names = TRAIN_BATCHES
    elif split == "test":
        names = TEST_BATCHES
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = resolve_data_dir(data_dir) / "cifar10"
    stamps = tuple(_stamp(_locate(folder, name)) for name in names)
    data, labels = _load_arrays(stamps, bool(verify))
    x = torch.from_numpy(data.astype(np.float32)).view(-1, 3, 32, 32)
    x.div_(255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
        x.sub_(mean).div_(std)
    return x, torch.from_numpy(labels.copy())


def cifar10_label_names(data_dir: str | os.PathLike[str] | None = None, *, verify: bool = True) -> tuple[str, ...]:
    """The class names stored in ``batches.meta`` (checked like the batches)."""
    path = _locate(resolve_data_dir(data_dir) / "cifar10", META)
    blob = read_bytes(path)
    if verify:
        _check_md5(META, path, blob)
    return _parse_meta(blob, path)


def cifar10_augment(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop (after zero-padding by ``pad``) and random horizontal flip, drawn per image.

    The standard CIFAR training augmentation, done for the whole batch with one gather instead of a Python loop.
    Offsets are drawn first (rows, then columns), then flips, so results are reproducible from ``generator``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, c, h, w = images.shape
    dev = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev).to(images.device)
    flip = (torch.rand(n, generator=generator, device=dev) < 0.5).to(images.device)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h[None, :]  # (n, h)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])  # (n, w)
    idx_n = torch.arange(n, device=images.device)[:, None, None, None]
    idx_c = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------------------------------
# fetching


def _check_file(name: str, path: pathlib.Path, blob: bytes, verify: bool) -> None:
    """MD5 (when ``verify``) and structure checks applied to every file before it is written."""
    if verify:
        _check_md5(name, path, blob)
    if name == META:
        _parse_meta(blob, path)
    else:
        _parse_batch(blob, path)


def _present_and_valid(folder: pathlib.Path, name: str, verify: bool) -> bool:
    """True when ``load_cifar10`` would find ``name`` and (with ``verify``) it has the published MD5."""
    try:
        path = _locate(folder, name)
    except DataError:
        return False
    return not verify or md5_file(path) == FILE_MD5[name]


def _stage_from_dir(source: pathlib.Path, names: list[str], verify: bool) -> dict[str, bytes]:
    """Read and check ``names`` from a local folder (or its ``cifar-10-batches-py/``) before writing anything."""
    staged: dict[str, bytes] = {}
    for name in names:
        path = _locate(source, name)
        blob = read_bytes(path)
        _check_file(name, path, blob, verify)
        staged[name] = blob
    return staged


def _stage_from_tar(archive: pathlib.Path, names: list[str], verify: bool) -> dict[str, bytes]:
    """Pull exactly ``cifar-10-batches-py/<name>`` regular files out of the tarball, by fixed name.

    Output names come from our own list, never from the archive, so member paths cannot escape the folder.
    """
    staged: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for name in names:
                member_name = f"{SUBDIR}/{name}"
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    raise DataError(f"{archive}: archive has no {member_name}") from None
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is None:
                    raise DataError(f"{archive}: {member_name} is not a regular file")
                blob = fh.read()
                _check_file(name, archive / member_name, blob, verify)
                staged[name] = blob
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: not a readable tar.gz archive ({exc})") from None
    return staged


def _download_tarball(dest: pathlib.Path, folder: pathlib.Path, timeout: float, progress: bool) -> None:
    """Download :data:`CIFAR10_URL` into ``dest``; if unreachable, DataError saying how to fill ``folder``."""
    try:
        with open(dest, "wb") as fh:
            paths.download(CIFAR10_URL, fh, timeout=timeout, progress=progress, desc="cifar-10-python.tar.gz")
    except (OSError, ValueError, EOFError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"could not download CIFAR-10 from {CIFAR10_URL}: {reason}; copy the python-version batches into "
            f"{folder} or pass a local source"
        ) from None


def fetch_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 10.0,
    progress: bool = True,
    verify: bool = True,
) -> pathlib.Path:
    """Make sure ``<data root>/cifar10`` holds the python-version batches; return that folder.

    ``source`` may be a local folder with the batches (directly or in ``cifar-10-batches-py/``) or a local copy
    of ``cifar-10-python.tar.gz``; without it the official tarball is downloaded (MD5-checked). Files already
    present (and, with ``verify``, matching their published MD5) are kept. Each file is checked, and its
    structure validated, before it is written atomically. ``verify=False`` only serves non-official test copies.
    """
    folder = resolve_data_dir(data_dir) / "cifar10"
    missing = [name for name in FILES if not _present_and_valid(folder, name, verify)]
    if not missing:
        return folder
    if source is not None:
        src = pathlib.Path(source)
        if src.is_file():
            staged = _stage_from_tar(src, missing, verify)
        elif src.is_dir():
            staged = _stage_from_dir(src, missing, verify)
        else:
            raise DataError(f"{src}: CIFAR-10 source not found (expected a folder of batches or the .tar.gz)")
    else:
        with tempfile.TemporaryDirectory(prefix="bayescomp-cifar10-") as tmp:
            archive = pathlib.Path(tmp) / "cifar-10-python.tar.gz"
            _download_tarball(archive, folder, timeout, progress)
            got = md5_file(archive)
            if got != CIFAR10_TAR_MD5:
                raise DataError(f"{CIFAR10_URL}: downloaded archive has MD5 {got}, expected {CIFAR10_TAR_MD5}")
            staged = _stage_from_tar(archive, missing, verify)
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in staged.items():
        atomic_write(folder / name, blob)
    return folder
