"""Time VGG-16 (CIFAR-10 shape) training steps, Bayesian (GNJ) and plain, and extrapolate to one epoch.

    python benchmarks/vgg_epoch_time.py --steps 3

CIFAR-10 is not on this machine: the steps run on random 3×32×32 inputs, which costs what real
images cost. One epoch = ⌈50000 / batch⌉ steps. Writes benchmarks/results/vgg16_epoch_time.json (atomically;
`selection` "none": a timing chooses nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from selection import TIMING, stamp  # beside this script

import bayescomp
from bayescomp.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS / "vgg16_epoch_time.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps_per_epoch": math.ceil(50000 / args.batch_size)}
    for kind in ("plain", "bayesian"):
        model = build_model("vgg16")
        if kind == "bayesian":
            model = bayescomp.bayesianize(model, "gnj")
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            if kind == "bayesian":
                loss = loss + bayescomp.kl_divergence(model) / 50000
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step warms up the allocator
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        result[f"{kind}_step_seconds"] = step
        result[f"{kind}_epoch_seconds_extrapolated"] = step * result["steps_per_epoch"]
        print(f"{kind}: {step:.2f} s/step, ≈ {step * result['steps_per_epoch'] / 3600:.2f} h/epoch", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp(result, *TIMING), indent=2) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
