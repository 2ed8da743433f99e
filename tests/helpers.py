"""Helpers shared by test modules."""

from __future__ import annotations

import json
import pickle
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bayescomp.data.paths import md5_hex
from bayescomp.io.packed import FLAG_GRAPH, MAGIC
from bayescomp.nn import GroupSparseLayer


def randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial batch-norm statistics and posteriors, so that folding errors would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            if isinstance(m, GroupSparseLayer):
                m.z_mu.copy_(1 + 0.3 * torch.randn(m.n_groups, generator=gen))


def random_keeps(bmodel: nn.Module, gen: torch.Generator, p: float = 0.6) -> dict[str, torch.Tensor]:
    """A keep-mask over each group-sparse layer's groups, each kept with probability p (the first always)."""
    keeps = {}
    for name, m in bmodel.named_modules():
        if isinstance(m, GroupSparseLayer):
            k = torch.rand(m.n_groups, generator=gen) < p
            k[0] = True
            keeps[name] = k
    return keeps


def write_cifar(root: Path, n_train: int = 16, n_test: int = 20, seed: int = 0) -> dict[str, str]:
    """Synthetic CIFAR-10 under root/cifar10 in the official python-pickle batches (random pixels and labels);
    returns each file's MD5 (for tests that point the checksum table at these files)."""
    folder = root / "cifar10"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else n_train
        obj = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
               b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"filenames": [f"img{i}_{j}.png".encode() for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    meta = {b"label_names": [f"class{k}".encode() for k in range(10)], b"num_cases_per_batch": n_train,
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {p.name: md5_hex(p.read_bytes()) for p in folder.iterdir()}


class Interrupted(Exception):
    """Stands for the interruption of a run after its training (a kill between two epochs would do the same)."""


def interrupted_run(opts, out: Path, monkeypatch) -> None:
    """Train `opts` into OUT.partial and stop before compressing: an unfinished run, as a killed one leaves it."""
    from bayescomp import pipeline

    def stop(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(pipeline, "evaluate_compression", stop)
        try:
            pipeline.run(opts, out, progress=False)
        except Interrupted:
            return
    raise AssertionError("the run was expected to stop before compressing")


def bcz_parts(data: bytes) -> tuple[dict, bytes]:
    """A packed file's architecture document (decompressed JSON) and its tensor records (count included)."""
    (spec_len,) = struct.unpack_from("<I", data, 20)
    return json.loads(zlib.decompress(data[24 : 24 + spec_len])), data[24 + spec_len : -4]


def bcz_assemble(doc: dict, records: bytes, flags: int = FLAG_GRAPH) -> bytes:
    """A packed file (version 1, the given flags, a valid checksum) of an architecture document and records."""
    spec = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)
    total = 20 + 4 + len(spec) + len(records) + 4
    out = struct.pack("<8sHHQ", MAGIC, 1, flags, total) + struct.pack("<I", len(spec)) + spec + records
    return out + struct.pack("<I", zlib.crc32(out))


def mutate_json(value: Any, rng: random.Random) -> Any:
    """One random edit somewhere inside a JSON value: a changed, removed or retyped entry."""
    if isinstance(value, (list, dict)) and value and rng.random() < 0.8:
        is_list = isinstance(value, list)
        key = rng.randrange(len(value)) if is_list else rng.choice(sorted(value))
        out = list(value) if is_list else dict(value)
        if rng.random() < 0.15:
            del out[key]
        else:
            out[key] = mutate_json(out[key], rng)
        return out
    return rng.choice([None, 0, -1, 2**40, 3.5, "", "x", "stem.0", "operator.add", [], {}, {"node": "x"},
                       {"tuple": [1]}, True, "torch.cat", "call_module", "ReLU", {"slice": [0, None, 1]},
                       {"ellipsis": True}, "getattr", "shape", "LayerNorm", "AttentionHeads"])
