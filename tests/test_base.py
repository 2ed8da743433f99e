"""The base floor: one atomic writer, one safe loader, the root error every package's errors derive from."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from bayescomp.base import BayescompError, atomic_write, safe_load
from bayescomp.data import DataError
from bayescomp.io.codec import CodecError
from bayescomp.io.export import ExportError
from bayescomp.io.packed import PackedFileError
from bayescomp.train import CheckpointError


def test_atomic_write_takes_bytes_or_a_writer(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    atomic_write(path, lambda f: torch.save({"x": torch.arange(3)}, f))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"old contents")

    def writer(f):
        f.write(b"new, half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, writer)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temp file left behind

    def interrupted(f):
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_gives_the_umask_permissions_not_mkstemps(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safe_load_refuses_pickled_code_in_one_line_and_runs_nothing(tmp_path):
    target = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload(str(target))}, path)
    with pytest.raises(CheckpointError) as info:
        safe_load(path, "checkpoint", CheckpointError)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "never unpickles" in message
    assert "weights_only=False" not in message
    assert not target.exists()


def test_safe_load_names_a_missing_or_truncated_file(tmp_path):
    with pytest.raises(BayescompError, match=r"model file not found: .*absent\.pt"):
        safe_load(tmp_path / "absent.pt", "model file")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(safe_load(good, "file")["w"], torch.ones(2))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(BayescompError, match=r"cannot read file .*cut\.pt: "):
        safe_load(cut, "file")


@pytest.mark.parametrize(("error", "builtin"), [(CheckpointError, RuntimeError), (DataError, ValueError),
                                                (PackedFileError, ValueError), (CodecError, ValueError),
                                                (ExportError, RuntimeError)])
def test_package_errors_derive_from_the_root_and_keep_their_builtin(error, builtin):
    assert issubclass(error, BayescompError) and issubclass(error, builtin)
