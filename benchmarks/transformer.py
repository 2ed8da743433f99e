"""A small ViT-style transformer on MNIST: whole attention heads and MLP neurons removed by Bayesian compression.

    OMP_NUM_THREADS=1 python benchmarks/transformer.py            # the recorded run (one core, ~15 min)
    python benchmarks/transformer.py --smoke --out /tmp/t.json     # seconds: the pipeline end to end

The network: 7×7 patches → 16 tokens, a linear patch embedding to d_model 64 plus a learned position embedding,
2 pre-norm blocks of `nn.MultiheadAttention` (--heads, default 8 heads of 8 features, batch_first) and an MLP
(64 → 128 → 64, GELU), a final LayerNorm, mean pooling over tokens and a linear classifier. Training, all through
bayescomp's own loop (`bayescomp.train.fit`, Adam, cosine rate per stage), in two stages of E epochs each: stage 1
trains it plain; stage 2 continues it either plain (the baseline: 2E plain epochs) or Bayesian
(`bayescomp.bayesianize(prior="gnj")` of the stage-1 network, the paper's pretrained start: each attention becomes
`AttentionHeads`, its out_proj with one group per head; fc2 of each MLP has one group per hidden neuron; the ELBO,
KL / N), so both end after the same 2E epochs on the same examples.

Compression: one threshold on log α for every layer, chosen on a validation split held out of the training set (the
rule, fixed before any run: the lowest threshold of the grid whose masked model's validation error is within
--val-slack points of the unpruned posterior mean's), then `bayescomp.compress(bmodel, thresholds=t,
example_input=...)`, the graph engine: a head is removed when its out_proj group is pruned (the `AttentionHeads` leaf
is rebuilt by `compress.heads.shrink_attention`: its q/k/v rows and out_proj columns go), a hidden neuron when its fc2
group is (fc1's row and fc2's column go), a pixel of the patch embedding when its group is; a pruned input group of
q/k/v stays a zero column (they read the whole residual stream). The compressed model is plain PyTorch; its outputs
are checked against the masked Bayesian model's (max abs difference). Weights are not rounded to a bit precision here.

Multiply-adds per image: `bayescomp.multiply_adds` (compress's report, on the Bayesian model and the compressed one:
every Linear call, in·out per token; attention scores and the weighted values are not counted). Weights: every weight
and bias of the plain model, embeddings and LayerNorms included. The test set is read once, at the end. Results:
benchmarks/results/transformer_mnist.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from selection import add_selection_options, combine, explicit_settings, stamp, user_selection  # beside this script
from torch import Tensor, nn

import bayescomp
from bayescomp.data import load_mnist
from bayescomp.nn import AttentionHeads, GroupSparseLayer
from bayescomp.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results"
#: thresholds on log α tried on the validation split, lowest (most pruning) first
GRID = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0)
#: --head-search: thresholds tried for the heads (out_proj layers) alone after the shared one is fixed, lowest first
HEAD_GRID = (-10.0, -9.5, -9.0, -8.5, -8.0, -7.5, -7.0, -6.0, -5.0)
#: the options that are choices of the method (argparse dests): given explicitly, they need --selection
SETTINGS = ("epochs", "heads", "kl_weight", "head_search", "finetune_epochs", "finetune_select", "train_subset", "val_size", "val_slack", "lr", "scale_lr_factor", "seed")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches of `patch`×`patch` pixels → tokens → blocks → mean over tokens → classes."""

    def __init__(self, patch: int = 7, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128,
                 classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.patch, self.tokens = patch, (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        n, c, h, w = x.shape
        patches = x.view(n, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(n, self.tokens, p * p)
        z = self.blocks(self.embed(patches) + self.pos)
        return self.head(self.norm(z).mean(1))


def weight_count(model: nn.Module) -> int:
    """Every weight and bias of a plain model (the embeddings' and LayerNorms' included), and its floating-point
    buffers (the compressed graph holds the position embedding as a buffer)."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.is_floating_point())


def nonzero_weights(model: nn.Module) -> int:
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return sum(int((t != 0).sum()) for t in tensors)


def set_masks(bmodel: nn.Module, threshold: float, head_threshold: float | None = None) -> None:
    """Every group-sparse layer keeps its groups with log α below `threshold` (the attentions' out_proj layers,
    whose groups are heads, below `head_threshold` when one is given)."""
    heads = {id(m.out_proj) for m in bmodel.modules() if isinstance(m, AttentionHeads)}
    with torch.no_grad():
        for m in bmodel.modules():
            if isinstance(m, GroupSparseLayer):
                t = head_threshold if head_threshold is not None and id(m) in heads else threshold
                m.group_mask.copy_(m.log_alpha() < t)


def finetune(model: nn.Module, train: tuple[Tensor, Tensor], config: TrainConfig, epochs: int,
             val: tuple[Tensor, Tensor] | None) -> dict | None:
    """Plain training of `model` in place for `epochs` epochs (cosine from the config's rate).

    With `val` (--finetune-select validation), the length is chosen on the validation split: after each epoch
    (and before the first) the validation error is measured, and the model ends as it was after the fewest epochs
    that reach the lowest error (its state from then is restored). Returns the validation curve and the chosen
    length, or None without `val`."""
    cfg = dataclasses.replace(config, epochs=epochs, eval_every=epochs, kl_weight=1.0)
    if val is None:
        fit(model, train, cfg, progress=False)
        return None
    model.eval()
    curve = [evaluate(model, *val)]
    best = (curve[0], 0, copy.deepcopy(model.state_dict()))

    def keep_best(row: dict) -> None:
        nonlocal best
        model.eval()
        err = evaluate(model, *val)
        model.train()
        curve.append(err)
        if err < best[0]:
            best = (err, len(curve) - 1, copy.deepcopy(model.state_dict()))

    model.train()
    fit(model, train, cfg, on_epoch=keep_best, progress=False)
    model.load_state_dict(best[2])
    model.eval()
    return {"validation_error_by_epoch": curve, "chosen_epochs": best[1], "max_epochs": epochs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="epochs of each stage (plain, then plain or Bayesian)")
    p.add_argument("--heads", type=int, default=8, help="attention heads per block (head_dim = 64 / heads)")
    p.add_argument("--train-subset", type=int, default=55000, help="training examples (after the validation split)")
    p.add_argument("--val-size", type=int, default=5000, help="validation examples held out of the training set")
    p.add_argument("--val-slack", type=float, default=0.2, help="points of validation error the threshold may add")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's rate, cosine to 0 over the run (both trainings)")
    p.add_argument("--scale-lr-factor", type=float, default=10.0,
                   help="factor on the rate of the Bayesian model's group scales and log-variances (lr_scale): they "
                        "start at log σ² = −9 and must travel several units for a group to be pruned")
    p.add_argument("--kl-weight", type=float, default=1.0, help="β of the KL term (1: the ELBO; below 1: tempered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="F: epochs of plain training of the compressed model after the cut (cosine from --lr); the "
                        "plain baseline gets the same F epochs more, so both end after 2E + F epochs")
    p.add_argument("--finetune-select", choices=("fixed", "validation"), default="fixed",
                   help="fixed: exactly F fine-tuning epochs; validation: F is a maximum and each model (the "
                        "compressed one and the baseline alike) keeps the epoch count from 0 to F with the lowest "
                        "validation error (the fewest on a tie), so the length is chosen without the test set")
    p.add_argument("--head-search", action="store_true",
                   help="after the shared threshold, a lower one for the heads alone (out_proj), lowest of "
                        f"{list(HEAD_GRID)} within --val-slack on the validation split")
    p.add_argument("--smoke", action="store_true", help="a few hundred examples, one epoch: seconds")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/transformer_mnist.json)")
    add_selection_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = user_selection(parser, args, explicit_settings(parser, args, SETTINGS)) or (
        "fixed", "epochs, training subset, learning rates: the script's defaults, fixed before any run")
    command = "python benchmarks/transformer.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    if args.smoke:
        args.epochs, args.train_subset, args.val_size = 1, 512, 256
    torch.manual_seed(args.seed)
    x_all, y_all = load_mnist("train")
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))
    val_idx, train_idx = order[: args.val_size], order[args.val_size : args.val_size + args.train_subset]
    train, val = (x_all[train_idx], y_all[train_idx]), (x_all[val_idx], y_all[val_idx])
    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, eval_every=args.epochs, lr_schedule="cosine",
                         kl_weight=args.kl_weight,
                         lr_scale={"scale": args.scale_lr_factor, "variance": args.scale_lr_factor})

    torch.manual_seed(args.seed)
    pretrained = ViT(heads=args.heads)
    t0 = time.perf_counter()
    fit(pretrained, train, config, test=val, progress=False)  # stage 1, shared: E plain epochs
    pre_seconds = time.perf_counter() - t0
    plain = copy.deepcopy(pretrained)
    t0 = time.perf_counter()
    fit(plain, train, config, test=val, progress=False)  # stage 2, plain: E more epochs (the baseline)
    select_val = val if args.finetune_select == "validation" else None
    plain_ft = None
    if args.finetune_epochs:  # stage 3 of the baseline: the same F epochs (or the same rule) as the compressed model
        plain_ft = finetune(plain, train, config, args.finetune_epochs, select_val)
    plain_seconds = time.perf_counter() - t0

    bmodel = bayescomp.bayesianize(pretrained, prior="gnj", keep_weights=True)
    t0 = time.perf_counter()
    fit(bmodel, train, config, test=val, progress=False)  # stage 2, Bayesian: the same E epochs
    bayes_seconds = time.perf_counter() - t0
    bmodel.eval()

    # threshold on the validation split (the rule fixed in --help), nothing from the test set
    set_masks(bmodel, math.inf)
    val_unpruned = evaluate(bmodel, *val)
    sweep = []
    for t in GRID:
        set_masks(bmodel, t)
        sweep.append({"threshold": t, "validation_error": evaluate(bmodel, *val)})
    chosen = next((s["threshold"] for s in sweep if s["validation_error"] <= val_unpruned + args.val_slack), math.inf)
    head_sweep, head_chosen = [], None
    if args.head_search:  # the heads' own threshold: lowest of HEAD_GRID within the same slack, others at `chosen`
        for t in (t for t in HEAD_GRID if t < chosen):
            set_masks(bmodel, chosen, t)
            head_sweep.append({"head_threshold": t, "validation_error": evaluate(bmodel, *val)})
        head_chosen = next((s["head_threshold"] for s in head_sweep
                            if s["validation_error"] <= val_unpruned + args.val_slack), None)
    set_masks(bmodel, chosen, head_chosen)
    heads = {id(m.out_proj) for m in bmodel.modules() if isinstance(m, AttentionHeads)}
    per_layer = {name: (head_chosen if head_chosen is not None and id(m) in heads else chosen)
                 for name, m in bmodel.named_modules() if isinstance(m, GroupSparseLayer)}
    result = bayescomp.compress(bmodel, thresholds=per_layer, example_input=val[0][:2], round_weights=False)
    small = result.model
    g = torch.Generator().manual_seed(args.seed + 1)
    probe = torch.cat([val[0][:256], torch.rand(64, 1, 28, 28, generator=g) * 2 - 1])
    with torch.no_grad():
        max_diff = (small(probe) - bmodel(probe)).abs().max().item()
    tuned, tuned_ft = None, None
    if args.finetune_epochs:  # stage 3: plain training of the compressed model (its kept weights only)
        tuned = copy.deepcopy(small).train()
        tuned_ft = finetune(tuned, train, config, args.finetune_epochs, select_val)
        tuned.eval()

    x_test, y_test = load_mnist("test")  # read once, here
    if args.smoke:
        x_test, y_test = x_test[:500], y_test[:500]
    errors = {"plain": evaluate(plain, x_test, y_test), "plain_stage1": evaluate(pretrained, x_test, y_test),
              "bayesian_posterior_mean": None,
              "compressed": evaluate(small, x_test, y_test)}
    if tuned is not None:
        errors["compressed_before_finetune"] = errors["compressed"]
        errors["compressed"] = evaluate(tuned, x_test, y_test)
    set_masks(bmodel, math.inf)
    errors["bayesian_posterior_mean"] = evaluate(bmodel, x_test, y_test)

    blocks = []
    layers = {row["name"]: row for row in result.report["layers"]}
    for i, bb in enumerate(bmodel.blocks):
        heads = result.masks[f"blocks.{i}.attn.out_proj"].group_keep
        blocks.append({"block": i, "heads_kept": int(heads.sum()), "heads_total": bb.attn.num_heads,
                       "heads_kept_index": heads.nonzero().flatten().tolist(),
                       "head_log_alpha": [round(v, 3) for v in bb.attn.out_proj.log_alpha().tolist()],
                       "mlp_neurons_kept": layers[f"blocks.{i}.mlp.fc1"]["outputs_kept"],
                       "mlp_neurons_total": bb.mlp.fc1.out_features})
    record = {
        "benchmark": f"ViT-style transformer on MNIST (7x7 patches, 16 tokens, d_model 64, 2 blocks of {args.heads}-head "
                     "attention + MLP 128, LayerNorm, mean pooling), GNJ; stage 1: plain E epochs (shared), stage 2: "
                     "plain E more epochs (the baseline) or Bayesian E epochs from stage 1 (compressed)",
        "command": command,
        "smoke": args.smoke,
        "settings": {"epochs_per_stage": args.epochs, "heads": args.heads, "finetune_epochs": args.finetune_epochs,
                     "finetune_select": args.finetune_select, "head_search": args.head_search, "train_examples": len(train[0]), "validation_examples": len(val[0]),
                     "batch_size": config.batch_size, "lr": args.lr,
                     "lr_schedule": "cosine", "lr_scale": dict(config.lr_scale),
                     "kl_weight": args.kl_weight, "seed": args.seed, "prior": "gnj",
                     "threads": torch.get_num_threads()},
        "test_error": errors,
        "error_gap_points": round(errors["compressed"] - errors["plain"], 3),
        "threshold": chosen,
        "head_threshold": head_chosen,
        "validation": {"unpruned_error": val_unpruned, "slack_points": args.val_slack, "sweep": sweep,
                       "head_sweep": head_sweep, "finetune_plain": plain_ft, "finetune_compressed": tuned_ft},
        "blocks": blocks,
        "weights": {"before": weight_count(plain), "after": weight_count(small),
                    "after_nonzero": nonzero_weights(small)},
        "multiply_adds_per_image": {"before": result.report["multiply_adds_total"],
                                    "after": result.report["multiply_adds_kept"],
                                    "counted_by": "bayescomp.multiply_adds (compress's report: every Linear call, "
                                                  "in*out per token; attention scores not counted)"},
        "max_abs_diff_compressed_vs_masked": max_diff,
        "seconds": {"stage1_plain_training": round(pre_seconds, 1), "plain_training": round(plain_seconds, 1), "bayesian_training": round(bayes_seconds, 1)},
        "notes": "compressed by bayescomp.compress (the graph engine; AttentionHeads shrunk per head); weights "
                 "not rounded to a bit precision; the test set was read once, after the threshold was fixed",
    }
    record = stamp(record, combine(settings[0], "validation"), f"{settings[1].rstrip('.')}; one "
                   f"log-alpha threshold for all layers chosen on {len(val[0])} validation examples held out of "
                   f"training (lowest of {list(GRID)} within {args.val_slack} points of the unpruned validation error)"
                   + (f"; the heads' own threshold the lowest of {[t for t in HEAD_GRID if t < chosen]} within the "
                      "same slack, on the same validation examples" if args.head_search else "")
                   + (f"; the fine-tuning length of each model (0 to {args.finetune_epochs} epochs) the fewest with "
                      "the lowest validation error" if args.finetune_epochs and select_val is not None else ""))
    out = Path(args.out) if args.out else RESULTS / "transformer_mnist.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(f.name, out)
    print(json.dumps({k: record[k] for k in ("test_error", "threshold", "blocks", "weights",
                                              "multiply_adds_per_image", "max_abs_diff_compressed_vs_masked",
                                              "seconds")}, indent=1))


if __name__ == "__main__":
    main()
