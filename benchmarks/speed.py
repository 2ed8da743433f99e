"""Speed of training and of the result, side by side in one process, written as ratios.

    python benchmarks/speed.py                       # lenet300 and lenet5, both priors
    python benchmarks/speed.py --models lenet300 --run lenet300=/tmp/bench/lenet300_gnj

writes benchmarks/results/speed.json. Per model:

* `train_step_ratio` per prior: Bayesian step time / plain step time. One step is what `fit` does:
  forward (with `fuse_weight_kl`), cross-entropy (+ KL/N for the Bayesian net), zero_grad, backward,
  fused Adam, the variance clamps of the recipe. Same batches of 128 real MNIST examples, same threads, same
  optimizer settings; rounds interleaved (plain, gnj, ghs, plain, …) and the median of the rounds
  taken, so load that comes and goes hits all of them alike. Both wall-clock time and the thread's
  CPU time are recorded; the ratio is given for both.
  `"<prior>, z per batch"`: the same step with the group scales z drawn once per batch (`nn.draw_z`, the fast
  recipe's `z_draw` on LeNet-300-100) instead of once per example (the paper's, the rows named by the prior alone).
* `floor`: the same ratio counted in multiply-adds of the matrix products and convolutions
  (`step_macs`): the plain layer does its forward product, its weight gradient and, unless it is the
  first layer, its input gradient; the Bayesian layer does each of these twice (means and
  variances), and a layer whose gates sit on its inputs (Linear) needs its input gradient even when
  it is the first layer (for the gates' gradient), unless one z gates the whole batch
  (`floor_z_per_batch`: the gates' gradient then comes from the weight-gradient products, `nn.lrt`).
* `inference_speedup` per batch size: original plain model latency / compressed model latency
  (evaluation mode, inference_mode, median of interleaved rounds); `throughput` in examples/s;
  `flop_ratio`: original multiply-adds / compressed multiply-adds per example. The compressed model
  is the one bayescomp emits, whose 2×2 max-pooling is `FastMaxPool2d`; the original is the model
  as the user has it, with `nn.MaxPool2d`. For a model with max-pooling,
  `inference_speedup_same_pooling` isolates what pruning contributes: the original with its
  `nn.MaxPool2d` swapped to `FastMaxPool2d` as well (`original_same_pooling` in `latency_ms`,
  timed in the same interleaved rounds).

The compressed model of a model comes from a trained run (`--run model=DIR`, its model.pt) when
one is given; otherwise from a fresh Bayesian network whose groups are pruned down to the paper's
reported architecture (`PAPER_ARCH`; latency depends on the shapes only, not on the values) — the
results file says which. The file ends with `selection` "none" (a timing chooses nothing) and its note.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from selection import TIMING, stamp  # beside this script
from torch import nn

import bayescomp
from bayescomp.compress import apply_masks, compress, group_masks
from bayescomp.compress.runtime import with_pooling
from bayescomp.convert import group_layers
from bayescomp.data import load_mnist
from bayescomp.io.plain import load_plain
from bayescomp.models import build_model
from bayescomp.nn import LinearGroupHS, LinearGroupNJ, draw_z, fuse_weight_kl
from bayescomp.recipes import recipe
from bayescomp.train.memory import keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
#: groups kept per layer in the paper's Table 1 (BC-GNJ rows; method notes, "recalled")
PAPER_ARCH = {"lenet300": {"fc1": 278, "fc2": 98, "fc3": 13}, "lenet5": {"conv1": 8, "conv2": 13, "fc1": 88, "fc2": 13}}
#: the name suffix of a prior's step timed with z drawn once per batch (`nn.draw_z`)
Z_BATCH = "z per batch"


def _input_shape(model: str) -> tuple[int, ...]:
    return (784,) if model == "lenet300" else (1, 28, 28)


def layer_macs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, int, bool]]:
    """(name, multiply-adds per example, gates-on-inputs) of every Linear/Conv2d-like layer, in call order."""
    out: list[tuple[str, int, bool]] = []
    hooks = []
    for name, m in model.named_modules():
        kind = None
        if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "weight_mu")):
            kind = "linear"
        elif isinstance(m, nn.Conv2d) or (hasattr(m, "in_channels") and hasattr(m, "weight_mu")):
            kind = "conv"
        if kind is None:
            continue

        def hook(mod, inp, res, name=name, kind=kind):
            per = res.numel() // res.shape[0]
            if kind == "linear":
                macs = per * (inp[0].shape[-1])
            else:
                w = mod.weight if hasattr(mod, "weight") and isinstance(mod.weight, torch.Tensor) else mod.weight_mu
                macs = per * w.shape[1] * w.shape[2] * w.shape[3]
            out.append((name, macs, isinstance(mod, (nn.Linear, LinearGroupNJ, LinearGroupHS))))
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return out


def step_macs(bayes: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Multiply-adds of one training step, plain and Bayesian (see the module docstring); `floor_z_per_batch`: the
    same with one z per batch, where a first layer gated on its inputs needs no input-gradient products either
    (`nn.lrt._shared_gate_backward` takes z's gradient from the weight-sized products)."""
    plain = bayes_total = shared = 0
    for i, (_, m, gates_on_inputs) in enumerate(layer_macs(bayes, x)):
        first = i == 0
        plain += m * (2 if first else 3)
        bayes_total += m * (4 if (first and not gates_on_inputs) else 6)
        shared += m * (4 if first else 6)
    return {"plain_macs": plain, "bayesian_macs": bayes_total, "floor": bayes_total / plain,
            "bayesian_macs_z_per_batch": shared, "floor_z_per_batch": shared / plain}


