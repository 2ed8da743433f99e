"""The commands on compressed-model files: `evaluate`, `pack`, `export`, `unpack` (registered on the `bayescomp`
group by `cli`), and the command line's handling of a user's error (`fail`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .clioptions import run_options, run_values
from .report.table import format_table

# Errors a user can cause: printed in one line, exit status 1 (usage errors: 2, by click).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, RuntimeError, OSError, FloatingPointError)


def fail(exc: BaseException) -> None:
    """Print a user's error in one line and exit with status 1."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def load_any(path: Path):
    """A compressed model from a run folder (model.bcz, else model.pt), a .bcz file or a plain .pt file."""
    from .io import load_plain, read_packed

    if path.is_dir():
        if (path / "model.bcz").is_file():
            return read_packed(path / "model.bcz")
        return load_plain(path / "model.pt")
    if not path.exists():
        raise FileNotFoundError(f"run directory or model file not found: {path}")
    if path.suffix == ".bcz":
        return read_packed(path)
    return load_plain(path)


@click.command("evaluate")
@click.argument("run_dir", type=click.Path())
@click.option("--model", "model_name", default=None, help="Zoo model the file was made from (for a bare file).")
@run_options("evaluate")
def evaluate_cmd(run_dir: str, model_name: str | None, **params) -> None:
    """Reload a compressed model (run folder, .bcz or .pt; plain PyTorch) and print its test error."""
    from .factories import load_data
    from .models import MODELS
    from .runreport import read_run
    from .train import evaluate

    values = run_values("evaluate", params)
    try:
        model, meta = load_any(Path(run_dir))
        if Path(run_dir).is_dir():
            meta = {**meta, **(read_run(run_dir, required=False) or {})}
        name = model_name or meta.get("model")
        if name is None:
            raise ValueError(f"{run_dir}: cannot tell which model/dataset this is; pass --model")
        if name not in MODELS:
            raise ValueError(f"--model: unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
        _, (x, y) = load_data(name, values["data_dir"], 1, verify=values["verify_data"])
        err = evaluate(model, x, y)
    except USER_ERRORS as exc:
        fail(exc)
    rows: list[tuple[str, Any]] = [("model", name), ("architecture", meta.get("architecture")),
                                   ("test error (%)", f"{err:.2f}")]
    if meta.get("test_error") is not None:
        rows.append(("reported test error (%)", f"{meta['test_error']:.2f}"))
    click.echo(format_table(rows))


@click.command("pack")
@click.argument("run_dir", type=click.Path())
@click.option("--coder", type=click.Choice(["auto", "ans", "huffman"]), default="auto", show_default=True,
              help="Entropy coder of the weight and index streams (auto: the smallest per stream).")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False), help="File to write (default RUN_DIR/model.bcz).")
def pack_cmd(run_dir: str, coder: str, out: str | None) -> None:
    """Write the packed file (.bcz: sparse indices, entropy-coded weights at the inferred bits) of a run."""
    from types import SimpleNamespace

    from .io import load_plain, packed_report, save
    from .runreport import read_run

    try:
        folder = Path(run_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"run directory not found: {folder}")
        report = read_run(folder)
        model, _ = load_plain(folder / "model.pt")
        bits = {layer["name"]: layer["bits"] for layer in report["layers"] if layer.get("bits") is not None}
        compressed = SimpleNamespace(model=model, bits=bits, report=report)
        target = Path(out) if out else folder / "model.bcz"
        save(compressed, target, coder=coder)
        figures = packed_report(compressed, target)
    except (*USER_ERRORS, KeyError) as exc:
        fail(exc)
    click.echo(format_table([("file", target), ("coder", coder), ("file bytes", figures["file_bytes"]),
                             ("CR file", f"{figures['cr_file']:.1f}x"), ("CR maximum (paper accounting)",
                             f"{figures['cr_max']:.1f}x"), ("entropy floor (bytes)", f"{figures['entropy_bits'] / 8:.0f}")]))


@click.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "safetensors"]), default="onnx", show_default=True)
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="File to write (default RUN_DIR/model.onnx or RUN_DIR/model.safetensors).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="C,H,W",
              help="One example's shape, e.g. 1,28,28; repeat for a model with several inputs "
                   "(default: the shape of the run's dataset).")
def export_cmd(run_dir: str, fmt: str, out: str | None, input_shapes: tuple[str, ...]) -> None:
    """Export the compressed model of a run (or a model file) as ONNX (runs in onnxruntime) or safetensors."""
    import torch

    from .data import input_shape
    from .io.export import export_onnx, export_safetensors
    from .recipes import recipe
    from .runreport import read_run

    shapes = []
    for text in input_shapes:
        try:
            shapes.append(tuple(int(d) for d in text.split(",")))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a shape such as 1,28,28", param_hint="--input-shape") from None
        if not shapes[-1] or min(shapes[-1]) < 1:
            raise click.BadParameter(f"{text!r}: every size must be a positive integer", param_hint="--input-shape")
    try:
        folder = Path(run_dir)
        model, meta = load_any(folder)
        report = (read_run(folder, required=False) or {}) if folder.is_dir() else {}
        target = Path(out) if out else folder / f"model.{fmt}" if folder.is_dir() else folder.with_suffix(f".{fmt}")
        if fmt == "onnx":
            if not shapes:
                shapes = [input_shape(recipe(report.get("model") or meta.get("model")).dataset)]
            export_onnx(model, tuple(torch.zeros(2, *s) for s in shapes), target)
        else:
            export_safetensors(model, target, {k: report.get(k) for k in ("model", "prior", "architecture", "bits")})
    except USER_ERRORS as exc:
        fail(exc)
    click.echo(f"wrote {target}")


@click.command("unpack")
@click.argument("file", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Plain model file to write (.pt).")
def unpack_cmd(file: str, out: str) -> None:
    """Decode a .bcz file into a plain model file (spec + tensors) that `torch`-only code can load."""
    from .io import read_packed, save_plain

    try:
        model, meta = read_packed(file)
        save_plain(out, model, {k: meta.get(k) for k in ("model", "architecture", "bits") if k in meta})
    except USER_ERRORS as exc:
        fail(exc)
    click.echo(f"wrote {out}")


#: the commands of this module, in the order `cli` registers them
FILE_COMMANDS = (evaluate_cmd, pack_cmd, export_cmd, unpack_cmd)
