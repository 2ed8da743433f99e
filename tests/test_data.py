"""Tests for bayescomp.data: real MNIST, corruption handling, fetching without network, CIFAR-10 format."""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import shutil
import struct
import urllib.error
from typing import ClassVar

import numpy as np
import pytest
import torch

from bayescomp import data
from bayescomp.data import (
    DATASETS,
    DataError,
    cifar10_augment,
    cifar10_label_names,
    fetch_cifar10,
    fetch_mnist,
    load_cifar10,
    load_mnist,
    resolve_data_dir,
)
from bayescomp.data import cifar10 as cifar_mod
from bayescomp.data import mnist as mnist_mod
from bayescomp.data import paths as paths_mod

SHARED = pathlib.Path(
    os.environ.get("BAYESCOMP_TEST_DATA") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
)
MNIST_DIR = SHARED / "mnist"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every test runs offline: URL opens are recorded and fail."""
    opened: list[str] = []

    def refuse(url: str, timeout: float | None = None) -> None:
        opened.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(paths_mod, "urlopen", refuse)
    return opened


def _copy_mnist(dest_root: pathlib.Path, names: tuple[str, ...] = TEST_FILES, *, raw: bool = False) -> pathlib.Path:
    """Copy (or gunzip) shared MNIST files into ``dest_root/mnist``; return that folder."""
    folder = dest_root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = MNIST_DIR / f"{name}.gz"
        if raw:
            (folder / name).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, folder / f"{name}.gz")
    return folder


# ------------------------------------------------------------------------------------------------------------------
# paths


def test_datasets_constant() -> None:
    assert DATASETS == ("mnist", "cifar10")


def test_resolve_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv("BAYESCOMP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == (tmp_path / "xdg" / "bayescomp").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == (tmp_path / "home" / ".cache" / "bayescomp").resolve()
    monkeypatch.setenv("BAYESCOMP_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == (tmp_path / "env").resolve()
    assert resolve_data_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert resolve_data_dir(str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()
    assert not (tmp_path / "env").exists()
    assert not (tmp_path / "explicit").exists()


# ------------------------------------------------------------------------------------------------------------------
# MNIST: real data


@pytest.mark.parametrize(
    ("split", "n", "counts", "mean"), [("train", 60000, TRAIN_COUNTS, 0.1307), ("test", 10000, TEST_COUNTS, 0.1325)]
)
def test_load_mnist_real(split: str, n: int, counts: list[int], mean: float) -> None:
    x, y = load_mnist(split, SHARED)
    assert x.shape == (n, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.shape == (n,)
    assert y.dtype == torch.int64
    assert x.min().item() == -1.0
    assert x.max().item() == 1.0
    assert torch.bincount(y, minlength=10).tolist() == counts
    # pixel mean /255 (README: 0.1307 for train); in [-1, 1] that is 2 * mean - 1
    assert abs(x.mean().item() - (2 * mean - 1)) < 2e-4


def test_load_mnist_env_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAYESCOMP_DATA", str(SHARED))
    x1, y1 = load_mnist("test")
    x2, y2 = load_mnist("test", SHARED)
    assert x1 is x2
    assert y1 is y2


def test_load_mnist_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", SHARED)


def test_load_mnist_raw_files_same_tensors(tmp_path: pathlib.Path) -> None:
    _copy_mnist(tmp_path, raw=True)
    xr, yr = load_mnist("test", tmp_path, verify=True)  # MD5 route
    xg, yg = load_mnist("test", SHARED)
    assert torch.equal(xr, xg)
    assert torch.equal(yr, yg)


def test_load_mnist_prefers_gz(tmp_path: pathlib.Path) -> None:
    folder = _copy_mnist(tmp_path)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")  # raw copy is ignored when .gz exists
    _, y = load_mnist("test", tmp_path)
    assert torch.bincount(y).tolist() == TEST_COUNTS


# ------------------------------------------------------------------------------------------------------------------
# MNIST: corrupt / missing data


def test_flipped_byte_in_gz_rejected(tmp_path: pathlib.Path) -> None:
    folder = _copy_mnist(tmp_path)
    target = folder / "t10k-images-idx3-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_mnist("test", tmp_path)


def test_raw_checksum_mismatch_rejected(tmp_path: pathlib.Path) -> None:
    folder = _copy_mnist(tmp_path, raw=True)
    target = folder / "t10k-labels-idx1-ubyte"
    blob = bytearray(target.read_bytes())
    blob[-1] = (blob[-1] + 1) % 10  # still a valid IDX file, just not the published one
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*checksum"):
        load_mnist("test", tmp_path)
    _, y = load_mnist("test", tmp_path, verify=False)  # structure is fine, so unverified load works
    assert y.shape == (10000,)


def test_truncated_raw_idx_rejected(tmp_path: pathlib.Path) -> None:
    folder = _copy_mnist(tmp_path, raw=True)
    target = folder / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*(truncated|header)"):
        load_mnist("test", tmp_path, verify=False)


@pytest.mark.parametrize(
    ("header", "pattern"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x0b\x01" + struct.pack(">I", 1) + b"\x00", "element type"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 1, 1) + b"\x00", "dimensions"),
        (b"\x00\x00\x08", "header"),
    ],
)
def test_bad_idx_header_rejected(tmp_path: pathlib.Path, header: bytes, pattern: str) -> None:
    folder = _copy_mnist(tmp_path, raw=True)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(header)
    with pytest.raises(DataError, match=pattern):
        load_mnist("test", tmp_path, verify=False)


def test_label_image_count_mismatch(tmp_path: pathlib.Path) -> None:
    folder = _copy_mnist(tmp_path, raw=True)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03")
    with pytest.raises(DataError, match="3 labels for 10000 images"):
        load_mnist("test", tmp_path, verify=False)


def test_missing_file_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DataError, match="mnist"):
        load_mnist("test", tmp_path)  # no mnist/ folder at all
    _copy_mnist(tmp_path, names=("t10k-images-idx3-ubyte",))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_mnist("test", tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# MNIST: fetching


def test_fetch_mnist_from_local_source(tmp_path: pathlib.Path, offline: list[str]) -> None:
    folder = fetch_mnist(tmp_path, source=MNIST_DIR, progress=False)
    assert folder == (tmp_path / "mnist").resolve()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.gz" for n in mnist_mod.FILES)
    for name in mnist_mod.FILES:
        assert (folder / f"{name}.gz").read_bytes() == (MNIST_DIR / f"{name}.gz").read_bytes()
    _, y = load_mnist("test", tmp_path)
    assert torch.bincount(y).tolist() == TEST_COUNTS
    # second call: everything present and valid, so no route is needed at all
    assert fetch_mnist(tmp_path, progress=False) == folder
    assert offline == []


def test_fetch_mnist_accepts_raw_and_regzipped_files(tmp_path: pathlib.Path) -> None:
    """A source folder may hold the .gz files, raw ones, or ones gzipped again by another tool (content MD5)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in mnist_mod.FILES:
        raw = gzip.decompress((MNIST_DIR / f"{name}.gz").read_bytes())
        if "labels" in name:
            (src / name).write_bytes(raw)
        elif "train" in name:
            (src / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        else:
            shutil.copyfile(MNIST_DIR / f"{name}.gz", src / f"{name}.gz")
    folder = fetch_mnist(tmp_path / "root", source=src, progress=False)
    assert (folder / "train-labels-idx1-ubyte").is_file()
    assert (folder / "t10k-images-idx3-ubyte.gz").is_file()
    assert (folder / "train-images-idx3-ubyte.gz").read_bytes() != (MNIST_DIR / "train-images-idx3-ubyte.gz").read_bytes()
    x, y = load_mnist("train", tmp_path / "root", verify=True)
    assert torch.bincount(y).tolist() == TRAIN_COUNTS
    assert x.shape == (60000, 1, 28, 28)


def test_fetch_mnist_corrupt_source_writes_nothing(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(MNIST_DIR, src)
    bad = src / "t10k-labels-idx1-ubyte.gz"
    bad.chmod(0o644)
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        fetch_mnist(tmp_path / "root", source=src, progress=False)
    dest = tmp_path / "root" / "mnist"
    assert not dest.exists() or list(dest.iterdir()) == []


def test_fetch_mnist_missing_source_file(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(MNIST_DIR / "train-images-idx3-ubyte.gz", src / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        fetch_mnist(tmp_path / "root", source=src, progress=False)


def test_fetch_mnist_all_routes_fail(tmp_path: pathlib.Path, offline: list[str]) -> None:
    with pytest.raises(DataError) as info:
        fetch_mnist(tmp_path, progress=False, timeout=0.1)
    msg = str(info.value)
    assert "\n" not in msg
    for base in mnist_mod.MNIST_MIRRORS:
        assert base.rstrip("/") in msg
    assert "network disabled in tests" in msg
    assert str(tmp_path / "mnist") in msg and "--source" in msg  # where to put the files by hand
    assert "pip" not in msg
    # an unreachable mirror is tried once, not once per file
    assert len(offline) == len(mnist_mod.MNIST_MIRRORS)
    assert not (tmp_path / "mnist").exists() or list((tmp_path / "mnist").iterdir()) == []


def test_fetch_mnist_mirror_route(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror serving the right bytes is used; one serving wrong bytes is recorded and skipped."""
    import io

    monkeypatch.setattr(mnist_mod, "MNIST_MIRRORS", ["https://bad.example/", "https://good.example/mnist"])

    class Resp(io.BytesIO):
        status = 200
        headers: ClassVar[dict[str, str]] = {}

    def fake_open(url: str, timeout: float | None = None) -> Resp:
        name = url.rsplit("/", 1)[1]
        if url.startswith("https://bad.example/"):
            return Resp(b"not gzip at all")
        return Resp((MNIST_DIR / name).read_bytes())

    monkeypatch.setattr(paths_mod, "urlopen", fake_open)
    folder = fetch_mnist(tmp_path, progress=False)
    for name in mnist_mod.FILES:
        assert (folder / f"{name}.gz").read_bytes() == (MNIST_DIR / f"{name}.gz").read_bytes()


# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10: synthetic batches in the official format


def _py2_pickle(obj: object) -> bytes:
    """Serialise like Python 2's cPickle protocol 2 did for the official batches (``str`` -> SHORT_BINSTRING)."""
    out = bytearray(b"\x80\x02")

    def emit(o: object) -> None:
        if isinstance(o, bytes):
            out.extend(b"U" + bytes([len(o)]) + o if len(o) < 256 else b"T" + struct.pack("<I", len(o)) + o)
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o))
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
            emit((0,))
            emit(b"b")
            out.extend(b"tR(")  # args tuple, REDUCE, then the state tuple
            emit(1)
            emit(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n")
            emit((b"u1", 0, 1))
            out.extend(b"R")
            emit((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")  # BUILD: dtype state
            emit(False)
            emit(o.tobytes())
            out.extend(b"tb")  # state tuple, BUILD: array state
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _batch(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, size=n)]


def _write_batch(path: pathlib.Path, images: np.ndarray, labels: list[int], *, py2: bool = True) -> None:
    obj = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": images,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(_py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2))


def _write_meta(path: pathlib.Path, *, py2: bool = True) -> None:
    obj = {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_cases_per_batch": 20, b"num_vis": 3072}
    path.write_bytes(_py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2))


@pytest.fixture
def cifar_root(tmp_path: pathlib.Path) -> pathlib.Path:
    """Data root with small (20-image) official-format batches in cifar10/ (train batches py2-style)."""
    folder = tmp_path / "root" / "cifar10"
    folder.mkdir(parents=True)
    for i, name in enumerate(cifar_mod.TRAIN_BATCHES):
        images, labels = _batch(20, seed=i)
        if i == 0:
            images[0, :] = 0
            images[0, 1] = 200  # R channel, row 0, col 1
            images[0, 1024 + 32 * 2 + 3] = 100  # G channel, row 2, col 3
            images[0, 2048 + 32 * 31 + 31] = 255  # B channel, row 31, col 31
            labels[0] = 7
        _write_batch(folder / name, images, labels, py2=i % 2 == 0)  # mix of Python 2 and Python 3 pickles
    images, labels = _batch(20, seed=99)
    _write_batch(folder / "test_batch", images, labels)
    _write_meta(folder / "batches.meta")
    return tmp_path / "root"


def test_cifar10_layout_and_values(cifar_root: pathlib.Path) -> None:
    x, y = load_cifar10("train", cifar_root, verify=False, normalize=False)
    assert x.shape == (100, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.shape == (100,)
    assert y.dtype == torch.int64
    assert x[0, 0, 0, 1].item() == pytest.approx(200 / 255)
    assert x[0, 1, 2, 3].item() == pytest.approx(100 / 255)
    assert x[0, 2, 31, 31].item() == 1.0
    assert (x[0] > 0).sum().item() == 3
    assert y[0].item() == 7
    expected = np.concatenate([_batch(20, seed=i)[0] for i in range(1, 5)]).reshape(80, 3, 32, 32) / 255.0
    assert np.allclose(x[20:].numpy(), expected, atol=1e-7)
    assert y[20:].tolist() == [v for i in range(1, 5) for v in _batch(20, seed=i)[1]]
    x_test, y_test = load_cifar10("test", cifar_root, verify=False, normalize=False)
    assert x_test.shape == (20, 3, 32, 32)
    assert y_test.tolist() == _batch(20, seed=99)[1]


def test_cifar10_normalisation(cifar_root: pathlib.Path) -> None:
    raw, _ = load_cifar10("test", cifar_root, verify=False, normalize=False)
    norm, _ = load_cifar10("test", cifar_root, verify=False)
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(norm, (raw - mean) / std, atol=1e-6)
    assert not torch.allclose(norm, raw)
    norm.zero_()  # fresh tensors per call: mutating one result does not affect the next
    again, _ = load_cifar10("test", cifar_root, verify=False)
    assert again.abs().sum() > 0


def test_cifar10_subfolder_and_meta(tmp_path: pathlib.Path, cifar_root: pathlib.Path) -> None:
    root = tmp_path / "other"
    shutil.copytree(cifar_root / "cifar10", root / "cifar10" / "cifar-10-batches-py")
    x, _ = load_cifar10("test", root, verify=False)
    assert x.shape == (20, 3, 32, 32)
    assert cifar10_label_names(root, verify=False) == data.CIFAR10_CLASSES


def test_cifar10_bad_split(cifar_root: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_cifar10("val", cifar_root, verify=False)


def test_cifar10_verify_rejects_synthetic(cifar_root: pathlib.Path) -> None:
    with pytest.raises(DataError, match=r"test_batch: MD5"):
        load_cifar10("test", cifar_root, verify=True)
    with pytest.raises(DataError, match=r"batches.meta: MD5"):
        cifar10_label_names(cifar_root)


def test_cifar10_verify_uses_official_digests(cifar_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the digest table pointing at our file verify passes; modifying one byte then fails."""
    path = cifar_root / "cifar10" / "test_batch"
    monkeypatch.setitem(cifar_mod.FILE_MD5, "test_batch", paths_mod.md5_hex(path.read_bytes()))
    x, _ = load_cifar10("test", cifar_root, verify=True)
    assert x.shape[0] == 20
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 1  # inside the pixel bytes: still a valid pickle
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="test_batch: MD5"):
        load_cifar10("test", cifar_root, verify=True)
    load_cifar10("test", cifar_root, verify=False)  # structure still fine


def test_cifar10_missing_batch(cifar_root: pathlib.Path) -> None:
    (cifar_root / "cifar10" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10("train", cifar_root, verify=False)


def test_cifar10_truncated_pickle(cifar_root: pathlib.Path) -> None:
    path = cifar_root / "cifar10" / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"test_batch.*(corrupt|truncated)"):
        load_cifar10("test", cifar_root, verify=False)


class _Evil:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_forbidden_global_not_executed(cifar_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker), b"labels": [0]}
    (cifar_root / "cifar10" / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"test_batch.*forbidden global"):
        load_cifar10("test", cifar_root, verify=False)
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_Evil(tmp_path / "control"), protocol=2)) == 0  # the payload does work...
    assert (tmp_path / "control").exists()  # ...so the reader really blocked it


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ([1, 2, 3], "expected a dict"),
        ({b"labels": [0]}, "no 'data'"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, b"x"]}, "list of ints"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": [3]}, None),  # str keys are accepted
    ],
)
def test_cifar10_structure_validation(cifar_root: pathlib.Path, obj: object, pattern: str | None) -> None:
    (cifar_root / "cifar10" / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    if pattern is None:
        _, y = load_cifar10("test", cifar_root, verify=False)
        assert y.tolist() == [3]
    else:
        with pytest.raises(DataError, match=f"test_batch.*{pattern}"):
            load_cifar10("test", cifar_root, verify=False)


# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10: augmentation


def test_augment_shape_and_determinism() -> None:
    images = torch.rand(16, 3, 32, 32)
    a = cifar10_augment(images, torch.Generator().manual_seed(0))
    b = cifar10_augment(images, torch.Generator().manual_seed(0))
    c = cifar10_augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape
    assert a.dtype == images.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_pad0_only_flips() -> None:
    images = torch.rand(64, 3, 8, 8)
    out = cifar10_augment(images, torch.Generator().manual_seed(3), pad=0)
    flipped = images.flip(-1)
    same = (out == images).flatten(1).all(1)
    flip = (out == flipped).flatten(1).all(1)
    assert bool((same | flip).all())
    assert 10 < int(flip.sum()) < 54  # roughly half flipped


def test_augment_matches_padded_shift() -> None:
    pad, n = 2, 40
    images = torch.rand(n, 3, 6, 7)
    out = cifar10_augment(images, torch.Generator().manual_seed(5), pad=pad)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    seen = set()
    for i in range(n):
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(out[i], (lambda crop: crop.flip(-1) if f else crop)(padded[i, :, dy : dy + 6, dx : dx + 7]))
        ]
        assert matches, f"image {i} is not a padded crop (+flip) of its input"
        seen.update(matches)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5  # offsets vary
    assert {f for _, _, f in seen} == {False, True}


def test_augment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        cifar10_augment(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="pad"):
        cifar10_augment(torch.zeros(1, 3, 32, 32), pad=-1)


# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10: fetching


def test_fetch_cifar10offline(tmp_path: pathlib.Path, offline: list[str]) -> None:
    with pytest.raises(DataError) as info:
        fetch_cifar10(tmp_path, progress=False, timeout=0.1)
    msg = str(info.value)
    assert msg.startswith(f"could not download CIFAR-10 from {cifar_mod.CIFAR10_URL}: network disabled in tests")
    assert str((tmp_path / "cifar10").resolve()) in msg
    assert "local source" in msg
    assert offline == [cifar_mod.CIFAR10_URL]
    assert not (tmp_path / "cifar10").exists()


def test_fetch_cifar10_from_dir(tmp_path: pathlib.Path, cifar_root: pathlib.Path) -> None:
    with pytest.raises(DataError, match="MD5"):  # synthetic files are not the official ones
        fetch_cifar10(tmp_path / "dest", source=cifar_root / "cifar10", progress=False)
    assert not (tmp_path / "dest" / "cifar10").exists() or not any((tmp_path / "dest" / "cifar10").iterdir())
    folder = fetch_cifar10(tmp_path / "dest", source=cifar_root / "cifar10", progress=False, verify=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(cifar_mod.FILES)
    a, _ = load_cifar10("train", tmp_path / "dest", verify=False)
    b, _ = load_cifar10("train", cifar_root, verify=False)
    assert torch.equal(a, b)


def _make_tar(path: pathlib.Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_fetch_cifar10_from_tarball_ignores_other_members(tmp_path: pathlib.Path, cifar_root: pathlib.Path) -> None:
    members = {f"cifar-10-batches-py/{n}": (cifar_root / "cifar10" / n).read_bytes() for n in cifar_mod.FILES}
    members["../escape.txt"] = b"x"
    members["cifar-10-batches-py/../../escape2.txt"] = b"x"
    archive = tmp_path / "cifar-10-python.tar.gz"
    _make_tar(archive, members)
    folder = fetch_cifar10(tmp_path / "dest", source=archive, progress=False, verify=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(cifar_mod.FILES)
    assert not list(tmp_path.rglob("escape*"))
    _, y = load_cifar10("test", tmp_path / "dest", verify=False)
    assert y.tolist() == _batch(20, seed=99)[1]


def test_fetch_cifar10_tarball_with_bad_member(tmp_path: pathlib.Path, cifar_root: pathlib.Path) -> None:
    members = {f"cifar-10-batches-py/{n}": (cifar_root / "cifar10" / n).read_bytes() for n in cifar_mod.FILES}
    members["cifar-10-batches-py/data_batch_2"] = b"\x80\x02garbage"
    archive = tmp_path / "c.tar.gz"
    _make_tar(archive, members)
    with pytest.raises(DataError, match="data_batch_2"):
        fetch_cifar10(tmp_path / "dest", source=archive, progress=False, verify=False)
    assert not (tmp_path / "dest" / "cifar10").exists()
