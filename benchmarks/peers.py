"""Peers side by side: Torch-Pruning and global magnitude pruning against bayescomp's fast recipe.

    python benchmarks/peers.py                                   # targets from benchmarks/results/fast.json
    python benchmarks/peers.py --models lenet300 --kept lenet300=10 --budget lenet300=300 --out /tmp/peers.json
    python benchmarks/peers.py --smoke --kept lenet300=20 --budget lenet300=4 --out /tmp/peers_smoke.json

writes benchmarks/results/peers.json (or --out). Per model and seed, one plain network is pretrained
exactly as bayescomp's `--pretrain-epochs` does it (`bayescomp.train.fit`, Adam, `--pretrain-epochs`,
`--pretrain-lr`, `--pretrain-batch-size`, the seed), or loaded with `--init-from MODEL=FILE`; every method
starts from a copy of it, and its pretraining seconds count in every method's wall seconds, as they count
in bayescomp's.

Methods (each set up as its own documentation shows; nothing is tuned on the test set; the code is in
benchmarks/peer_methods.py):

* `torch_pruning`: Torch-Pruning (PyPI `torch-pruning` 1.6.1), its README's high-level pruner usage:
  `tp.importance.GroupMagnitudeImportance(p=2)`, `tp.pruner.BasePruner(model, example_inputs,
  importance=..., pruning_ratio=r, iterative_steps=S, ignored_layers=[final classifier])` (README: "DO NOT
  prune the final classifier!"), local ranking (`global_pruning=False`, the default), no `round_to` (the
  README recommends rounding for GPU kernels; these are 2-core CPU models and rounding would miss the
  target). Iterative pruning with fine-tuning between the steps (README, "Interactive Pruning":
  `for i in range(iterative_steps): ... # finetune your model here`); S = `--prune-steps` (default 5, the
  example in BasePruner's own comment: "if iterative_steps=5, pruning_ratio=0.5, the pruning ratio of each
  step will be [0.1, 0.2, 0.3, 0.4, 0.5]"). Torch-Pruning removes whole channels and neurons (a smaller
  dense model) and never the input pixels. Its `pruning_ratio` is a channel ratio, so r is found by
  bisection: the ratio whose S-step schedule, run on a copy of the pretrained network without training,
  leaves the weight count nearest the target (a rule on weight counts; no data is read): a scan of ratios
  0, 0.05, ..., 0.95, 0.99, then bisection inside the first interval where the count crosses the target. With local
  ranking the widths depend on r only, so the fine-tuned model has exactly those widths.
* `torch_pruning_global`: the same with `global_pruning=True` (README, "Global Pruning": it "has the
  potential to find better structures" but may prune some layers too much). Its widths depend on the
  weights, which fine-tuning changes between the steps, so the ratio found on the pretrained copy would
  drift from the target: steps 1..S-1 follow the BasePruner's schedule at that ratio, and the last step is
  a one-step BasePruner (same settings) whose ratio is found by the same bisection on a copy of the
  model as fine-tuning has left it (skipped if that model is already at or below the target).
* `magnitude`: global magnitude pruning with `torch.nn.utils.prune` as the PyTorch pruning tutorial
  shows it: `prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=n)` over the
  weights of every Linear/Conv2d layer (biases are neither pruned nor counted, as in bayescomp's rates),
  applied again at each of the S steps (the tutorial's "iterative pruning": a second call prunes among
  the weights still left), with fine-tuning between, then `prune.remove`. Shapes stay as they were;
  pruned weights are zeros.

Both use the same schedule: step k of S prunes to the fraction k/S of the final channel ratio (Torch-
Pruning's default `linear_scheduler`) or of the final share of weights removed (magnitude), and the
fine-tuning budget is spread evenly over the S steps, each followed by its share. Fine-tuning: Adam at
its default learning rate 1e-3 (`--finetune-lr`; torch.optim.Adam's default, neither peer documents an
Adam rate), batch 128, cross-entropy, a fresh Adam after each pruning step (Torch-Pruning's step
replaces the parameters), the masks held by `torch.nn.utils.prune`'s reparametrisation.

Two settings per method:

* `equal_kept`: prune to bayescomp's weights kept (`--kept MODEL=PCT`) and fine-tune `--finetune-epochs`
  epochs in all (default 5, the same fine-tuning budget as bayescomp's recipe).
* `equal_time`: the same pruning target, but the whole run (pretraining + ratio search + pruning +
  fine-tuning) stops at bayescomp's wall seconds (`--budget MODEL=SECONDS`): the time left after
  pretraining is split into S equal slices, each a pruning step and then fine-tuning until the slice
  ends (checked before every batch). `finetune_epochs` records the epochs this came to.

By default the targets are the mean over seeds of the GNJ row of each model in
benchmarks/results/fast.json (bayescomp's fast recipe), whose figures are written beside each row
(`bayescomp`); without that file `--kept` and `--budget` are required. The test set is read once per row,
after its wall clock has stopped. `file_bytes`: Torch-Pruning's model is the size of its `state_dict`
written by `torch.save`; the magnitude-pruned model is the size of `torch.save` of a sparse encoding:
each weight as CSR (row pointers int32, column indices int16 where they fit, else int32, values float32;
a convolution's weight as its (out, in·k·k) matrix) and each bias as float32. Architecture: kept inputs
of each fully connected layer and kept output channels of each convolution (bayescomp's notation); for
`magnitude`, whose shapes do not change, the inputs / channels with at least one nonzero weight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from peer_methods import (  # beside this script
    EXAMPLE,
    architecture,
    run_method,
    sparse_bytes,
    state_dict_bytes,
    tp_ratio_for,
    weights_dense,
    weights_nonzero,
)
from torch import nn

from bayescomp.data import load_mnist
from bayescomp.models import build_model
from bayescomp.recipes import training_recipe
from bayescomp.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results"
FAST = RESULTS / "fast.json"
FAST_RECIPE = training_recipe("fast")  # the pretraining every method starts from
MODELS = ("lenet300", "lenet5")
METHODS = ("torch_pruning", "torch_pruning_global", "magnitude")
SETTINGS = ("equal_kept", "equal_time")
#: --smoke: training / test examples, and the epochs of pretraining and fine-tuning
SMOKE = {"train": 400, "test": 1000, "pretrain_epochs": 1, "finetune_epochs": 1}


class OptionError(ValueError):
    """A bad command-line option: printed as one line, exit status 2."""


# ---- the plain start ---------------------------------------------------------------------------------------


def pretrain(model_name: str, train, epochs: int, lr: float, batch_size: int, seed: int,
             init_from: str | None) -> tuple[nn.Module, float]:
    """The plain start every method shares, as `factories.plain_start` makes it; and its seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # as pipeline.run before it builds the model
    plain = build_model(model_name) if init_from is None else _load_start(model_name, init_from)
    if epochs > 0:
        fit(plain, train, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=0.0, seed=seed),
            progress=False)
    return plain, time.perf_counter() - t0


