"""Data-parallel helpers: one process per device, launched by torchrun (or any launcher that sets the env).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process; `init_from_env()`
joins the process group they describe. Without them (or with WORLD_SIZE=1) nothing is initialised and every
helper answers as for a single process, so library code can call them unconditionally.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """Whether this process belongs to an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def _env_world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {text!r}") from None


def init_from_env(device: str | torch.device | None = None) -> int:
    """Join the process group described by the environment when WORLD_SIZE > 1; return the world size.

    The backend is nccl when `device` is a CUDA device (the process then uses cuda:LOCAL_RANK unless `device`
    names an index) and gloo otherwise (CPU training, the default). Does nothing when a group is already
    initialised (returns its size) or when WORLD_SIZE is unset or 1 (returns 1).
    """
    if is_initialized():
        return dist.get_world_size()
    size = _env_world_size()
    if size <= 1:
        return 1
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {', '.join(missing)} not set; launch with torchrun")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_world_size()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this is the process that writes files and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing when not distributed)."""
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()


def stream_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of a process's torch RNG (the layers' sampling noise): `seed` itself for rank 0 at epoch 0.

    Other ranks get independent streams, so that no two examples of a global batch share their noise.
    `epoch` > 0 reseeds a resumed run whose checkpoint holds no state for this rank.
    """
    if rank == 0 and epoch == 0:
        return seed
    digest = hashlib.sha256(f"bayescomp:{seed}:{rank}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def all_reduce(values: Sequence[float], device: torch.device | str = "cpu", op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over all processes (float64; returned as they are when not distributed)."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj`, indexed by rank (a one-element list when not distributed)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (e.g. batch-norm running statistics)."""
    if not is_initialized():
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)
