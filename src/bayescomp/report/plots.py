"""Figures of a run, written as PNG files: log α histograms, weights before/after pruning, the
error-vs-size Pareto front of a sweep, and the training curves.

matplotlib is an optional dependency (``pip install 'bayescomp[plots]'``). It is imported when a
figure is drawn, and only through its object-oriented API on an Agg canvas: no pyplot, no global
backend switch, nothing shown on screen, safe in a headless process or a test.
Every function returns the path it wrote; the file appears complete or not at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.masks import LayerMask
from ..compress.rules import is_linear
from ..compress.thresholds import choose_thresholds
from ..nn import GroupSparseLayer
from .pareto import pareto_front


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("bayescomp's plots need matplotlib: pip install 'bayescomp[plots]'") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _as_float(value: Any) -> float:
    return float(value.value) if hasattr(value, "value") else float(value)


def _threshold_map(model: nn.Module, thresholds: Any) -> dict[str, float]:
    if isinstance(thresholds, Mapping):
        thresholds = {n: _as_float(v) for n, v in thresholds.items()}
    elif thresholds is not None:
        thresholds = _as_float(thresholds)
    return choose_thresholds(model, thresholds)


@torch.no_grad()
def score_data(model: nn.Module, thresholds: Any) -> dict[str, dict[str, Any]]:
    """What the log α figure draws, JSON-ready: per group-sparse layer, its scores, its threshold and its
    prior's noise floor. `thresholds`: None (the priors' defaults), a float, or {layer: float or ThresholdChoice}."""
    resolved = _threshold_map(model, thresholds)
    return {name: {"log_alpha": m.log_alpha().detach().double().cpu().tolist(), "threshold": resolved[name],
                   "noise_floor": float(getattr(m, "noise_floor", m.default_threshold))}
            for name, m in model.named_modules() if isinstance(m, GroupSparseLayer)}


def plot_score_histograms(scores: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *,
                          suggested: Mapping[str, Any] | None = None, bins: int = 50) -> Path:
    """One panel per layer of `scores` (`score_data`): the histogram of its log α, its threshold as a red line,
    and `suggested` thresholds (e.g. `histogram_thresholds(model)`) as dashed lines."""
    if not scores:
        raise ValueError("no group-sparse layer to draw")
    ncols = min(3, len(scores))
    nrows = math.ceil(len(scores) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (name, layer) in zip(axes, scores.items(), strict=False):
        la = torch.tensor(layer["log_alpha"], dtype=torch.float64)
        finite = la[torch.isfinite(la)]
        t = float(layer["threshold"])
        kept = int((la < t).sum())
        ax.hist(finite.numpy(), bins=bins, color="#4c72b0", alpha=0.85)
        ax.axvline(t, color="#c44e52", lw=2, label=f"threshold {t:.2f}")
        if suggested is not None and name in suggested:
            s = _as_float(suggested[name])
            if math.isfinite(s):
                ax.axvline(s, color="#55a868", lw=1.5, ls="--", label=f"suggested {s:.2f}")
        ax.set_title(f"{name}: {kept}/{la.numel()} groups kept", fontsize=10)
        ax.set_xlabel("log α (high = prunable)")
        ax.set_ylabel("groups")
        if la.numel() > finite.numel():
            ax.text(0.98, 0.95, f"{la.numel() - finite.numel()} non-finite", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[len(scores):]:
        ax.set_axis_off()
    return _save(fig, path)


def plot_log_alpha_histograms(model: nn.Module, thresholds: Any, path: str | os.PathLike, *,
                              suggested: Mapping[str, Any] | None = None, bins: int = 50) -> Path:
    """One panel per group-sparse layer: the histogram of its log α, the threshold as a red line
    (`score_data`, `plot_score_histograms`).

    `thresholds`: None (the priors' defaults), a float, or {layer: float or ThresholdChoice}.
    `suggested`: other thresholds to show as dashed lines (e.g. `histogram_thresholds(model)`).
    """
    return plot_score_histograms(score_data(model, thresholds), path, suggested=suggested, bins=bins)


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    w = module.posterior_mean() if isinstance(module, GroupSparseLayer) else module.weight
    return w.detach().double().cpu()


@torch.no_grad()
def weight_data(model: nn.Module, masks: Mapping[str, LayerMask] | None) -> dict[str, dict[str, Any]]:
    """What the weights figure draws: per weighted layer, |E[w]| (float16, one row per output) and the mask of
    the weights kept, its kept inputs and outputs, and whether it is a Linear layer.

    `masks`: the decision, `compress(...).masks` — for a chain also `compression_masks` (None: the
    priors' default thresholds); for a model that is not an `nn.Sequential` chain, the masks of its
    graph compression (`graph_compress(...).masks`), whose layers are drawn in the graph's order.
    """
    from ..compress import compression_masks, kept_weights

    if masks is None:
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"{type(model).__name__} is not an nn.Sequential chain: pass masks=, the decision of "
                             "compress(model, thresholds, example_input=...)")
        masks = compression_masks(model, None)
    layers = [(n, model.get_submodule(n)) for n in masks]
    out = {}
    for name, m in layers:
        w = _weight_matrix(m)
        out[name] = {"mean_abs": w.abs().reshape(w.shape[0], -1).clamp(max=65504).half(),
                     "keep": kept_weights(m, masks[name]).cpu().reshape(w.shape[0], -1),
                     "shape": list(w.shape), "in_mask": masks[name].in_mask.cpu().clone(),
                     "out_mask": masks[name].out_mask.cpu().clone(), "linear": bool(is_linear(m))}
    return out


def plot_weight_data(data: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """|E[w]| of every weighted layer of `data` (`weight_data`) before and after pruning (a conv kernel is shown
    as a row per output channel); when the first layer is a Linear layer with 784 inputs, also the kept input
    pixels as a 28×28 image."""
    layers = list(data.items())
    if not layers:
        raise ValueError("the model has no weighted layer to draw")
    first = layers[0][1]
    pixels = bool(first["linear"]) and first["in_mask"].numel() == 784
    ncols = 3 if pixels else 2
    fig = _figure(4.0 * ncols, 2.8 * len(layers))
    axes = fig.subplots(len(layers), ncols, squeeze=False)
    for row, (name, layer) in enumerate(layers):
        before = layer["mean_abs"].double()
        after = before * layer["keep"]
        vmax = float(torch.quantile(before.flatten()[:1_000_000].float(), 0.99)) or 1.0
        kept_rows, kept_cols = int(layer["out_mask"].sum()), int(layer["in_mask"].sum())
        for col, (mat, title) in enumerate(((before, f"{name}: |E[w]| {tuple(layer['shape'])}"),
                                            (after, f"{name} pruned: {kept_rows} out × {kept_cols} in kept"))):
            ax = axes[row, col]
            ax.imshow(mat.numpy(), aspect="auto", cmap="Greys", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("input" if layer["linear"] else "input × kernel")
            ax.set_ylabel("output")
        if pixels:
            ax = axes[row, 2]
            if row == 0:
                ax.imshow(layer["in_mask"].reshape(28, 28).double().numpy(), cmap="Greys", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_title(f"input pixels kept: {kept_cols}/784", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_axis_off()
    return _save(fig, path)


def plot_weights(model: nn.Module, masks: Mapping[str, LayerMask] | None, path: str | os.PathLike) -> Path:
    """|E[w]| of every weighted layer before and after pruning (`weight_data`, `plot_weight_data`)."""
    return plot_weight_data(weight_data(model, masks), path)


def plot_pareto(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, x: str = "weights_kept_pct",
                y: str = "test_error", label: str | None = None, chosen: int | None = None) -> Path:
    """Error against size for a sweep's points; the Pareto front joined and circled, the chosen point
    starred (`chosen`: an index into `points`; None: the point with the highest "elbo", if any).

    A point's "pareto" flag is used when present, else the front is computed (`pareto.pareto_front`).
    `label`: the key written beside each point (default "tau0", else "threshold", if present).
    """
    pts = list(points)
    usable = [i for i, p in enumerate(pts) if p.get(x) is not None and p.get(y) is not None]
    if not usable:
        raise ValueError(f"no point has both {x!r} and {y!r}")
    front = [bool(p["pareto"]) if "pareto" in p else f for p, f in zip(pts, pareto_front(pts, (y, x)), strict=True)]
    if label is None:
        label = next((k for k in ("tau0", "threshold") if any(k in p for p in pts)), None)
    if chosen is None:
        elbos = [(p["elbo"], i) for i, p in enumerate(pts) if p.get("elbo") is not None and math.isfinite(p["elbo"])]
        chosen = max(elbos)[1] if elbos else None
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    xs = [float(pts[i][x]) for i in usable]
    ys = [float(pts[i][y]) for i in usable]
    ax.scatter(xs, ys, color="#8c8c8c", s=28, zorder=2, label="runs")
    on = sorted((float(pts[i][x]), float(pts[i][y])) for i in usable if front[i])
    if on:
        ax.plot([p[0] for p in on], [p[1] for p in on], "-o", color="#4c72b0", mfc="none", ms=10, zorder=3,
                label="Pareto front")
    if chosen is not None and pts[chosen].get(x) is not None and pts[chosen].get(y) is not None:
        ax.scatter([float(pts[chosen][x])], [float(pts[chosen][y])], marker="*", s=260, color="#c44e52", zorder=4,
                   label="highest ELBO" if pts[chosen].get("elbo") is not None else "chosen")
    if label is not None:
        for i in usable:
            if pts[i].get(label) is not None:
                v = pts[i][label]
                text = f"{v:g}" if isinstance(v, (int, float)) else (f"#{i}" if isinstance(v, Mapping) else str(v))
                ax.annotate(text, (float(pts[i][x]), float(pts[i][y])), textcoords="offset points", xytext=(5, 5),
                            fontsize=8)
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel({"weights_kept_pct": "weights kept (%)", "cr_fast": "compression rate (fast)"}.get(x, x))
    ax.set_ylabel({"test_error": "test error (%)"}.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Per epoch: loss (and its data part), KL, train/test error, groups kept per layer (metrics.jsonl rows)."""
    rows = list(history)
    if not rows:
        raise ValueError("no epochs in the history")
    ep = [r.get("epoch", i + 1) for i, r in enumerate(rows)]

    def series(key):
        return [(e, r[key]) for e, r in zip(ep, rows, strict=True) if r.get(key) is not None]

    fig = _figure(10.0, 6.5)
    axes = fig.subplots(2, 2).flatten()
    marker = "o" if len(rows) < 30 else None
    for key, lab in (("loss", "loss = NLL + β·KL/N"), ("nll", "NLL")):
        s = series(key)
        if s:
            axes[0].plot(*zip(*s, strict=True), marker=marker, label=lab)
    axes[0].set_title("training loss (per example)")
    kl = series("kl")
    if kl:
        axes[1].plot(*zip(*kl, strict=True), marker=marker, color="#dd8452")
        if all(v > 0 for _, v in kl):
            axes[1].set_yscale("log")
    axes[1].set_title("KL(q || p) (nats)")
    for key, lab in (("train_error", "train"), ("test_error", "test")):
        s = series(key)
        if s:
            axes[2].plot(*zip(*s, strict=True), marker=marker, label=lab)
    axes[2].set_title("error (%)")
    names: list[str] = []
    for r in rows:
        for n in r.get("groups_kept") or {}:
            if n not in names:
                names.append(n)
    for n in names:
        s = [(e, r["groups_kept"][n]) for e, r in zip(ep, rows, strict=True) if n in (r.get("groups_kept") or {})]
        axes[3].plot(*zip(*s, strict=True), marker=marker, label=n)
    axes[3].set_title("groups kept (default thresholds)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


__all__ = ["plot_log_alpha_histograms", "plot_pareto", "plot_score_histograms", "plot_training_curves",
           "plot_weight_data", "plot_weights", "score_data", "weight_data"]
