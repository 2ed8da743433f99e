"""A user-style residual network on real MNIST: bayesianize, train, compress through torch.fx, evaluate.

    python benchmarks/resnet_mnist.py --epochs 4 --train-subset 20000

Writes benchmarks/results/resnet_mnist_gnj.json: test errors (uncompressed posterior mean; shrunk and
rounded graph model), architecture, weights kept, bits and rates, with the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import bayescomp
from bayescomp.data import load_mnist
from bayescomp.models import resnet_mnist
from bayescomp.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thresholds", type=float, default=None, help="one log α threshold (default: the prior's)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.train_subset]
    bmodel = bayescomp.bayesianize(resnet_mnist(), "gnj", keep_weights=False)
    result = fit(bmodel, (x[idx], y[idx]), TrainConfig(epochs=args.epochs, seed=args.seed), test=(xt, yt),
                 progress=sys.stderr.isatty())
    err_uncompressed = evaluate(bmodel, xt, yt)
    compressed = bayescomp.graph_compress(bmodel.eval(), args.thresholds, example_input=xt[:2])
    err = evaluate(compressed.model, xt, yt)
    report = {"model": "resnet_mnist", "prior": "gnj", "epochs": args.epochs, "train_examples": len(idx),
              "test_error": err, "test_error_uncompressed": err_uncompressed, "train_seconds": result.seconds,
              **{k: v for k, v in compressed.report.items() if k != "prior"},
              "history": result.history, "threads": torch.get_num_threads(),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "resnet_mnist_gnj.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"resnet_mnist: test error {err:.2f}% (uncompressed {err_uncompressed:.2f}%), architecture "
          f"{report['architecture']}, weights kept {report['weights_kept_pct']:.1f}%, bits {report['bits']}; wrote {out}")


if __name__ == "__main__":
    main()
