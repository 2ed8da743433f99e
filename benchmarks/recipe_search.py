"""The search behind the fast recipe: one configuration trained and cut, measured on a validation split.

    python benchmarks/recipe_search.py --model lenet300 --prior gnj --pre 10 --epochs 40 --lr 1e-2 \
        --sched cosine --clip 0.04 --tag H2

Trains on 90% of the MNIST training set and measures on the other 10% (`validation_split(60000, 0.1,
seed=0)`); the test set is never read. A plain network is pretrained `--pre` epochs at `--pre-lr`, turned
Bayesian keeping its weights, trained `--epochs` epochs (`--lr`, per-kind factors `--mean/--var/--scale`,
`--sched`, `--decay`, `--kl`, `--warmup`, `--bs`, the variance clamp `--clip` on the first layer), then cut by
three threshold rules, each measured: `histogram` (the Otsu split per layer), `default` (the prior's default
threshold) and `recipe` (the model's recipe thresholds, e.g. the tutorial's for LeNet-300-100 with GNJ);
with `--target-kept PCT` also `target` (the size-target rule at PCT% of the weights);
`--rule` is the one fine-tuned for `--ft` epochs (from `--ft-lr`, falling to 0); a comma-separated list fine-tunes
each rule from a copy of the same posterior (the first one's figures in `ft_val`..., all in `ft_rules`), a paired
comparison of rules; `--ft-kl` likewise compares the fine-tuning's KL weights on the first rule's cut (`ft_kl`).
`--mean-ft N` adds N epochs of the mean fine-tuning after it (the noise off: `train.mean_config`).
`--from-posterior FILE` goes on from a posterior `--save-posterior` kept (its run's settings up to the cut).
`--stage-from EPOCH` prunes in stages: after each Bayesian epoch from EPOCH on, the groups at or above the
prior's default threshold are switched off and stay off (`stages`: the groups on after each); the final cut is the `--rule`'s.
One JSON line per run is appended to benchmarks/results/recipe_search.jsonl: validation errors (`val_unc` before
the cut, `val` after), weights kept, architecture, thresholds, seconds (wall, on a shared machine: not a timing
benchmark), and the validation error at four points of training (`curve`), then `selection` "validation" and its
`selection_note`.
"""
import argparse
import contextlib
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from selection import stamp  # beside this script

from bayescomp import bayesianize, compress
from bayescomp.compress import PruneError, apply_masks, group_masks
from bayescomp.compress.budget import size_target_thresholds
from bayescomp.compress.thresholds import histogram_thresholds, validation_split
from bayescomp.data import load_mnist
from bayescomp.models import build_model
from bayescomp.nn import Z_DRAWS
from bayescomp.recipes import recipe as model_recipe
from bayescomp.train import TrainConfig, evaluate, finetune_config, fit, mean_config
from bayescomp.train.loop import flush_denormals

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="lenet300")
ap.add_argument("--prior", default="gnj")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--pre", type=int, default=5)
ap.add_argument("--pre-lr", type=float, default=1e-3)
ap.add_argument("--epochs", type=int, default=20)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--var", type=float, default=1.0)
ap.add_argument("--scale", type=float, default=1.0)
ap.add_argument("--mean", type=float, default=1.0)
ap.add_argument("--kl", type=float, default=1.0)
ap.add_argument("--warmup", type=float, default=0.0)
ap.add_argument("--sched", default="constant")
ap.add_argument("--decay", type=float, default=None)
ap.add_argument("--bs", type=int, default=128)
ap.add_argument("--ft", type=int, default=0)
ap.add_argument("--no-split", default="keep")
ap.add_argument("--origin", type=float, default=None)
ap.add_argument("--clip", type=float, default=None)
ap.add_argument("--tag", default="")
ap.add_argument("--note", default=None, help="why this run, and the rule it is judged by (fixed before it runs)")
ap.add_argument("--rule", default="histogram",
                help="the rule fine-tuned: histogram, default, recipe or target; several, comma-separated, each from the same posterior")
