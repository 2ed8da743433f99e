"""Data-parallel training: two real CPU processes (gloo), launched as torchrun would, against one process.

How the comparison is made exact. Each process draws its own local-reparameterisation noise, so no
data-parallel run can reproduce a single process's noise draw for draw; a loose comparison of noisy runs would
prove nothing. Two exact checks instead:

1. Equivalence with a single process: the same tiny Bayesian MLP with its group-sparse layers held in
   evaluation mode (the posterior-mean forward, no noise). Everything else is the real thing: KL of every
   parameter, β warm-up, Adam, variance clamps, a short last batch (193 = 6·32 + 1 examples, so one rank
   gets an empty share), the seeded permutation. Two ranks must end where one process does with the same
   global batch, up to float rounding (≤ 1e-5). A control run that counts the KL twice (the classic
   data-parallel mistake) lands far outside that tolerance, so the check can tell.
2. The noisy run: the two ranks must match, to float rounding, an independent single-process reference
   that computes each rank's share with that rank's own noise stream and averages the gradients; so noise,
   shares and averaging are what we say they are. And a resumed two-process run equals an uninterrupted
   one bit for bit (every rank's RNG state is in the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bayescomp.convert import group_layers, kl_divergence
from bayescomp.train import TrainConfig, distributed, fit, kl_beta, load_checkpoint
from bayescomp.train import loop as loop_module

WORLD = 2

_WORKER = r'''
import json
import sys

import torch
from torch import nn

import bayescomp
from bayescomp.nn import GroupSparseLayer
from bayescomp.train import TrainConfig, distributed, fit

N, N_TEST = 193, 64  # 193 = 6 full global batches of 32 and one of a single example
CFG = {"batch_size": 32, "lr": 3e-3, "warmup_epochs": 1.0, "seed": 11}


class Deterministic(nn.Module):
    """The Bayesian MLP with its group-sparse layers kept in evaluation mode (posterior-mean forward, no noise)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, GroupSparseLayer):
                m.training = False
        return self


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + N_TEST, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 10, generator=g)).argmax(1)  # a learnable rule
    return (x[:N], y[:N]), (x[N:], y[N:])


def model(deterministic, seed=1):
    torch.manual_seed(seed)
    m = bayescomp.bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                              max_var=0.05)
    return Deterministic(m) if deterministic else m