def _median_rounds(fns: dict, rounds: int, reps: int) -> dict[str, dict[str, float]]:
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(reps):
                fn()
            wall[k].append((time.perf_counter() - w0) / reps)
            cpu[k].append((time.thread_time() - c0) / reps)
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in fns}


def _fit_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list, per: str = "example"):
    """One training step as `fit` does it, on the next of `batches` (index tensors into x, y) at each call."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    layers = list(group_layers(model).values())
    it = iter(range(10**9))

    def step():
        idx = batches[next(it) % len(batches)]
        with fuse_weight_kl(model), draw_z(model, per):  # as fit does
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if layers:
                loss = loss + bayescomp.kl_divergence(model) / len(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for layer in layers:
            layer.clamp_variances()
    return step


def train_steps(model_name: str, priors: list[str], data_dir: str | None, rounds: int, reps: int,
                batch_size: int = 128) -> dict:
    """Step times (ms) of the plain model and each prior's Bayesian twin, and their ratios (module docstring)."""
    x, y = load_mnist("train", data_dir)
    x = x.view(-1, *_input_shape(model_name))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(x), (batch_size,), generator=gen) for _ in range(reps)]
    torch.manual_seed(0)
    models = {"plain": build_model(model_name).train()}
    for prior in priors:
        max_var = recipe(model_name).clamps(prior) or None
        models[prior] = bayescomp.bayesianize(build_model(model_name), prior, keep_weights=False, max_var=max_var).train()
    for prior in priors:
        models[f"{prior}, {Z_BATCH}"] = copy.deepcopy(models[prior])

    times = _median_rounds({k: _fit_step(m, x, y, batches, "batch" if k.endswith(Z_BATCH) else "example")
                            for k, m in models.items()}, rounds, reps)
    out = {"plain_step_ms": {k: v * 1e3 for k, v in times["plain"].items()}, "step_ms": {}, "train_step_ratio": {},
           "train_step_ratio_cpu": {}}
    for prior in [k for k in models if k != "plain"]:
        out["step_ms"][prior] = {k: v * 1e3 for k, v in times[prior].items()}
        out["train_step_ratio"][prior] = times[prior]["wall"] / times["plain"]["wall"]
        out["train_step_ratio_cpu"][prior] = times[prior]["cpu"] / times["plain"]["cpu"]
    out.update(step_macs(models[priors[0]], x[:1]))
    return out


def step_breakdown(model_name: str, prior: str, rounds: int, reps: int) -> dict:
    """Where the Bayesian step's time goes: the step with one part removed at a time (thread CPU ms).

    `no_kl`: the KL term left out of the loss; `no_rng`: every normal draw replaced by a cached
    tensor of the same shape (what the random numbers cost); `no_optimizer`: no Adam step. All
    variants run interleaved in the same rounds, so the differences to `bayesian` are the parts' costs
    in the context of a whole step (cache effects included). `aten_ops_per_step` counts the
    dispatched tensor operations of one step (deterministic, unlike times): on small layers the cost
    of a step follows this count more than its arithmetic.
    """
    from torch.profiler import profile

    torch.manual_seed(0)
    x = torch.randn(128, *_input_shape(model_name))
    y = torch.randint(0, 10, (128,))
    plain = build_model(model_name).train()
    bayes = bayescomp.bayesianize(build_model(model_name), prior, keep_weights=False).train()
    cache: dict = {}
    randn, randn_like = torch.randn, torch.randn_like

    # (draw only on a miss: `cache.setdefault(key, randn(...))` would draw every time and time the draws anyway)
    def cached(*shape, **kw):
        key = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if key not in cache:
            cache[key] = randn(*shape, **kw)
        return cache[key]

    def cached_like(t, **kw):
        key = tuple(t.shape)
        if key not in cache:
            cache[key] = randn_like(t)
        return cache[key]

    def make(model, kl=True, opt_on=True, rng=True):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

        def step():
            if not rng:
                torch.randn, torch.randn_like = cached, cached_like
            try:
                with fuse_weight_kl(model):
                    loss = F.cross_entropy(model(x), y)
                    if kl:
                        loss = loss + bayescomp.kl_divergence(model) / 60000
            finally:
                torch.randn, torch.randn_like = randn, randn_like
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if opt_on:
                opt.step()
        return step

    fns = {"plain": make(plain, kl=False), "bayesian": make(bayes), "no_kl": make(bayes, kl=False),
           "no_rng": make(bayes, rng=False), "no_optimizer": make(bayes, opt_on=False)}
    times = {k: v["cpu"] * 1e3 for k, v in _median_rounds(fns, rounds, reps).items()}
    cost = {part: times["bayesian"] - times[k] for part, k in
            (("kl", "no_kl"), ("random_numbers", "no_rng"), ("optimizer_step", "no_optimizer"))}
    ops = {}
    for k in ("plain", "bayesian"):
        with profile() as prof:
            fns[k]()
        ops[k] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return {"step_cpu_ms": times, "part_cost_ms": cost,
            "part_cost_in_plain_steps": {k: v / times["plain"] for k, v in cost.items()},
            "aten_ops_per_step": ops}


