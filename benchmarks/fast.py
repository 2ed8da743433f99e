"""The fast recipe on the zoo's MNIST models: each run the whole `bayescomp compress --recipe fast` command.

    python benchmarks/fast.py                                  # lenet300, both priors, seeds 0,1,2
    python benchmarks/fast.py --models lenet5 --priors gnj --seeds 0
    python benchmarks/fast.py --smoke --out /tmp/fast.json      # 1 epoch on 500 images: the mechanics only
    python benchmarks/fast.py --models lenet5 --priors gnj --target-kept 0.9   # the recipe cut to a size

writes benchmarks/results/fast.json (or --out), one row per model and prior: the command, per seed the
figures of the run's report.json (`test_error`, `weights_kept_pct`, `architecture`, `file_bytes` of its
model.bcz) and `wall_seconds`, the wall-clock time of the whole command in a subprocess (data loading,
pretraining, training, cut, fine-tuning, compression, evaluation, files), and their mean. Rows of earlier runs
for other models or priors are kept, so models can be run one at a time.

Each row also keeps the `fast.py` call that made it (`benchmark_command`) and its `machine` (load averages before
and after that row's runs); the top-level `command` and `machine` are the last call's.

`selection` says how each setting was chosen: the recipe's settings on a validation split held out of the
training set (`benchmarks/recipe_search.py`, figures in benchmarks/results/recipe_search.jsonl), the
thresholds by the recipe's rule, computed from the posterior alone. The test set is read once per run, at
its end, by the command itself.

`--target-kept PCT` gives the command `--target-kept PCT/100` (a fraction there): the recipe's training, cut
to at most PCT% of the weights (the size-target rule in place of the recipe's thresholds). Its rows are
separate rows (`target_kept` set; thresholds by rule: the size fixed before the run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("lenet300", "lenet5")
PRIORS = ("gnj", "ghs")
FIGURES = ("test_error", "test_error_uncompressed", "weights_kept_pct", "architecture", "bits", "cr_file")


def _command(model: str, prior: str, seed: int, out: Path, data_dir: str | None, smoke: bool,
             target_kept: float | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "bayescomp", "compress", "--recipe", "fast", "--model", model, "--prior", prior,
           "--seed", str(seed), "--out", str(out), "--quiet"]
    if target_kept is not None:
        cmd += ["--target-kept", f"{target_kept / 100:g}"]  # the command takes a fraction
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if smoke:
        cmd += ["--epochs", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--train-subset", "500"]
    return cmd


def run_one(model: str, prior: str, seed: int, workdir: Path, data_dir: str | None, smoke: bool,
            threads: int, target_kept: float | None = None) -> dict:
    """One seed: the whole command in a subprocess, timed; its report's figures."""
    out = workdir / f"{model}_{prior}_s{seed}"
    cmd = _command(model, prior, seed, out, data_dir, smoke, target_kept)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    figures = {k: report.get(k) for k in FIGURES}
    packed = out / "model.bcz"
    return {"seed": seed, **figures, "file_bytes": packed.stat().st_size if packed.is_file() else None,
            "wall_seconds": wall, "train_seconds": report.get("train_seconds"),
            "thresholds": report.get("thresholds"),
            "command": "bayescomp " + shlex.join(cmd[cmd.index("compress"):])}


def summarize(runs: list[dict]) -> dict:
    """Mean (and sd over seeds, where there are several) of the numeric figures."""
    out = {}
    for key in ("test_error", "test_error_uncompressed", "weights_kept_pct", "file_bytes", "wall_seconds"):
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = statistics.fmean(vals)
            if len(vals) > 1:
                out[key + "_sd"] = statistics.stdev(vals)
    return out


def _machine(threads: int, load_start: tuple[float, float, float]) -> dict:
    """Where a call ran: the machine, the threads of each run, the load averages before and after."""
    return {"cpu": platform.machine(), "cores": os.cpu_count(), "threads_per_run": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": list(load_start), "load_average_at_end": list(os.getloadavg())}


def _recipe_record() -> dict:
    from bayescomp.recipes import training_recipe

    rec = training_recipe("fast")
    fields = {k: v for k, v in vars(rec).items() if k != "evidence"}
    return {**fields, "lr_scale": dict(rec.lr_scale), "evidence": dict(rec.evidence)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet300")
    p.add_argument("--priors", default="gnj,ghs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each run (default 1)")
    p.add_argument("--out", default=str(RESULTS / "fast.json"))
    p.add_argument("--smoke", action="store_true", help="1 epoch of each stage on 500 images (mechanics only)")
    p.add_argument("--target-kept", type=float, default=None,
                   help="cut to at most this percentage of the weights (the command's --target-kept; separate rows)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    priors = [q for q in args.priors.split(",") if q]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for q in priors:
        if q not in PRIORS:
            p.error(f"unknown prior {q!r}; choose from {', '.join(PRIORS)}")
    if not seeds:
        p.error("--seeds names no seed")
    if args.target_kept is not None and not 0 < args.target_kept <= 100:  # (percent)
        p.error(f"--target-kept must be a percentage in (0, 100], got {args.target_kept:g}")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {(r["model"], r["prior"], r.get("target_kept")): r for r in previous.get("rows", [])}
    load_start = os.getloadavg()
    command = "python benchmarks/fast.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bayescomp-fast-") as tmp:
        for model in models:
            for prior in priors:
                runs, row_load = [], os.getloadavg()
                for seed in seeds:
                    print(f"{model} {prior} seed {seed} ...", file=sys.stderr, flush=True)
                    runs.append(run_one(model, prior, seed, Path(tmp), args.data_dir, args.smoke, args.threads,
                                        args.target_kept))
                    r = runs[-1]
                    print(f"  {r['test_error']:.2f}% error at {r['weights_kept_pct']:.2f}% kept ({r['architecture']}) "
                          f"in {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
                thresholds = ("the size-target rule at the --target-kept given, fixed before the run" if args.target_kept
                              is not None else "the recipe's rule on the posterior")
                mean = summarize(runs)
                rows[(model, prior, args.target_kept)] = {
                    "model": model, "prior": prior, "recipe": "fast", "target_kept": args.target_kept,
                    "seeds": runs, "mean": mean, "test_error": mean["test_error"],
                    "weights_kept_pct": mean["weights_kept_pct"], "wall_seconds": mean["wall_seconds"],
                    "selection": {"settings": "validation", "thresholds": "rule",
                                  "how": "the recipe's settings were chosen on a validation split (10% of the "
                                         f"training set, seed 0) by benchmarks/recipe_search.py; thresholds by "
                                         f"{thresholds}; the test set read once per run"},
                    "smoke": args.smoke,
                    "benchmark_command": command, "machine": _machine(args.threads, row_load),
                }
    result = {  # `command` and `machine`: this call's (each row keeps the call that made it: benchmark_command, machine)
        "command": command, "machine": _machine(args.threads, load_start),
        "recipe": _recipe_record(),
        "rows": sorted(rows.values(), key=lambda r: (MODELS.index(r["model"]), PRIORS.index(r["prior"]),
                                                    r.get("target_kept") or 0.0)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