ap.add_argument("--target-kept", type=float, default=None,
                help="also measure the size-target rule (`target`) at this share of the weights kept, in %%")
ap.add_argument("--ft-lr", type=float, default=None, help="the fine-tuning's starting rate (default: --lr)")
ap.add_argument("--ft-kl", default=None,
                help="the fine-tuning's KL weight (default: --kl); several, comma-separated, each fine-tunes the first "
                     "--rule's cut from the same posterior (figures in `ft_kl`), a paired comparison")
ap.add_argument("--stage-from", type=int, default=None,
                help="pruning in stages: after every Bayesian epoch from this one on, switch off (group_mask) the "
                     "groups at or above their prior's default threshold; the final cut is the --rule's")
ap.add_argument("--mean-ft", type=int, default=0,
                help="after the fine-tuning, this many epochs of the mean fine-tuning (noise off, cross-entropy, from "
                     "--ft-lr; `train.mean_config`); `ft_val` is after it, `ft_val_bayes` before it")
ap.add_argument("--z-draw", default="example", choices=Z_DRAWS, help="z per example or per batch")
ap.add_argument("--data-dir", default=None)
ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "recipe_search.jsonl"))
ap.add_argument("--save-posterior", default=None, help="a folder to keep each posterior in (state_dict)")
ap.add_argument("--from-posterior", default=None,
                help="a posterior --save-posterior kept: skip the pretraining and the Bayesian training (its run must "
                     "have had this run's settings up to the cut; `val_unc` shows it) and go on from the cut")
a = ap.parse_args()
torch.set_num_threads(1)
t0 = time.perf_counter()
x, y = load_mnist("train", a.data_dir)
tr, va = validation_split(len(x), 0.1, seed=0)
train, val = (x[tr], y[tr]), (x[va], y[va])
torch.manual_seed(a.seed)
plain = build_model(a.model)
if a.pre and not a.from_posterior:
    fit(plain, train, TrainConfig(a.pre, a.bs, a.pre_lr, 0.0, a.seed), progress=False)