def _paper_pruned(model_name: str, prior: str = "gnj") -> nn.Module:
    """A fresh Bayesian network whose scores prune it to the paper's architecture at the default thresholds."""
    torch.manual_seed(0)
    bmodel = bayescomp.bayesianize(build_model(model_name), prior, keep_weights=False)
    layers = group_layers(bmodel)
    keep = PAPER_ARCH[model_name]
    names = list(layers)
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers.items()):
            prune = torch.ones(layer.n_groups, dtype=torch.bool)
            prev = layers[names[i - 1]] if i else None
            if prev is not None and prev.group_dim == 0 and layer.group_dim == 1:
                # a Linear after a conv: its groups are the flattened conv outputs, channel by channel.
                # Spread the k kept inputs over all the channels kept upstream, or those channels would
                # feed nothing and be removed too.
                channels, per = keep[names[i - 1]], layer.n_groups // prev.n_groups
                k = keep[name]
                for c in range(channels):
                    take = k // channels + (1 if c < k % channels else 0)
                    prune[c * per : c * per + take] = False
            else:
                prune[: keep[name]] = False
            if prior == "gnj":
                layer.z_logvar[prune] = 10.0  # log α ≈ 10: pruned at the default threshold −3
            else:
                layer.a_mu[prune], layer.b_mu[prune] = -30.0, -30.0  # the local scale near 0: log α high
    return bmodel


def _paper_compressed(model_name: str) -> nn.Module:
    """A fresh GNJ network pruned to the paper's architecture, compressed (float32 weights)."""
    return compress(_paper_pruned(model_name), round_weights=False).model


def finetune_steps(model_name: str, priors: list[str], data_dir: str | None, rounds: int, reps: int,
                   batch_size: int = 128) -> dict:
    """The fine-tuning step after a cut (`pipeline.finetune`: the pruned groups switched off by `group_mask`)
    against the same network's step with every group on, z per example (ms, and their ratio).

    A masked Linear layer multiplies its kept inputs only (`nn.kinds.LinearKind._stochastic`); a masked
    convolution still computes every output channel. The network is pruned to the paper's architecture
    (`_paper_pruned`): the step's time depends on the shapes only, not on the values.
    """
    x, y = load_mnist("train", data_dir)
    x = x.view(-1, *_input_shape(model_name))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(x), (batch_size,), generator=gen) for _ in range(reps)]
    fns = {}
    for prior in priors:
        bmodel = _paper_pruned(model_name, prior).train()
        masked = copy.deepcopy(bmodel)
        apply_masks(masked, group_masks(masked))
        fns[f"{prior}, every group"] = _fit_step(bmodel, x, y, batches)
        fns[f"{prior}, masked"] = _fit_step(masked, x, y, batches)
    times = _median_rounds(fns, rounds, reps)
    return {"architecture": PAPER_ARCH[model_name], "step_ms": {k: v["wall"] * 1e3 for k, v in times.items()},
            "masked_over_every_group": {p: times[f"{p}, masked"]["wall"] / times[f"{p}, every group"]["wall"]
                                        for p in priors}}




