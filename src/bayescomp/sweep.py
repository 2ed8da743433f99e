"""Sweeps: train at several horseshoe scales τ0, or re-threshold one trained run, and compare.

* `sweep(base_opts, tau0s, out_dir)`: one full run (`pipeline.run`, prior ghs) per τ0 into
  ``out_dir/tau0_<v>/``, then one point per run — test error, weights kept, compression rates, the
  ELBO — the Pareto front of (test error, weights kept), and the τ0 that the evidence (the ELBO)
  prefers. Everything goes to ``out_dir/sweep.json`` (written atomically). Runs already in
  ``out_dir`` with the same settings are reused, so an interrupted sweep continues where it stopped.
* `threshold_sweep(run_dir, values)`: the same points for one trained posterior compressed at
  several thresholds (no retraining).

The ELBO of a run. Training minimises, per step, nll_mean + β·KL/N, and the per-epoch "loss" of
metrics.jsonl is its average over the epoch. At β = 1 that is the negative ELBO divided by N, so
−N·loss is a cheap estimate (`elbo_from_loss`); but it averages over parameters that moved during
the epoch, over one noise sample per example, and over KL values of different steps. The `elbo` of
a point is computed instead after training, in one pass over the training set with the final
posterior: ELBO = −(Σ_i nll_i + KL), the data term estimated with one local-reparameterisation
sample per example (`training_elbo`, seeded). Higher is better; it is comparable between τ0 values
because the data set and the likelihood are the same (τ0 changes the prior, and the ELBO is a
lower bound on the evidence of that prior).

Both files end with `selection` and `selection_note`, as every results file of benchmarks/results/ does: a
threshold sweep chooses nothing ("none": every threshold's test error is reported); a τ0 sweep's one choice, the
ELBO's τ0, reads the training set only ("rule"), and its note says how each run's thresholds were set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import atomic_write
from .compress import PruneError, compress
from .convert import group_layers, kl_divergence
from .optioncheck import check_thresholds
from .pipeline import (
    POSTERIOR_FILE,
    REPORT,
    RunError,
    RunOptions,
    example_input,
    load_data,
    load_posterior,
    run,
    validate,
)
from .report.pareto import PARETO_KEYS, pareto_front
from .rundir import check_out
from .runoptions import check_option
from .runreport import read_report, read_run
from .train import distributed, evaluate, predict
from .train.checkpoint import load_checkpoint

SWEEP_FILE = "sweep.json"
THRESHOLD_SWEEP_FILE = "threshold_sweep.json"
#: a threshold sweep's selection: it reports every point and chooses nothing
THRESHOLD_SWEEP_SELECTION = ("none", "a sweep: every threshold's test error is reported; nothing is chosen from it")
#: options that do not change a run's result (ignored when an existing run folder is reused)
_NOT_DEFINING = ("data_dir", "verify_data")


@torch.no_grad()
def training_elbo(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000, samples: int = 1,
                  seed: int = 0) -> dict[str, float]:
    """ELBO = −(Σ_i nll_i + KL) of a Bayesian model on its training set (nats).

    The data term is E_q[−log p(y|x, w)], estimated with `samples` local-reparameterisation samples
    per example (the group-sparse layers in training mode, everything else, e.g. batch norm, in
    evaluation mode). The global random state is left as it was.
    """
    layers = group_layers(model)
    if not layers:
        raise ValueError("the model has no group-sparse layer; the ELBO needs a Bayesian model")
    if samples < 1:
        raise ValueError(f"samples must be ≥ 1, got {samples}")
    device = next(model.parameters()).device
    was = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    nll = 0.0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.eval()
        for m in layers.values():
            m.train()
        try:
            for _ in range(samples):
                for i in range(0, len(x), batch_size):
                    out = model(x[i : i + batch_size].to(device))
                    nll += float(F.cross_entropy(out, y[i : i + batch_size].to(device), reduction="sum"))
            kl = float(kl_divergence(model))
        finally:
            model.train(was)
    nll /= samples
    return {"elbo": -(nll + kl), "nll_sum": nll, "kl": kl, "n": len(x), "samples": samples}


def _elbo_from_history(history: Sequence[Mapping[str, Any]], n: int) -> float | None:
    """−N·loss of the last epoch when it ran at β = 1 (else None): see the module doc."""
    if not history:
        return None
    last = history[-1]
    if last.get("loss") is None or abs(float(last.get("beta", 1.0)) - 1.0) > 1e-12:
        return None
    return -float(last["loss"]) * n


def _tau_dir(tau0: float) -> str:
    return f"tau0_{tau0:g}"


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if k not in _NOT_DEFINING}


def _training_set(opts: RunOptions) -> tuple[Tensor, Tensor]:
    """The examples a run trained on (the same seeded subset, minus any validation hold-out)."""
    (x, y), _ = load_data(opts.model, opts.data_dir, opts.train_subset, opts.seed, opts.verify_data)
    if getattr(opts, "auto_thresholds", None) == "validation":
        from .compress.thresholds import validation_split

        train_idx, _ = validation_split(len(x), opts.val_fraction, opts.seed)
        x, y = x[train_idx], y[train_idx]
    return x, y


def sweep_selection(opts: RunOptions) -> tuple[str, str]:
    """The `selection` and `selection_note` of sweep.json: "rule" (the ELBO's τ0 is chosen on the training set
    alone; every τ0's test error is reported), the note saying where each run's thresholds came from."""
    auto = getattr(opts, "auto_thresholds", None)
    if auto == "validation":
        cut = "thresholds chosen on a split held out of the training set"
    elif auto:
        cut = f"thresholds by the {auto} rule on the posterior"
    elif opts.thresholds is not None:
        cut = "thresholds as given to the sweep (how they were chosen is not recorded)"
    else:
        cut = "thresholds the prior's defaults"
    return "rule", (f"every tau0's test error is reported; the one choice, elbo_choice, is by the training-set ELBO "
                    f"after training (no held-out or test data); {cut}")


def _run_point(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "test_error": report.get("test_error"),
        "test_error_uncompressed": report.get("test_error_uncompressed"),
        "weights_kept": report.get("weights_kept"),
        "weights_kept_pct": report.get("weights_kept_pct"),
        "cr_architecture": report.get("cr_architecture"),
        "cr_fast": report.get("cr_fast"),
        "cr_file": report.get("cr_file"),
        "architecture": report.get("architecture"),
        "bits": report.get("bits"),
    }


def sweep(
    base_opts: RunOptions,
    tau0s: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    progress: bool = False,
    force: bool = False,
    reuse: bool = True,
    elbo_samples: int = 1,
) -> dict[str, Any]:
    """Train one group-horseshoe run per τ0 and compare them; return (and write) sweep.json's content.

    Each run is `pipeline.run(replace(base_opts, prior="ghs", tau0=v), out_dir/tau0_<v>)`. With
    `reuse` a finished run folder made with the same settings is read instead of retrained (one
    with other settings is an error unless `force`, which retrains it). Points::

        {tau0, run_dir, test_error, test_error_uncompressed, weights_kept, weights_kept_pct,
         cr_architecture, cr_fast, cr_file (None if the report has none), architecture, bits,
         elbo, nll_sum, kl, elbo_from_loss, pareto}

    `pareto`: on the front of (test_error, weights_kept_pct) (`pareto_front`); `elbo_choice`: the
    τ0 with the highest ELBO. Under torchrun, every process trains; rank 0 alone evaluates, writes
    and returns the result (the others return {}).
    """
    values = [float(t) for t in tau0s]
    if not values:
        raise RunError("a sweep needs at least one τ0")
    bad = [t for t in values if not (t > 0 and math.isfinite(t))]
    if bad:
        raise RunError(f"τ0 values must be positive and finite, got {bad}")
    if len({_tau_dir(t) for t in values}) != len(values):
        raise RunError(f"τ0 values must be distinct, got {values}")
    out = check_out(out_dir)
    for t in values:  # every run's options, before any folder is made or any data loaded
        validate(replace(base_opts, prior="ghs", tau0=t))
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    train: tuple[Tensor, Tensor] | None = None
    points: list[dict[str, Any]] = []
    for t in values:
        opts = replace(base_opts, prior="ghs", tau0=t)
        run_dir = out / _tau_dir(t)
        report: dict[str, Any] = {}
        wanted = {k: v for k, v in asdict(opts).items() if k != "extra"} | opts.extra
        if reuse and not force and (run_dir / REPORT).is_file():
            report = read_report(run_dir)
            have, want = _comparable(report.get("config", {})), _comparable(wanted)
            differ = sorted(k for k in set(have) & set(want) if have[k] != want[k])
            if differ:
                what = ", ".join(f"{k}={have[k]!r} (now {want[k]!r})" for k in differ)
                raise RunError(f"{run_dir} holds a run with other settings: {what}; remove it, choose another "
                               "folder, or pass force to retrain it")
        else:
            report = run(opts, run_dir, progress=progress, force=force)
        if not distributed.is_main():
            continue
        if train is None:
            train = _training_set(opts)
        bmodel = load_posterior(run_dir / POSTERIOR_FILE)
        elbo = training_elbo(bmodel, *train, samples=elbo_samples, seed=opts.seed)
        point = {"tau0": t, "run_dir": run_dir.name, **_run_point(report), "elbo": elbo["elbo"],
                 "nll_sum": elbo["nll_sum"], "kl": elbo["kl"],
                 "elbo_from_loss": _elbo_from_history(report.get("history", []), len(train[0]))}
        points.append(point)
    if not distributed.is_main():
        return {}
    for p, on in zip(points, pareto_front(points, PARETO_KEYS), strict=True):
        p["pareto"] = on
    best = max(points, key=lambda p: p["elbo"])
    result = {
        "kind": "tau0",
        "prior": "ghs",
        "pareto_keys": list(PARETO_KEYS),
        "elbo_choice": best["tau0"],
        "elbo_choice_dir": best["run_dir"],
        "elbo_note": "elbo = −(Σ nll + KL) over the training set after training (one sample per example); "
                     "elbo_from_loss = −N·(last epoch's mean loss), valid at β = 1",
        "base_options": _comparable({k: v for k, v in asdict(base_opts).items() if k != "extra"}),
        "points": points,
    }
    result["selection"], result["selection_note"] = sweep_selection(base_opts)
    atomic_write(out / SWEEP_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return result


def threshold_sweep(
    run_dir: str | os.PathLike,
    values: Sequence[float | Mapping[str, float]],
    *,
    data_dir: str | None = None,
    relative: bool = False,
    layer: str | None = None,
    bit_accounting: str | None = None,
    variance_scale: float | None = None,
    out: str | os.PathLike | None = None,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Compress one trained run at each threshold setting and measure it (no retraining).

    `values`: one float per setting (every layer), or {layer: float}; with `relative`, each float is
    added to the run's own per-layer thresholds (report.json's "thresholds"). With `layer`, each float
    moves that layer's threshold only (set to it, or offset by it with `relative`) and every other
    layer keeps the run's own. A setting that empties a layer gives a point with `skipped` (the reason)
    and no figures. Points::

        {threshold, test_error, weights_kept, weights_kept_pct, cr_architecture, cr_fast, architecture,
         bits, pareto}

    Errors are on the test set (this reports; it chooses nothing). `bit_accounting` and
    `variance_scale` default to the run's own (report.json), else "code" and 1. `out`: also write
    {"kind": "threshold", ...} there as JSON (atomically). `verify=False` skips the data files'
    checksum check (data you made yourself). A graph run (residual, concatenating model) is compressed
    through its torch.fx graph, as `pipeline.run` compressed it.
    """
    run_dir = Path(run_dir)
    posterior = run_dir / POSTERIOR_FILE
    if not posterior.is_file():
        raise RunError(f"no trained posterior at {posterior}")
    if not values:
        raise RunError("--values: a threshold sweep needs at least one value")
    for v in values:
        check_thresholds(v, "--values")
    check_option("variance_scale", variance_scale)  # (None: the run's own)
    if bit_accounting is not None:
        check_option("bit_accounting", bit_accounting)
    previous = read_run(run_dir, required=False) or {}
    bmodel = load_posterior(posterior)
    model_name = previous.get("model") or load_checkpoint(posterior)["model"]
    base = previous.get("thresholds") or {}
    if bit_accounting is None:
        bit_accounting = previous.get("bit_accounting") or "code"
    if variance_scale is None:
        variance_scale = float(previous.get("variance_scale") or 1.0)
    if (relative or layer is not None) and not base:
        raise RunError(f"{run_dir / REPORT} gives no per-layer thresholds to start from")
    if layer is not None and layer not in base:
        raise RunError(f"no group-sparse layer {layer!r} in this run; its layers: {', '.join(base)}")
    if layer is not None and any(isinstance(v, Mapping) for v in values):
        raise RunError("a one-layer threshold sweep takes plain numbers")
    if relative and any(isinstance(v, Mapping) for v in values):
        raise RunError("relative threshold sweeps take plain numbers (offsets)")
    _, test = load_data(model_name, data_dir, 1, verify=verify)
    example = example_input(model_name)
    err_uncompressed = evaluate(bmodel, *test)
    points: list[dict[str, Any]] = []
    for v in values:
        if layer is not None:
            th: float | dict[str, float] = {n: float(b) for n, b in base.items()}
            th[layer] = th[layer] + float(v) if relative else float(v)
        elif relative:
            th = {n: float(b) + float(v) for n, b in base.items()}
        else:
            th = dict(v) if isinstance(v, Mapping) else float(v)
        label = dict(v) if isinstance(v, Mapping) else float(v)
        try:
            c = compress(bmodel, th, bit_accounting=bit_accounting, variance_scale=variance_scale,
                         example_input=example)
        except PruneError as exc:
            points.append({"threshold": label, "skipped": str(exc), "test_error": None, "weights_kept": None,
                           "weights_kept_pct": None})
            continue
        err = 100.0 * float((predict(c.model, test[0]) != test[1]).float().mean())
        points.append({"threshold": label, "thresholds": c.report["thresholds"], "test_error": err,
                       **{k: c.report[k] for k in ("weights_kept", "weights_kept_pct", "cr_architecture", "cr_fast",
                                                   "architecture", "bits")}})
    for p, on in zip(points, pareto_front(points, PARETO_KEYS), strict=True):
        p["pareto"] = on
    if out is not None:
        doc = {"kind": "threshold", "run_dir": str(run_dir), "relative": relative, "layer": layer,
               "bit_accounting": bit_accounting,
               "variance_scale": variance_scale,
               "test_error_uncompressed": err_uncompressed, "pareto_keys": list(PARETO_KEYS), "points": points}
        doc["selection"], doc["selection_note"] = THRESHOLD_SWEEP_SELECTION
        atomic_write(out, (json.dumps(doc, indent=2) + "\n").encode())
    return points


__all__ = ["PARETO_KEYS", "SWEEP_FILE", "THRESHOLD_SWEEP_FILE", "THRESHOLD_SWEEP_SELECTION", "pareto_front", "sweep",
           "sweep_selection", "threshold_sweep", "training_elbo"]
