"""Run one of the paper's MNIST settings on full MNIST and record every figure.

    python benchmarks/paper_setting.py --model lenet300 --prior gnj
    python benchmarks/paper_setting.py --model lenet300 --prior gnj --epochs 200 --selection fixed \\
        --selection-note "the paper's 200 epochs and the model's default thresholds, set before any run"

writes benchmarks/results/<model>_<prior>.json: the report.json fields of the run, the command, and
the time of one training step of the Bayesian model against the plain model (same data, batch size,
threads, Adam settings), measured side by side in this process as a ratio of medians.

The file ends with `selection` and `selection_note` (benchmarks/selection.py). At the script's defaults and the
model's default thresholds they are "fixed"; a setting given on the command line (thresholds, epochs, rates,
τ0, ...) must come with `--selection fixed|rule|validation|test` and `--selection-note` saying how it was chosen,
or nothing is run or written.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from selection import add_selection_options, explicit_settings, stamp, user_selection
from speed import train_steps  # benchmarks/speed.py, beside this script

from bayescomp.pipeline import RunOptions, run

RESULTS = Path(__file__).resolve().parent / "results"
#: the options that are choices of the method (argparse dests): given explicitly, they need --selection
SETTINGS = ("epochs", "batch_size", "lr", "warmup_epochs", "thresholds", "tau0", "global_kl")
DEFAULTS_NOTE = "the script's default training settings and the model's default thresholds, set before any run"


def run_selection(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  previous: dict | None = None) -> tuple[str, str]:
    """The `selection` and `selection_note` of the file this invocation writes: the user's --selection when given
    (required when a setting was given explicitly), else "fixed" at the defaults; with --from-run and no new
    thresholds, the selection the refreshed file already records (the run and its thresholds are unchanged)."""
    explicit = explicit_settings(parser, args, SETTINGS if not args.from_run else ("thresholds",))
    if args.from_run and not explicit and args.selection is None:
        if previous and previous.get("selection") and previous.get("selection_note"):
            return previous["selection"], previous["selection_note"]
        explicit = ["--from-run (of a result file that records no selection)"]
    given = user_selection(parser, args, explicit)
    return given if given is not None else ("fixed", DEFAULTS_NOTE)


def step_time_ratio(model_name: str, prior: str, batch_size: int, data_dir: str | None, rounds: int = 7,
                    steps: int = 30) -> dict:
    """Seconds per training step, plain vs Bayesian: `speed.train_steps` (the step `fit` takes, interleaved rounds)."""
    entry = train_steps(model_name, [prior], data_dir, rounds, steps, batch_size=batch_size)
    return {"plain_step_seconds": entry["plain_step_ms"]["wall"] / 1e3,
            "bayesian_step_seconds": entry["step_ms"][prior]["wall"] / 1e3,
            "train_step_ratio": entry["train_step_ratio"][prior], "floor": entry["floor"], "batch_size": batch_size,
            "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps}


def write_result(out: Path, report: dict) -> None:
    """Write the result file atomically (a stopped script leaves the old file, never half a new one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
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
    add_selection_options(p)
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    from bayescomp.clioptions import parse_thresholds

    out = Path(args.out) if args.out else RESULTS / f"{args.model}_{args.prior}.json"
    if args.from_run:
        from bayescomp.pipeline import recompress

        old = json.loads(out.read_text()) if out.is_file() else {}
        selection = run_selection(p, args, old)
        with tempfile.TemporaryDirectory() as tmp:
            fresh = recompress(args.from_run, Path(tmp) / "run", parse_thresholds(args.thresholds),
                               data_dir=args.data_dir)
        for key in ("history", "speed", "train_seconds", "environment", "config", "command"):
            if key in old:
                fresh[key] = old[key]
        fresh["recompress_command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        write_result(out, stamp(fresh, *selection))
        print(f"refreshed {out}: cr_max {fresh.get('cr_max')}, file bytes {fresh.get('file_bytes')}")
        return
    if args.speed_only:
        report = json.loads(out.read_text())
        given = user_selection(p, args, [])  # (the run is unchanged: its selection stands unless restated)
        report["speed"] = step_time_ratio(args.model, args.prior, args.batch_size, args.data_dir)
        report["speed"]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        if given is not None or "selection" in report:
            report = stamp(report, *(given or (report["selection"], report["selection_note"])))
        write_result(out, report)
        print(f"step time ratio {report['speed']['train_step_ratio']:.2f}; updated {out}")
        return

    selection = run_selection(p, args)  # before minutes of timing and training
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
    write_result(out, stamp(report, *selection))
    print(f"{args.model} {args.prior}: test error {report['test_error']:.2f}% (uncompressed "
          f"{report['test_error_uncompressed']:.2f}%), architecture {report['architecture']}, weights kept "
          f"{report['weights_kept_pct']:.2f}%, bits {report['bits']}, CR arch {report['cr_architecture']:.1f}, "
          f"CR fast {report['cr_fast']:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