def inference(model_name: str, run_dir: str | None, rounds: int) -> dict:
    torch.manual_seed(0)
    original = build_model(model_name).eval()
    if run_dir is not None:
        compressed, _ = load_plain(Path(run_dir) / "model.pt")
        source = f"trained run {run_dir} (its model.pt)"
    else:
        compressed = _paper_compressed(model_name)
        source = f"fresh network pruned to the paper's architecture {PAPER_ARCH[model_name]}"
    compressed.eval()
    x1 = torch.randn(1, *_input_shape(model_name))
    orig_macs = sum(m for _, m, _ in layer_macs(original, x1))
    comp_macs = sum(m for _, m, _ in layer_macs(compressed, x1))
    res: dict = {"compressed_from": source, "original_macs": orig_macs, "compressed_macs": comp_macs,
                 "flop_ratio": orig_macs / comp_macs, "inference_speedup": {}, "latency_ms": {}, "throughput": {}}
    # the original with the compressed model's pooling kernel: what pruning alone contributes
    pooled = any(type(m) is nn.MaxPool2d for m in original.modules())
    same_pooling = with_pooling(original, fast=True) if pooled else None
    models = {"original": original, "compressed": compressed}
    if same_pooling is not None:
        models["original_same_pooling"] = same_pooling
        res["inference_speedup_same_pooling"] = {}
    conv = len(_input_shape(model_name)) == 3
    if conv:  # the same models in channels-last memory layout (CPU max_pool2d is ~4x faster in it)
        res["channels_last"] = {"inference_speedup": {}, "latency_ms": {}}
        if same_pooling is not None:
            res["channels_last"]["inference_speedup_same_pooling"] = {}

    def speedups(entry: dict, t: dict, batch: int) -> None:
        entry["latency_ms"][str(batch)] = {k: v["wall"] * 1e3 for k, v in t.items()}
        entry["inference_speedup"][str(batch)] = t["original"]["wall"] / t["compressed"]["wall"]
        if same_pooling is not None:
            same = t["original_same_pooling"]["wall"]
            entry["inference_speedup_same_pooling"][str(batch)] = same / t["compressed"]["wall"]

    for batch in (1, 256):
        xb = torch.randn(batch, *_input_shape(model_name))
        reps = 400 if batch == 1 else 20

        def runner(m, xb=xb):
            def f():
                with torch.inference_mode():
                    m(xb)
            return f
        t = _median_rounds({k: runner(m) for k, m in models.items()}, rounds, reps)
        speedups(res, t, batch)
        res["throughput"][str(batch)] = {k: batch / v["wall"] for k, v in t.items()}
        if conv:
            cl = torch.channels_last
            xc = xb.contiguous(memory_format=cl)
            t = _median_rounds({k: runner(m.to(memory_format=cl), xc) for k, m in models.items()}, rounds, reps)
            for m in models.values():
                m.to(memory_format=torch.contiguous_format)
            speedups(res["channels_last"], t, batch)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet300,lenet5")
    p.add_argument("--priors", default="gnj,ghs")
    p.add_argument("--run", action="append", default=[], help="model=RUN_DIR: take the compressed model of a trained run")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=0, help="steps per round (default: 30 for lenet300, 6 for lenet5)")
    p.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = p.parse_args()
    bad = [r for r in args.run if "=" not in r]
    if bad:
        p.error(f"--run takes model=RUN_DIR, got {bad[0]!r}")
    runs = dict(r.split("=", 1) for r in args.run)
    for name, run_dir in runs.items():  # before minutes of timing, not after
        if not (Path(run_dir) / "model.pt").is_file():
            p.error(f"--run {name}={run_dir}: no model.pt there (a finished bayescomp run folder is needed)")
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory(default=True)  # what the CLI does; it applies to the plain steps as well
    result: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version(), "keep_freed_memory": kept,
                    "load_average_at_start": os.getloadavg()},
    }
    priors = args.priors.split(",")
    for name in args.models.split(","):
        reps = args.reps or (30 if name == "lenet300" else 6)
        print(f"{name}: training steps ({', '.join(['plain', *priors])}) ...", flush=True)
        entry = train_steps(name, priors, args.data_dir, args.rounds, reps)
        print(f"  ratio {entry['train_step_ratio']} (cpu {entry['train_step_ratio_cpu']}), floor {entry['floor']:.2f}", flush=True)
        entry["finetune_step"] = finetune_steps(name, priors, args.data_dir, args.rounds, reps)
        print(f"  fine-tuning step, masked / every group: {entry['finetune_step']['masked_over_every_group']}", flush=True)
        entry["breakdown"] = {prior: step_breakdown(name, prior, args.rounds, reps) for prior in priors}
        print(f"  breakdown {json.dumps({k: v['part_cost_in_plain_steps'] for k, v in entry['breakdown'].items()})}",
              flush=True)
        print(f"{name}: inference ...", flush=True)
        entry.update(inference(name, runs.get(name), args.rounds))
        same = entry.get("inference_speedup_same_pooling")
        print(f"  speedup {entry['inference_speedup']}" + (f" (same pooling: {same})" if same else "")
              + f", flop ratio {entry['flop_ratio']:.1f}", flush=True)
        result[name] = entry
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp(result, *TIMING), indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
