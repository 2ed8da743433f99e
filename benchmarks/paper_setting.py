"""Run one of the paper's MNIST settings on full MNIST and record every figure.

    python benchmarks/paper_setting.py --model lenet300 --prior gnj --epochs 30

writes benchmarks/results/<model>_<prior>.json: the report.json fields of the run, the command, and
the time of one training step of the Bayesian model against the plain model (same data, batch size,
threads, Adam settings), measured side by side in this process as a ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from speed import train_steps  # benchmarks/speed.py, beside this script

from bayescomp.pipeline import RunOptions, run

RESULTS = Path(__file__).resolve().parent / "results"


def step_time_ratio(model_name: str, prior: str, batch_size: int, data_dir: str | None, rounds: int = 7,
                    steps: int = 30) -> dict:
    """Seconds per training step, plain vs Bayesian: `speed.train_steps` (the step `fit` takes, interleaved rounds)."""
    entry = train_steps(model_name, [prior], data_dir, rounds, steps, batch_size=batch_size)
    return {"plain_step_seconds": entry["plain_step_ms"]["wall"] / 1e3,
            "bayesian_step_seconds": entry["step_ms"][prior]["wall"] / 1e3,
            "train_step_ratio": entry["train_step_ratio"][prior], "floor": entry["floor"], "batch_size": batch_size,
            "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet300")
    p.add_argument("--prior", default="gnj")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--thresholds", type=str, default=None, help="as on the command line: -3 or fc1=-2.8,fc2=-3")
    p.add_argument("--tau0", type=float, default=None, help="horseshoe: global scale of the prior")
    p.add_argument("--global-kl", choices=["derived", "paper"], default=None, help="horseshoe: global-scale KL")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/<model>_<prior>.json)")
    p.add_argument("--keep-run", default=None, help="also keep the run directory here")
    p.add_argument("--resume", action="store_true", help="continue the run kept in KEEP_RUN.partial")
    p.add_argument("--from-run", default=None,
                   help="no training: compress the finished run folder FROM_RUN again (same thresholds unless "
                        "given) and refresh the compression figures of the result file, keeping the rest")
    p.add_argument("--speed-only", action="store_true",
                   help="only re-measure the training-step ratio and update the existing result file")
    args = p.parse_args()
    from bayescomp.cli import parse_thresholds

    out = Path(args.out) if args.out else RESULTS / f"{args.model}_{args.prior}.json"
    if args.from_run:
        from bayescomp.pipeline import recompress

        old = json.loads(out.read_text()) if out.is_file() else {}
        with tempfile.TemporaryDirectory() as tmp:
            fresh = recompress(args.from_run, Path(tmp) / "run", parse_thresholds(args.thresholds),
                               data_dir=args.data_dir)
        for key in ("history", "speed", "train_seconds", "environment", "config", "command"):
            if key in old:
                fresh[key] = old[key]
        fresh["recompress_command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        out.write_text(json.dumps(fresh, indent=2) + "\n")
        print(f"refreshed {out}: cr_max {fresh.get('cr_max')}, file bytes {fresh.get('file_bytes')}")
        return
    if args.speed_only:
        report = json.loads(out.read_text())
        report["speed"] = step_time_ratio(args.model, args.prior, args.batch_size, args.data_dir)
        report["speed"]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"step time ratio {report['speed']['train_step_ratio']:.2f}; updated {out}")
        return

    opts = RunOptions(model=args.model, prior=args.prior, epochs=args.epochs, seed=args.seed,
                      batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
                      thresholds=parse_thresholds(args.thresholds), data_dir=args.data_dir,
                      tau0=args.tau0, global_kl=args.global_kl)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    speed = step_time_ratio(args.model, args.prior, args.batch_size, args.data_dir)
    print(f"step time: plain {speed['plain_step_seconds'] * 1e3:.2f} ms, bayesian "
          f"{speed['bayesian_step_seconds'] * 1e3:.2f} ms, ratio {speed['train_step_ratio']:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep_run) if args.keep_run else Path(tmp) / "run"
        report = run(opts, run_dir, force=True, resume=args.resume, progress=sys.stderr.isatty(), command=command)
    report["command"] = command
    report["speed"] = speed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.model} {args.prior}: test error {report['test_error']:.2f}% (uncompressed "
          f"{report['test_error_uncompressed']:.2f}%), architecture {report['architecture']}, weights kept "
          f"{report['weights_kept_pct']:.2f}%, bits {report['bits']}, CR arch {report['cr_architecture']:.1f}, "
          f"CR fast {report['cr_fast']:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