def _load_start(model_name: str, path: str) -> nn.Module:
    """The zoo model with the weights of a state_dict file (or of a checkpoint's `state_dict`); tensors only."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    plain = build_model(model_name)
    plain.load_state_dict(state.get("state_dict", state))
    return plain


# ---- targets --------------------------------------------------------------------------------------------------


def _pairs(values: list[str], option: str, cast) -> dict[str, float]:
    out = {}
    for v in values:
        name, sep, num = v.partition("=")
        if not sep:
            raise OptionError(f"{option} takes MODEL=VALUE, got {v!r}")
        if name not in MODELS:
            raise OptionError(f"{option} {v}: unknown model {name!r}; choose one of: {', '.join(MODELS)}")
        try:
            out[name] = cast(num)
        except ValueError:
            raise OptionError(f"{option} {v}: {num!r} is not a number") from None
    return out


def fast_figures(path: Path, model: str) -> dict | None:
    """bayescomp's fast recipe for `model` from fast.json: the mean over seeds of its GNJ row(s), or None.

    Accepts a list of rows or {"rows": [...]}; a row may hold its seeds' figures in `seeds` (a list of dicts)
    or be one seed itself (then the rows of that model and prior are its seeds). Rows cut to a size target
    (`target_kept` set) are other runs than the recipe's own; they count only when no untargeted row exists.
    """
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = data.get("rows", []) if isinstance(data, dict) else data
    rows = [r for r in rows if r.get("model") == model and r.get("prior") == "gnj"]
    rows = [r for r in rows if r.get("target_kept") is None] or rows
    runs = []
    for row in rows:
        per_seed = row.get("seeds") if isinstance(row.get("seeds"), list) else None
        runs += [dict(s) for s in per_seed] if per_seed and isinstance(per_seed[0], dict) else [row]
    if not runs:
        return None
    root, resolved = RESULTS.parents[1], path.resolve()  # named from the repository, as results files name each other
    source = resolved.relative_to(root) if resolved.is_relative_to(root) else path
    out: dict = {"source": str(source), "seeds": [r.get("seed") for r in runs]}
    for key in ("weights_kept_pct", "wall_seconds", "test_error"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if key != "test_error" and len(vals) != len(runs):
            raise OptionError(f"{path}: the {model} GNJ row lacks {key}")
        out[key] = statistics.fmean(vals) if vals else None
    for key in ("architecture", "file_bytes"):
        out[key] = [r.get(key) for r in runs]
    return out


# ---- main -----------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--kept", action="append", default=[], help="MODEL=PCT: weights kept to prune to (%% of the original)")
    p.add_argument("--budget", action="append", default=[], help="MODEL=SECONDS: the equal-time wall-clock budget")
    p.add_argument("--fast", default=str(FAST), help="bayescomp's fast-recipe results, for targets and the comparison")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="default: the fast recipe's for the model, so every method starts from bayescomp's own start")
    p.add_argument("--pretrain-lr", type=float, default=FAST_RECIPE.pretrain_lr)
    p.add_argument("--pretrain-batch-size", type=int, default=128)
    p.add_argument("--init-from", action="append", default=[], help="MODEL=FILE: a plain state_dict to start from")
    p.add_argument("--finetune-epochs", type=float, default=None,
                   help="equal_kept's fine-tuning epochs; default: the fast recipe's for the model, at least 5")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--prune-steps", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run for the tests: {SMOKE['train']} training and {SMOKE['test']} test examples, "
                        f"{SMOKE['pretrain_epochs']} pretraining and {SMOKE['finetune_epochs']} fine-tuning epoch")
    p.add_argument("--out", default=str(RESULTS / "peers.json"))
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> dict[str, dict]:
    """Validate the options before any data is read; the targets per model."""
    models = [m for m in args.models.split(",") if m]
    for name in models:
        if name not in MODELS:
            raise OptionError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    for name in args.methods.split(","):
        if name not in METHODS:
            raise OptionError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    for name in args.settings.split(","):
        if name not in SETTINGS:
            raise OptionError(f"unknown setting {name!r}; choose one of: {', '.join(SETTINGS)}")
    try:
        [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise OptionError(f"--seeds takes integers separated by commas, got {args.seeds!r}") from None
    if (args.prune_steps < 1 or (args.pretrain_epochs or 0) < 0 or (args.finetune_epochs or 0) < 0
            or args.threads < 1):
        raise OptionError("--prune-steps and --threads must be at least 1, the epoch counts not negative")
    kept, budget = _pairs(args.kept, "--kept", float), _pairs(args.budget, "--budget", float)
    inits = _pairs(args.init_from, "--init-from", str)
    for name, path in inits.items():
        if not Path(path).is_file():
            raise OptionError(f"--init-from {name}={path}: no such file")
        try:
            _load_start(name, path)
        except Exception as exc:  # any file a user hands over: unreadable, not tensors, or another model's
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise OptionError(f"--init-from {name}={path}: not a state_dict of {name} ({why})") from None
    targets = {}
    for name in models:
        fast = fast_figures(Path(args.fast), name)
        k = kept.get(name, fast and fast["weights_kept_pct"])
        b = budget.get(name, fast and fast["wall_seconds"])
        if k is None or b is None:
            raise OptionError(f"{name}: no target weights kept / budget: {args.fast} has no GNJ row for it; "
                              f"give --kept {name}=PCT and --budget {name}=SECONDS")
        if not 0.0 < k <= 100.0:
            raise OptionError(f"--kept {name}={k:g}: weights kept must be in (0, 100]")
        if not b > 0.0:
            raise OptionError(f"--budget {name}={b:g}: the budget must be positive seconds")
        targets[name] = {"kept": k, "budget": b, "init_from": inits.get(name), "bayescomp": fast}
    return targets


def machine(args: argparse.Namespace) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "torch_pruning": metadata.version("torch-pruning"),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def data(args: argparse.Namespace):
    x, y = load_mnist("train", args.data_dir)
    xt, yt = load_mnist("test", args.data_dir)
    if args.smoke:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: SMOKE["train"]]
        x, y = x[idx], y[idx]
        xt, yt = xt[: SMOKE["test"]], yt[: SMOKE["test"]]
    return (x, y), (xt, yt)


SETUP = {
    "torch_pruning": "Torch-Pruning BasePruner, GroupMagnitudeImportance(p=2), local ranking, final classifier "
                     "ignored, iterative_steps=S with fine-tuning after each step (README usage)",
    "torch_pruning_global": "as torch_pruning with global_pruning=True (README, Global Pruning)",
    "magnitude": "torch.nn.utils.prune.global_unstructured(L1Unstructured) over all Linear/Conv2d weights, S "
                 "steps with fine-tuning after each, then prune.remove (PyTorch pruning tutorial)",
}
SELECTION_HOW = ("fixed beforehand: the peer's documented usage; S = --prune-steps (the iterative_steps example of "
                 "BasePruner's comment); Adam at its default lr 1e-3, batch 128; Torch-Pruning's channel ratio by "
                 "bisection on weight counts of the pruned copy (no data); no validation or test data chosen on")


def pretrain_epochs(args: argparse.Namespace, model: str) -> int:
    """--pretrain-epochs, else the fast recipe's plain epochs for `model` (bayescomp's own start)."""
    # (the GNJ run's: bayescomp's rows in peers.json are the GNJ ones)
    return FAST_RECIPE.for_run(model, "gnj").pretrain_epochs if args.pretrain_epochs is None else args.pretrain_epochs


def finetune_epochs(args: argparse.Namespace, model: str) -> float:
    """--finetune-epochs, else the fast recipe's fine-tuning epochs for `model` with GNJ, at least 5 (the peers'
    epochs are plain ones, cheaper than bayescomp's; 5 is what the LeNet-5-Caffe rows ran with)."""
    if args.finetune_epochs is not None:
        return args.finetune_epochs
    return float(max(5, FAST_RECIPE.for_run(model, "gnj").finetune_epochs))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        args.pretrain_epochs, args.finetune_epochs = SMOKE["pretrain_epochs"], SMOKE["finetune_epochs"]
    try:
        targets = check(args)
    except OptionError as exc:
        print(f"peers.py: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result: dict = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
                    "machine": machine(args), "smoke": args.smoke,
                    "settings": {"pretrain_epochs": {m: pretrain_epochs(args, m) for m in args.models.split(",")},
                                 "pretrain_lr": args.pretrain_lr,
                                 "pretrain_batch_size": args.pretrain_batch_size,
                                 "finetune_epochs": {m: finetune_epochs(args, m) for m in args.models.split(",")},
                                 "finetune_lr": args.finetune_lr,
                                 "batch_size": args.batch_size, "prune_steps": args.prune_steps,
                                 "file_bytes": {"torch_pruning": "torch.save(state_dict) of the smaller dense model",
                                                "magnitude": "torch.save of CSR per weight (int32 row pointers, "
                                                             "int16/int32 column indices, float32 values) + "
                                                             "float32 biases"},
                                 "wall_seconds": "pretraining + ratio search + pruning + fine-tuning; the final test "
                                                 "evaluation is not counted"},
                    "setup": SETUP, "rows": []}
    train, test = data(args)
    for name in args.models.split(","):
        target = targets[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            plain, pre_s = pretrain(name, train, pretrain_epochs(args, name), args.pretrain_lr,
                                    args.pretrain_batch_size, seed, target["init_from"])
            total = weights_dense(plain)
            print(f"[peers] {name} seed {seed}: pretrained in {pre_s:.1f} s", file=sys.stderr, flush=True)
            for method in args.methods.split(","):
                ratio = search_s = None
                if method.startswith("torch_pruning"):
                    t = time.perf_counter()
                    ratio, _ = tp_ratio_for(plain, EXAMPLE, target["kept"], args.prune_steps,
                                            method == "torch_pruning_global")
                    search_s = time.perf_counter() - t
                for setting in args.settings.split(","):
                    torch.manual_seed(seed)
                    equal_time = setting == "equal_time"
                    time_left = target["budget"] - pre_s - (search_s or 0.0) if equal_time else None
                    out = run_method(method, plain, train, target_pct=target["kept"], steps=args.prune_steps,
                                     lr=args.finetune_lr, batch_size=args.batch_size, seed=seed,
                                     finetune_epochs=None if equal_time else finetune_epochs(args, name),
                                     time_left=max(time_left, 0.0) if equal_time else None, tp_ratio=ratio)
                    model = out["model"]
                    wall = pre_s + (search_s or 0.0) + out["seconds"]
                    structured = method.startswith("torch_pruning")
                    kept_w = weights_dense(model) if structured else weights_nonzero(model)
                    row = {
                        "model": name, "method": method, "setting": setting, "seed": seed,
                        "test_error": evaluate(model, *test),
                        "weights_kept_pct": 100.0 * kept_w / total, "target_weights_kept_pct": target["kept"],
                        "weights_kept": kept_w, "weights_total": total,
                        "zeros_fraction": 1.0 - weights_nonzero(model) / weights_dense(model),
                        "architecture": architecture(model),
                        "file_bytes": state_dict_bytes(model) if structured else sparse_bytes(model),
                        "wall_seconds": wall, "budget_seconds": target["budget"] if equal_time else None,
                        "pretrain_seconds": pre_s, "ratio_search_seconds": search_s,
                        "prune_finetune_seconds": out["seconds"],
                        # when the last fine-tuning step began, from the start of the row (pretraining included):
                        # with an equal-time budget, no step begins after it
                        "last_step_started_seconds": (None if out["last_step_started"] is None else
                                                      pre_s + (search_s or 0.0) + out["last_step_started"]),
                        "finetune_epochs": out["finetune_epochs"], "finetune_steps": out["finetune_steps"],
                        "prune_steps": args.prune_steps,
                        "prune_steps_trained": out["prune_steps_trained"],
                        "channel_ratio": ratio, "pretrained_from": target["init_from"],
                        "selection": "fixed", "selection_how": SELECTION_HOW,
                        "bayescomp": target["bayescomp"],
                    }
                    result["rows"].append(row)
                    print(f"[peers] {name} s{seed} {method} {setting}: {row['test_error']:.2f}% error, "
                          f"{row['weights_kept_pct']:.2f}% kept, {row['architecture']}, {wall:.1f} s, "
                          f"{row['finetune_epochs']:.2f} fine-tuning epochs", file=sys.stderr, flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out_path)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