def main(out):
    torch.set_num_threads(1)
    world = distributed.init_from_env()
    rank = distributed.rank()
    assert world == distributed.world_size() == 2 and distributed.is_main() == (rank == 0)
    train, test = data()
    res = {}
    # 1. no noise; per-rank file names, so a file written by rank 1 would show
    m = model(True)
    res["det"] = fit(m, train, TrainConfig(epochs=2, **CFG), test=test, checkpoint=f"{out}/det_ck_rank{rank}.pt",
                     metrics=f"{out}/det_metrics_rank{rank}.jsonl", progress=True).history
    torch.save(m.state_dict(), f"{out}/det_state_rank{rank}.pt")
    # 2. noisy, uninterrupted; one checkpoint path for all ranks, as in a real run
    m = model(False)
    res["full"] = fit(m, train, TrainConfig(epochs=2, **CFG), test=test, checkpoint=f"{out}/full.pt",
                      progress=False).history
    torch.save(m.state_dict(), f"{out}/full_state_rank{rank}.pt")
    # 3. noisy, one epoch, then resumed into another model to two epochs
    fit(model(False), train, TrainConfig(epochs=1, **CFG), test=test, checkpoint=f"{out}/part.pt", progress=False)
    m = model(False, seed=99)
    res["resumed"] = fit(m, train, TrainConfig(epochs=2, **CFG), test=test, checkpoint=f"{out}/part.pt",
                         resume=True, progress=False).history
    torch.save(m.state_dict(), f"{out}/resumed_state_rank{rank}.pt")
    # 4. a global batch the ranks cannot share evenly
    try:
        fit(model(False), train, TrainConfig(epochs=1, **{**CFG, "batch_size": 33}), progress=False)
    except ValueError as exc:
        res["indivisible"] = str(exc)
    distributed.barrier()
    with open(f"{out}/result_rank{rank}.json", "w") as f:
        json.dump(res, f)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """The in-process runs are single-process runs, whatever launched pytest."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the worker on two processes (env as torchrun sets it); return (folder, worker namespace, logs)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    procs, logs = [], []
    t0 = time.perf_counter()
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "GROUP_RANK")}
        env.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        stdout, stderr = open(out / f"stdout{rank}", "w"), open(out / f"stderr{rank}", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=stdout, stderr=stderr))
        logs.append((stdout, stderr))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for a, b in logs:
            a.close()
            b.close()
    text = {r: ((out / f"stdout{r}").read_text(), (out / f"stderr{r}").read_text()) for r in range(WORLD)}
    assert codes == [0] * WORLD, f"workers failed: {codes}\n" + "\n".join(f"--- rank {r}\n{o}\n{e}" for r, (o, e) in text.items())
    print(f"two-process worker: {time.perf_counter() - t0:.1f} s")
    ns = runpy.run_path(str(script), run_name="ddp_worker")
    results = [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ns, text, results


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ---------------------------------------------------------------------------------------------------------------
# equivalence


def test_two_processes_match_one_process_with_the_same_global_batch(launched, monkeypatch):
    out, ns, _, results = launched
    ranks = [_state(out / f"det_state_rank{r}.pt") for r in range(WORLD)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # averaged gradients: the ranks never drift apart
    train, test = ns["data"]()
    cfg = TrainConfig(epochs=2, **ns["CFG"])
    single = ns["model"](True)
    hist = fit(single, train, cfg, test=test, progress=False).history
    diff = _max_diff(single.state_dict(), ranks[0])
    assert diff < 1e-5, diff
    # the parameters moved far more than that: the agreement is not that of two untrained models
    assert _max_diff(ns["model"](True).state_dict(), ranks[0]) > 1e-2
    # all-reduced metrics equal the single-process ones
    for row_d, row_s in zip(results[0]["det"], hist, strict=True):
        for key in ("loss", "nll", "kl", "beta"):
            assert row_d[key] == pytest.approx(row_s[key], rel=1e-5), key
        for key in ("epoch", "train_error", "test_error", "groups_kept"):
            assert row_d[key] == row_s[key], key
    assert _strip(results[0]["det"]) == _strip(results[1]["det"])

    # control: a KL gradient counted twice (each rank adding β·KL/N, summed instead of averaged) is caught
    monkeypatch.setattr(loop_module, "kl_divergence", lambda m: 2.0 * kl_divergence(m))
    doubled = ns["model"](True)
    fit(doubled, train, cfg, progress=False)
    assert _max_diff(doubled.state_dict(), ranks[0]) > 100 * max(diff, 1e-6)


def _reference_data_parallel(ns, world: int, epochs: int, shared_stream: bool = False) -> torch.nn.Module:
    """One process computing what `world` data-parallel ranks should: contiguous shares of each global batch,
    each with that rank's own noise stream, gradients averaged, one Adam step."""
    (x, y), _ = ns["data"]()
    cfg = TrainConfig(epochs=epochs, **ns["CFG"])
    model = ns["model"](False)
    layers = group_layers(model)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    streams = []
    for r in range(world):
        torch.manual_seed(distributed.stream_seed(cfg.seed, 0 if shared_stream else r))
        streams.append(torch.get_rng_state())
    n, b = len(x), cfg.batch_size
    steps = math.ceil(n / b)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = order[i * b : (i + 1) * b]
            sizes = [len(idx) // world + (1 if r < len(idx) % world else 0) for r in range(world)]
            grads = [torch.zeros_like(p) for p in params]
            start = 0
            for r in range(world):
                share = idx[start : start + sizes[r]]
                start += sizes[r]
                torch.set_rng_state(streams[r])
                out = model(x[share])
                streams[r] = torch.get_rng_state()
                beta = kl_beta(epoch * steps + i, steps, cfg.warmup_epochs)
                # rank r's mean-loss contribution: its share of Σ cross-entropy / B, plus the whole β·KL/N
                loss = F.cross_entropy(out, y[share], reduction="sum") * world / len(idx) + beta * kl_divergence(model) / n
                for acc, g in zip(grads, torch.autograd.grad(loss, params), strict=True):
                    acc += g / world
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            for layer in layers.values():
                layer.clamp_variances()
    return model


def test_noisy_run_matches_reference_with_per_rank_noise(launched):
    out, ns, _, results = launched
    ranks = [_state(out / f"full_state_rank{r}.pt") for r in range(WORLD)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    ref = _reference_data_parallel(ns, WORLD, epochs=2)
    diff = _max_diff(ref.state_dict(), ranks[0])
    assert diff < 1e-5, diff
    # control: had both ranks shared one noise stream (the mistake the per-rank seeds avoid), the reference
    # would be far from the run, so the agreement above pins the noise down too
    shared = _reference_data_parallel(ns, WORLD, epochs=2, shared_stream=True)
    assert _max_diff(shared.state_dict(), ranks[0]) > 100 * max(diff, 1e-6)
    assert _strip(results[0]["full"]) == _strip(results[1]["full"])


def test_two_process_resume_is_bit_identical(launched):
    out, _, _, results = launched
    for r in range(WORLD):
        full = _state(out / f"full_state_rank{r}.pt")
        resumed = _state(out / f"resumed_state_rank{r}.pt")
        for k in full:
            assert torch.equal(full[k], resumed[k]), (r, k)
        assert _strip(results[r]["resumed"]) == _strip(results[r]["full"])
    state = load_checkpoint(out / "part.pt")
    assert state["world_size"] == WORLD and state["epoch"] == 2
    assert state["torch_rng_ranks"].shape[0] == WORLD
    assert not torch.equal(state["torch_rng_ranks"][0], state["torch_rng_ranks"][1])  # independent noise streams


# ---------------------------------------------------------------------------------------------------------------
# who writes what


def test_only_rank0_writes_and_prints(launched):
    out, _, text, _ = launched
    names = {p.name for p in out.iterdir()}
    assert {"det_ck_rank0.pt", "det_ck_rank0.pt.prev", "det_metrics_rank0.jsonl", "full.pt", "part.pt"} <= names
    assert not {n for n in names if "rank1" in n} - {"det_state_rank1.pt", "full_state_rank1.pt",
                                                       "resumed_state_rank1.pt", "result_rank1.json"}
    assert not [n for n in names if n.endswith(".tmp")]
    lines = (out / "det_metrics_rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert "epoch 2/2" in text[0][0]  # rank 0 reports progress
    assert "epoch" not in text[1][0] + text[1][1]  # rank 1 prints nothing


def test_indivisible_global_batch_is_refused(launched):
    _, _, _, results = launched
    for r in range(WORLD):
        msg = results[r]["indivisible"]
        assert "33" in msg and "divisible" in msg and "2" in msg


# ---------------------------------------------------------------------------------------------------------------
# helpers on one process


def test_helpers_without_a_process_group():
    assert not distributed.is_initialized()
    assert distributed.init_from_env() == 1
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    distributed.cleanup()
    assert distributed.all_reduce([1.5, 2]) == [1.5, 2.0]
    assert distributed.all_gather_object("x") == ["x"]


def test_init_from_env_needs_the_launcher_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.init_from_env()
    assert not distributed.is_initialized()


def test_stream_seeds_and_shards():
    assert distributed.stream_seed(5, 0) == 5  # a single process keeps its seed
    seeds = {distributed.stream_seed(5, r, e) for r in range(4) for e in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.stream_seed(5, 1) == distributed.stream_seed(5, 1)
    for total in (0, 1, 5, 32, 33):
        for world in (1, 2, 3, 4):
            shares = [loop_module.shard(total, world, r) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
            sizes = [hi - lo for lo, hi in shares]
            assert max(sizes) - min(sizes) <= 1
