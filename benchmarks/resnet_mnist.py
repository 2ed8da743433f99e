"""A user-style residual network on real MNIST, through the same pipeline as `bayescomp compress`.

    python benchmarks/resnet_mnist.py --epochs 10 --train-subset 20000 --pretrain-epochs 2

Bayesianizes `resnet_mnist` (3×3 stem, residual blocks 16→16, 16→32 with a strided 1×1 shortcut,
32→32, average pool, linear), trains it, compresses it through its torch.fx graph (channels tied by
the residual sums are kept or removed together), writes the packed file, and records in
benchmarks/results/resnet_mnist_<prior>.json: test errors (uncompressed posterior mean; shrunk and
rounded graph model), architecture, weights kept, bits, every rate, the file size and the command,
then `selection` and `selection_note` (benchmarks/selection.py): the thresholds' rule ("rule" for the histogram
split, "validation" for the held-out search), joined with how the training settings were chosen: "fixed" at the
script's defaults; settings given on the command line need `--selection` and `--selection-note`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from selection import (  # beside this script
    add_selection_options,
    auto_threshold_selection,
    combine,
    explicit_settings,
    stamp,
    user_selection,
)

from bayescomp.pipeline import RunOptions, run

RESULTS = Path(__file__).resolve().parent / "results"
#: the options that are choices of the method (argparse dests): given explicitly, they need --selection
SETTINGS = ("epochs", "pretrain_epochs", "train_subset")


def run_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str]:
    """The file's `selection` and `selection_note`: the training settings' (the user's --selection, required when
    one was given explicitly; else "fixed", the script's defaults) joined with the thresholds' rule."""
    settings = user_selection(parser, args, explicit_settings(parser, args, SETTINGS))
    settings = settings or ("fixed", "the script's default epochs, training subset and pretraining, set before any run")
    thresholds = auto_threshold_selection(args.auto_thresholds)
    return combine(settings[0], thresholds[0]), f"{settings[1].rstrip('.')}; {thresholds[1]}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="gnj", choices=["gnj", "ghs"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pretrain-epochs", type=int, default=2, help="train the plain network first (the paper's VGG recipe)")
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-thresholds", choices=["histogram", "validation"], default="histogram")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--keep-run", default=None, help="also keep the run folder here")
    add_selection_options(p)
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    selection = run_selection(p, args)  # before any training
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    opts = RunOptions(model="resnet_mnist", prior=args.prior, epochs=args.epochs, seed=args.seed,
                      train_subset=args.train_subset, pretrain_epochs=args.pretrain_epochs,
                      auto_thresholds=args.auto_thresholds, data_dir=args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep_run) if args.keep_run else Path(tmp) / "run"
        report = run(opts, run_dir, force=True, progress=sys.stderr.isatty(), command=command)
    report["command"] = command
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"resnet_mnist_{args.prior}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp(report, *selection), indent=2) + "\n")
    os.replace(tmp, out)
    print(f"resnet_mnist: test error {report['test_error']:.2f}% (uncompressed {report['test_error_uncompressed']:.2f}%), "
          f"architecture {report['architecture']}, weights kept {report['weights_kept_pct']:.1f}%, bits {report['bits']}, "
          f"file {report.get('file_bytes')} B; wrote {out}")


if __name__ == "__main__":
    main()