pre_err = None if a.from_posterior else evaluate(plain, *val)
t_pre = time.perf_counter() - t0
origin = None
if a.origin is not None:
    first = next(n for n, m in plain.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    origin = {first: a.origin}
mv = {"lenet300": {"fc1": a.clip}, "lenet5": {"conv1": a.clip}}[a.model] if a.clip else None
b = bayesianize(plain, a.prior, keep_weights=a.pre > 0, input_origin=origin, max_var=mv)
scale = {k: v for k, v in (("variance", a.var), ("scale", a.scale), ("mean", a.mean)) if v != 1.0}
cfg = TrainConfig(a.epochs, a.bs, a.lr, a.warmup, a.seed, kl_weight=a.kl, lr_schedule=a.sched,
                  lr_decay_epochs=a.decay, lr_scale=scale, eval_every=max(1, a.epochs // 4), z_draw=a.z_draw)


def staged(row: dict) -> None:
    """--stage-from: switch off the groups the prior's default threshold prunes now (they stay off)."""
    if a.stage_from is not None and row["epoch"] >= a.stage_from:
        apply_masks(b, group_masks(b, None))
        row["groups_on"] = {n: int(m.group_mask.sum()) for n, m in b.named_modules() if hasattr(m, "group_mask")}


# staged: the switched-off groups' weights decay towards 0, so denormals are flushed
if a.from_posterior:
    b.load_state_dict(torch.load(a.from_posterior))
    hist = []
else:
    with flush_denormals() if a.stage_from is not None else contextlib.nullcontext():
        hist = fit(b, train, cfg, test=val, progress=False, on_epoch=staged).history
stages = [(r["epoch"], r["groups_on"]) for r in hist if "groups_on" in r]
unc = evaluate(b, *val)
if a.save_posterior:
    Path(a.save_posterior).mkdir(parents=True, exist_ok=True)
    torch.save(b.state_dict(), Path(a.save_posterior) / f"{a.tag}.pt")
rules = {"histogram": {k: c.value for k, c in histogram_thresholds(b, no_split=a.no_split).items()},
         "default": None, "recipe": model_recipe(a.model).thresholds.get(a.prior)}
if a.target_kept is not None:
    rules["target"] = {k: c.value for k, c in size_target_thresholds(b, target_kept=a.target_kept / 100).items()}
others = {}
for name, t in rules.items():
    try:
        r = compress(b, t)
    except PruneError as e:  # a rule that empties a layer (the horseshoe's default threshold, say) is a result too
        others[name] = str(e)
        continue
    others[name] = (round(evaluate(r.model, *val), 2), round(r.report["weights_kept_pct"], 2), r.report["architecture"])
ft_rules = a.rule.split(",")
unknown = [r for r in ft_rules if r not in rules]
if unknown:
    sys.exit(f"--rule: no rule {unknown[0]!r} in this run (have: {', '.join(rules)})")
th = rules[ft_rules[0]]
res = compress(b, th)
err = evaluate(res.model, *val)
out = {"tag": a.tag, "command": "benchmarks/recipe_search.py " + shlex.join(sys.argv[1:]), "args": vars(a), "pre_val": pre_err, "val_unc": unc, "val": err, "kept": res.report["weights_kept_pct"],
       "arch": res.report["architecture"], "thr": th, "rules": others}


def fine_tuned(posterior: dict, th, kl: float | None = None) -> tuple[dict, dict]:
    """Cut a copy of the posterior at `th`, fine-tune it `--ft` epochs (KL weight `kl`, default the run's) and
    measure it: (validation figures, the compression's report)."""
    b.load_state_dict(posterior)
    keeps = group_masks(b, th)
    apply_masks(b, keeps)
    before = {}
    with flush_denormals():
        fit(b, train, finetune_config(cfg, a.ft, a.ft_lr, kl), progress=False)
        if a.mean_ft:
            before = dict(ft_val_bayes=evaluate(compress(b, th, keeps=keeps).model, *val))
            fit(b, train, mean_config(cfg, a.mean_ft, a.ft_lr), progress=False)
    res = compress(b, th, keeps=keeps)
    return before | dict(ft_val_unc=evaluate(b, *val), ft_val=evaluate(res.model, *val),
                         ft_kept=res.report["weights_kept_pct"], ft_arch=res.report["architecture"]), res.report


if a.ft:
    posterior = copy.deepcopy(b.state_dict())
    out["ft_rules"] = {}
    for name in ft_rules:
        fig, _ = fine_tuned(posterior, rules[name])
        out["ft_rules"][name] = fig
        if name == ft_rules[0]:
            out.update(fig)
    if a.ft_kl:
        out["ft_kl"] = {}
        for kl in a.ft_kl.split(","):
            t_ft = time.perf_counter()
            fig, report = fine_tuned(posterior, rules[ft_rules[0]], float(kl))
            out["ft_kl"][kl] = fig | dict(bits=report["bits"], cr_fast=report.get("cr_fast"),
                                          seconds=time.perf_counter() - t_ft)
out["seconds"] = time.perf_counter() - t0
out["pre_seconds"] = t_pre
SELECTION = ("validation", "one configuration of the fast recipe's search, trained on 90% of the training set and "
             "measured on the other 10% (validation_split(60000, 0.1, seed=0), benchmarks/recipe_search.py); the test "
             "set is never read")
if a.note:
    out["note"] = a.note
if stages:
    out["stages"] = stages
out["curve"] = [(r["epoch"], round(r.get("test_error", -1), 2), r.get("groups_kept")) for r in hist if "test_error" in r]
out = stamp(out, *SELECTION)
print(json.dumps(out))
with open(a.out, "a") as f:
    f.write(json.dumps(out) + "\n")
