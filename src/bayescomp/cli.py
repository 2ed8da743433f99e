"""The `bayescomp` command line (also `python -m bayescomp`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from .recipes import TRAINING_RECIPES
from .report.table import format_table, summary_rows

# Errors a user can cause: printed in one line, exit status 1 (usage errors: 2, by click).
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, RuntimeError, OSError, FloatingPointError)


def _parse_per_layer(text: str | None, hint: str) -> float | dict[str, float] | None:
    """ "-3" → every layer; "fc1=-2.8,fc2=-3" → per layer (`hint`: the option, for the error)."""
    if text is None:
        return None
    text = text.strip()
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            out[name.strip()] = float(value)
        return out
    except ValueError:
        raise click.BadParameter(f"expected a number or name=value pairs, got {text!r}", param_hint=hint) from None


def _parse_thresholds(text: str | None) -> float | dict[str, float] | None:
    """ "-3" → every layer; "fc1=-2.8,fc2=-3" → per layer."""
    return _parse_per_layer(text, "--thresholds")


def _parse_clip_var(text: str | None) -> float | dict[str, float] | None:
    """ "0.04" → every layer; "fc1=0.2" → those layers only (the others unclamped)."""
    return _parse_per_layer(text, "--clip-var")


def _parse_lr_scale(text: str | None) -> dict[str, float] | None:
    """ "variance=1,scale=10" → {"variance": 1.0, "scale": 10.0} (the kinds are checked with the other options)."""
    if text is None:
        return None
    parsed = _parse_per_layer(text, "--lr-scale")
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"expected kind=factor pairs (mean, variance, scale), got {text!r}",
                                 param_hint="--lr-scale")
    return parsed


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bayescomp")
def main() -> None:
    """Bayesian Compression: train a group-sparse Bayesian network, prune it, quantise it, store it."""
    from .train.memory import keep_freed_memory

    keep_freed_memory(default=True)  # this process keeps freed heap memory (train/memory.py); opt-in for library users


_RECIPE_DEFAULT = " (default: the recipe's)."

#: options of the training recipe that `compress` and `sweep` share
_KL_WEIGHT = click.option(
    "--kl-weight", type=float, default=1.0, show_default=True,
    help="Final weight β of the KL term: 1 is the ELBO; below 1 keeps more groups and fits better, above 1 prunes more.",
)
_PRETRAIN_EPOCHS = click.option(
    "--pretrain-epochs", type=int, default=0, show_default=True,
    help="Train the plain model this many epochs first, then start the Bayesian model from it.",
)
_INPUT_ORIGIN = click.option(
    "--input-origin", type=float, default=None,
    help="The input value that carries no signal (MNIST here is in [-1, 1], blank -1): the first layer computes "
    "on x - origin, so blank inputs add neither signal nor sampling noise. Folded into the first layer's bias "
    "on compression: the compressed model takes the data as they are.",
)
_NO_SPLIT_HELP = ("--auto-thresholds histogram, in a layer whose log α histogram shows no split: keep every group "
                  "(keep), or cut at the prior's noise floor, log α 2 for ghs and -3 for gnj (floor)")


def _no_split(default: str | None):
    """--no-split: with `default` None, the run's own choice unless given (prune, finetune)."""
    help_text = _NO_SPLIT_HELP + ("." if default else "; the run's thresholds are chosen again with it (default: "
                                  "the run's own).")
    return click.option("--no-split", type=click.Choice(["keep", "floor"]), default=default,
                        show_default=default is not None, help=help_text)


_FINETUNE_EPOCHS = click.option(
    "--finetune-epochs", type=int, default=0, show_default=True,
    help="After pruning, train the kept groups' posterior this many epochs more (the learning rate falling to 0), "
    "then compress exactly the groups kept.",
)


@main.command("compress")
@click.option("--model", default="lenet300", show_default=True, help="Model from the zoo (see `bayescomp models`).")
@click.option(
    "--prior", default="gnj", show_default=True, help="Group prior: gnj (normal-Jeffreys) or ghs (horseshoe)."
)
@click.option("--tau0", type=float, default=None, help="Horseshoe: global scale τ0 of the prior (default 1e-5).")
@click.option(
    "--global-kl",
    type=click.Choice(["derived", "paper"]),
    default=None,
    help="Horseshoe: KL of the global scale, derived (default) or the paper-literal variant.",
)
@click.option(
    "--recipe", type=click.Choice(sorted(TRAINING_RECIPES)), default="paper", show_default=True,
    help="Training recipe: fast (from a trained network in minutes) or paper (200 epochs from scratch, the paper's "
    "setting). It sets every option marked 'the recipe's' that you do not give (`bayescomp recipes` lists them).",
)
@click.option("--epochs", type=int, default=None, help="Training epochs" + _RECIPE_DEFAULT)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory (must not exist)."
)
@click.option(
    "--data-dir", default=None, help="Data root holding mnist/ (default: $BAYESCOMP_DATA, else the user cache)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Examples per step" + _RECIPE_DEFAULT)
@click.option("--lr", type=float, default=None, help="Adam learning rate" + _RECIPE_DEFAULT)
@click.option(
    "--lr-scale", default=None,
    help="Learning-rate factors per parameter kind, e.g. variance=1,scale=10 (kinds: mean, variance, scale)"
    + _RECIPE_DEFAULT,
)
@click.option(
    "--lr-schedule", type=click.Choice(["constant", "cosine"]), default=None,
    help="constant: Adam at --lr throughout (the paper). cosine: the rate falls from --lr to 0 along half a cosine"
    + _RECIPE_DEFAULT,
)
@click.option(
    "--lr-decay-epochs", type=float, default=None,
    help="With --lr-schedule cosine: the fall takes only this many last epochs (default: the recipe's; the "
    "paper recipe's: the whole run).",
)
@click.option("--warmup-epochs", type=float, default=None, help="Linear KL warm-up length" + _RECIPE_DEFAULT)
@click.option(
    "--kl-weight", type=float, default=None,
    help="Final weight β of the KL term: 1 is the ELBO; below 1 keeps more groups and fits better, above 1 prunes "
    "more" + _RECIPE_DEFAULT,
)
@click.option("--thresholds", default=None, help="log α thresholds: one number, or name=value pairs (fc1=-2.8,fc2=-3).")
@click.option(
    "--clip-var", default=None,
    help="Clamp σ² ≤ this: one number for every layer, or name=value pairs (fc1=0.2) for those layers only "
    "(default: the model's recipe).",
)
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--train-subset", type=int, default=None, help="Train on N random training examples (quick runs).")
@click.option(
    "--bit-accounting",
    type=click.Choice(["code", "paper"]),
    default="code",
    show_default=True,
    help="Bits per stored weight: 1+E+T (the paper's code) or T (the paper's table).",
)
@click.option(
    "--dataset",
    default=None,
    type=click.Choice(["mnist", "cifar10"]),
    help="Dataset (default: the model's own; must match it).",
)
@click.option("--init-from", default=None, type=click.Path(), help="state_dict of the plain model to start from.")
@click.option(
    "--pretrain-epochs", type=int, default=None,
    help="Train the plain model this many epochs first, then start the Bayesian model from it (default: the "
    "recipe's, 0 with --init-from).",
)
@click.option("--pretrain-lr", type=float, default=None,
              help="Adam's learning rate for --pretrain-epochs (default: the recipe's; the paper recipe's: --lr).")
@_INPUT_ORIGIN
@click.option("--no-augment", is_flag=True, help="CIFAR-10: no random crops and flips.")
@click.option("--no-verify", is_flag=True, help="Skip the published-checksum check (data you made yourself).")
@click.option(
    "--auto-thresholds",
    type=click.Choice(["histogram", "validation"]),
    default=None,
    help="Choose the log α thresholds after training: the split between the two modes of each layer's histogram, "
    "or the most compression within --val-budget on a validation split held out of the training set. With "
    "histogram, --thresholds fc1=2.5 sets the named layers' thresholds and the rule chooses the others'. "
    "Default: the recipe's (none with --thresholds for every layer).",
)
@click.option("--no-split", type=click.Choice(["keep", "floor"]), default=None,
              help=_NO_SPLIT_HELP + _RECIPE_DEFAULT)
@click.option("--val-budget", type=float, default=0.5, show_default=True,
              help="--auto-thresholds validation: allowed increase of the validation error (percentage points).")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="--auto-thresholds validation: share of the training set held out for validation.")
@click.option("--variance-scale", type=float, default=1.0, show_default=True,
              help="Multiply the posterior variances by this before reading each layer's bits (> 1: fewer bits).")
@click.option(
    "--finetune-epochs", type=int, default=None,
    help="After pruning, train the kept groups' posterior this many epochs more (the learning rate falling to 0), "
    "then compress exactly the groups kept" + _RECIPE_DEFAULT,
)
@click.option("--finetune-lr", type=float, default=None,
              help="The fine-tuning's starting learning rate, falling to 0 (default: the recipe's; else --lr).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, or auto (CUDA when available).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT.partial.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress_cmd(
    recipe,
    model,
    prior,
    tau0,
    global_kl,
    epochs,
    out,
    data_dir,
    seed,
    batch_size,
    lr,
    lr_scale,
    lr_schedule,
    lr_decay_epochs,
    warmup_epochs,
    kl_weight,
    thresholds,
    clip_var,
    grad_clip,
    train_subset,
    bit_accounting,
    dataset,
    init_from,
    pretrain_epochs,
    pretrain_lr,
    input_origin,
    no_augment,
    no_verify,
    device,
    auto_thresholds,
    no_split,
    val_budget,
    val_fraction,
    variance_scale,
    finetune_epochs,
    finetune_lr,
    resume,
    force,
    quiet,
) -> None:
    """Train MODEL with a group-sparse prior, compress it, evaluate it, write OUT/."""
    from .models import MODELS
    from .pipeline import RunOptions, run
    from .recipes import recipe_options
    from .train import distributed

    if dataset is not None and model in MODELS and MODELS[model][1] != dataset:
        _fail(ValueError(f"model {model} is built for {MODELS[model][1]}, not {dataset}"))
    parsed_thresholds = _parse_thresholds(thresholds)
    settings = recipe_options(recipe, dict(
        init_from=init_from, thresholds=parsed_thresholds, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr, epochs=epochs,
        batch_size=batch_size, lr=lr, lr_scale=_parse_lr_scale(lr_scale), lr_schedule=lr_schedule,
        lr_decay_epochs=lr_decay_epochs, warmup_epochs=warmup_epochs, kl_weight=kl_weight,
        finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, auto_thresholds=auto_thresholds,
        no_split=no_split), prior=prior)
    opts = RunOptions(
        recipe=recipe,
        init_from=init_from,
        input_origin=input_origin,
        augment=not no_augment,
        verify_data=not no_verify,
        device=device,
        model=model,
        prior=prior,
        seed=seed,
        thresholds=parsed_thresholds,
        max_var=_parse_clip_var(clip_var),
        train_subset=train_subset,
        data_dir=data_dir,
        bit_accounting=bit_accounting,
        grad_clip=grad_clip,
        tau0=tau0,
        global_kl=global_kl,
        val_budget=val_budget,
        val_fraction=val_fraction,
        variance_scale=variance_scale,
        **settings,
    )
    command = "bayescomp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = run(opts, out, resume=resume, force=force, progress=not quiet, command=command)
        main_rank = distributed.is_main()
    except _USER_ERRORS as exc:
        _fail(exc)
    finally:
        distributed.cleanup()
    if not main_rank:  # data-parallel: rank 0 reports; the other ranks only trained
        return
    click.echo(format_table(summary_rows(report)))
    click.echo(f"wrote {Path(out) / 'report.json'}")


def _load_any(path: Path):
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


@main.command("evaluate")
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", default=None, help="Data root holding mnist/ (or cifar10/).")
@click.option("--model", "model_name", default=None, help="Zoo model the file was made from (for a bare file).")
@click.option("--no-verify", is_flag=True, help="Skip the published-checksum check (data you made yourself).")
def evaluate_cmd(run_dir: str, data_dir: str | None, model_name: str | None, no_verify: bool) -> None:
    """Reload a compressed model (run folder, .bcz or .pt; plain PyTorch) and print its test error."""
    from .models import MODELS
    from .pipeline import load_data
    from .runreport import read_run
    from .train import evaluate

    try:
        model, meta = _load_any(Path(run_dir))
        if Path(run_dir).is_dir():
            meta = {**meta, **(read_run(run_dir, required=False) or {})}
        name = model_name or meta.get("model")
        if name is None:
            raise ValueError(f"{run_dir}: cannot tell which model/dataset this is; pass --model")
        if name not in MODELS:
            raise ValueError(f"--model: unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
        _, (x, y) = load_data(name, data_dir, 1, verify=not no_verify)
        err = evaluate(model, x, y)
    except _USER_ERRORS as exc:
        _fail(exc)
    rows: list[tuple[str, Any]] = [("model", name), ("architecture", meta.get("architecture")),
                                   ("test error (%)", f"{err:.2f}")]
    if meta.get("test_error") is not None:
        rows.append(("reported test error (%)", f"{meta['test_error']:.2f}"))
    click.echo(format_table(rows))


@main.command("pack")
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
    except (*_USER_ERRORS, KeyError) as exc:
        _fail(exc)
    click.echo(format_table([("file", target), ("coder", coder), ("file bytes", figures["file_bytes"]),
                             ("CR file", f"{figures['cr_file']:.1f}x"), ("CR maximum (paper accounting)",
                             f"{figures['cr_max']:.1f}x"), ("entropy floor (bytes)", f"{figures['entropy_bits'] / 8:.0f}")]))


@main.command("export")
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
        model, meta = _load_any(folder)
        report = (read_run(folder, required=False) or {}) if folder.is_dir() else {}
        target = Path(out) if out else folder / f"model.{fmt}" if folder.is_dir() else folder.with_suffix(f".{fmt}")
        if fmt == "onnx":
            if not shapes:
                shapes = [input_shape(recipe(report.get("model") or meta.get("model")).dataset)]
            export_onnx(model, tuple(torch.zeros(2, *s) for s in shapes), target)
        else:
            export_safetensors(model, target, {k: report.get(k) for k in ("model", "prior", "architecture", "bits")})
    except _USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"wrote {target}")


@main.command("unpack")
@click.argument("file", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Plain model file to write (.pt).")
def unpack_cmd(file: str, out: str) -> None:
    """Decode a .bcz file into a plain model file (spec + tensors) that `torch`-only code can load."""
    from .io import read_packed, save_plain

    try:
        model, meta = read_packed(file)
        save_plain(out, model, {k: meta.get(k) for k in ("model", "architecture", "bits") if k in meta})
    except _USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"wrote {out}")


@main.command("prune")
@click.argument("run_dir", type=click.Path())
@click.option("--thresholds", default=None,
              help="log α thresholds: one number, or name=value pairs (layers not named keep the run's own).")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory for the new result."
)
@_no_split(None)
@click.option("--data-dir", default=None, help="Data root.")
@click.option("--bit-accounting", type=click.Choice(["code", "paper"]), default="code", show_default=True)
@click.option("--variance-scale", type=float, default=1.0, show_default=True,
              help="Multiply the posterior variances by this before reading each layer's bits (> 1: fewer bits).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-verify", is_flag=True, help="Skip the published-checksum check (data you made yourself).")
def prune_cmd(
    run_dir: str, thresholds: str | None, no_split: str | None, out: str, data_dir: str | None, bit_accounting: str,
    variance_scale: float, force: bool, no_verify: bool,
) -> None:
    """Compress the trained posterior of RUN_DIR again at other thresholds (no retraining).

    RUN_DIR may also be a run still training (or stopped): its newest checkpoint in RUN_DIR.partial is
    compressed, at the thresholds the run would choose (or --thresholds), and the run goes on untouched.
    During its fine-tuning, that is the fine-tuning's checkpoint, with the groups the run decided to keep.
    """
    from .pipeline import recompress

    command = "bayescomp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = recompress(
            run_dir, out, _parse_thresholds(thresholds), data_dir=data_dir, bit_accounting=bit_accounting, force=force,
            variance_scale=variance_scale, verify=not no_verify, no_split=no_split, command=command,
        )
    except _USER_ERRORS as exc:
        _fail(exc)
    click.echo(format_table(summary_rows(report)))
    click.echo(f"wrote {Path(out) / 'report.json'}")


@main.command("finetune")
@click.argument("run_dir", type=click.Path())
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs.")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory for the new result."
)
@click.option("--thresholds", default=None,
              help="log α thresholds that decide what is kept (default: the run's own): one number, or name=value "
              "pairs (layers not named keep the run's own).")
@_no_split(None)
@click.option("--data-dir", default=None, help="Data root (default: the run's).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the run's).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def finetune_cmd(run_dir: str, epochs: int, out: str, thresholds: str | None, no_split: str | None,
                 data_dir: str | None, device: str | None, force: bool, quiet: bool) -> None:
    """Prune the trained posterior of RUN_DIR, fine-tune what is kept, compress it into OUT/.

    The same as `compress ... --finetune-epochs EPOCHS` with the run's options, without training the run again.
    """
    from .pipeline import finetune_run

    command = "bayescomp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = finetune_run(run_dir, out, epochs, thresholds=_parse_thresholds(thresholds), no_split=no_split,
                              data_dir=data_dir, device=device, force=force, progress=not quiet, command=command)
    except _USER_ERRORS as exc:
        _fail(exc)
    click.echo(format_table(summary_rows(report)))
    click.echo(f"wrote {Path(out) / 'report.json'}")


@main.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("--data-dir", default=None, help="Data root (for --sensitivity).")
@click.option("--sensitivity", is_flag=True, help="Also measure each layer's precision sensitivity on the test set.")
@click.option("--method", type=click.Choice(["otsu", "gmm"]), default="otsu", show_default=True,
              help="How the page suggests thresholds from each layer's log α histogram.")
@click.option("--no-verify", is_flag=True, help="Skip the published-checksum check (data you made yourself).")
def report_cmd(run_dir: str, data_dir: str | None, sensitivity: bool, method: str, no_verify: bool) -> None:
    """Write RUN_DIR/report.md with its figures (PNG) for a run folder or a sweep folder."""
    from .report.page import write_report

    try:
        page = write_report(run_dir, data_dir=data_dir, sensitivity=sensitivity, method=method,
                            verify=not no_verify)
    except (*_USER_ERRORS, ImportError) as exc:
        _fail(exc)
    click.echo(f"wrote {page}")


@main.command("sweep")
@click.option("--tau0", "tau0s", type=float, multiple=True, required=True,
              help="Global scale τ0 of the horseshoe prior; repeat for each value (--tau0 1e-5 --tau0 1e-3).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: one run per τ0 (tau0_<v>/) and sweep.json.")
@click.option("--model", default="lenet300", show_default=True, help="Model from the zoo.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--data-dir", default=None, help="Data root.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True)
@_KL_WEIGHT
@_PRETRAIN_EPOCHS
@_INPUT_ORIGIN
@_FINETUNE_EPOCHS
@click.option("--thresholds", default=None, help="log α thresholds: one number, or name=value pairs.")
@click.option("--auto-thresholds", type=click.Choice(["histogram", "validation"]), default=None,
              help="Choose each run's thresholds after training (see `compress --help`).")
@_no_split("keep")
@click.option("--val-budget", type=float, default=0.5, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--clip-var", default=None,
              help="Clamp σ² ≤ this: one number, or name=value pairs for some layers (default: the recipe).")
@click.option("--global-kl", type=click.Choice(["derived", "paper"]), default=None)
@click.option("--train-subset", type=int, default=None, help="Train on N random training examples.")
@click.option("--force", is_flag=True, help="Retrain runs that already exist in OUT.")
@click.option("--report", "write_pages", is_flag=True, help="Also write report.md for every run and the sweep.")
@click.option("--no-verify", is_flag=True, help="Skip the published-checksum check (data you made yourself).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sweep_cmd(tau0s, out, model, epochs, data_dir, seed, batch_size, lr, warmup_epochs, kl_weight, pretrain_epochs,
              input_origin, finetune_epochs, thresholds, auto_thresholds, no_split, val_budget, val_fraction, clip_var,
              global_kl, train_subset, force, write_pages, no_verify, quiet) -> None:
    """Train one horseshoe (ghs) run per τ0 into OUT/, and compare: Pareto front and the ELBO's choice."""
    from .pipeline import RunOptions
    from .sweep import sweep

    opts = RunOptions(model=model, prior="ghs", epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                      warmup_epochs=warmup_epochs, kl_weight=kl_weight, pretrain_epochs=pretrain_epochs,
                      input_origin=input_origin, finetune_epochs=finetune_epochs, thresholds=_parse_thresholds(thresholds), max_var=_parse_clip_var(clip_var),
                      train_subset=train_subset, data_dir=data_dir, global_kl=global_kl,
                      auto_thresholds=auto_thresholds, no_split=no_split, val_budget=val_budget, val_fraction=val_fraction,
                      verify_data=not no_verify)
    try:
        result = sweep(opts, list(tau0s), out, progress=not quiet, force=force)
        if write_pages and result:
            from .report.page import write_report

            for p in result["points"]:
                write_report(Path(out) / p["run_dir"])
            write_report(out)
    except (*_USER_ERRORS, ImportError) as exc:
        _fail(exc)
    if not result:  # data-parallel: rank 0 reports
        return
    rows = [(f"τ0 {p['tau0']:g}", f"error {p['test_error']:.2f}%  kept {p['weights_kept_pct']:.2f}%  "
             f"ELBO {p['elbo']:.4g}{'  (Pareto)' if p['pareto'] else ''}") for p in result["points"]]
    rows.append(("ELBO prefers", f"τ0 {result['elbo_choice']:g}"))
    click.echo(format_table(rows))
    click.echo(f"wrote {Path(out) / 'sweep.json'}")


@main.command("threshold-sweep")
@click.argument("run_dir", type=click.Path())
@click.option("--values", required=True,
              help="Comma-separated thresholds, each applied to every layer (or offsets with --relative).")
@click.option("--relative", is_flag=True, help="Add each value to the run's own per-layer thresholds.")
@click.option("--layer", default=None,
              help="Move this layer's threshold only; the other layers keep the run's own.")
@click.option("--data-dir", default=None, help="Data root.")
@click.option("--bit-accounting", type=click.Choice(["code", "paper"]), default=None,
              help="Bits per stored weight (default: the run's own).")
@click.option("--variance-scale", type=float, default=None, help="Variance scale for the bits (default: the run's own).")
@click.option("--no-verify", is_flag=True, help="Skip the published-checksum check (data you made yourself).")
def threshold_sweep_cmd(run_dir: str, values: str, relative: bool, layer: str | None, data_dir: str | None,
                        bit_accounting: str | None, variance_scale: float | None, no_verify: bool) -> None:
    """Compress RUN_DIR's posterior at several thresholds (no retraining); write RUN_DIR/threshold_sweep.json."""
    from .sweep import THRESHOLD_SWEEP_FILE, threshold_sweep

    try:
        numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {values!r}", param_hint="--values") from None
    target = Path(run_dir) / THRESHOLD_SWEEP_FILE
    try:
        points = threshold_sweep(run_dir, numbers, data_dir=data_dir, relative=relative, layer=layer,
                                 bit_accounting=bit_accounting, variance_scale=variance_scale, out=target,
                                 verify=not no_verify)
    except _USER_ERRORS as exc:
        _fail(exc)
    rows = []
    for p in points:
        if p.get("skipped"):
            rows.append((f"{p['threshold']:g}", f"skipped: {p['skipped']}"))
        else:
            rows.append((f"{p['threshold']:g}", f"error {p['test_error']:.2f}%  kept {p['weights_kept_pct']:.2f}%  "
                         f"CR fast {p['cr_fast']:.1f}x{'  (Pareto)' if p['pareto'] else ''}"))
    click.echo(format_table(rows))
    click.echo(f"wrote {target}")


@main.command("models")
def models_cmd() -> None:
    """List the models of the zoo."""
    from .models import MODELS

    width = max(map(len, MODELS))
    data_width = max(len(dataset) for _, dataset in MODELS.values())
    for name, (ctor, dataset) in MODELS.items():
        doc = (ctor.__doc__ or "").strip().splitlines()
        click.echo(f"{name:{width}s}  {dataset:{data_width}s}  {doc[0] if doc else ''}".rstrip())


@main.command("recipes")
@click.argument("name", required=False, type=click.Choice(sorted(TRAINING_RECIPES)))
def recipes_cmd(name) -> None:
    """List the training recipes (`compress --recipe`), or show one: each setting and why it has its value."""
    from .recipes import RECIPE_OPTIONS

    if name is None:
        for rec in TRAINING_RECIPES.values():
            fall = f", falling along a {rec.lr_schedule}" if rec.lr_schedule != "constant" else ""
            click.echo(f"{rec.name:6s}  {rec.pretrain_epochs} plain epochs, {rec.epochs} Bayesian epochs at {rec.lr:g}{fall}"
                       + (f", {rec.finetune_epochs} fine-tuning epochs" if rec.finetune_epochs else ""))
        return
    rec = TRAINING_RECIPES[name]
    for key in RECIPE_OPTIONS:
        value = getattr(rec, key)
        click.echo(f"{key:16s} {dict(value) if key == 'lr_scale' else value}")
        if key in rec.evidence:
            click.echo(f"{'':16s} why: {rec.evidence[key]}")
    for prior, own in rec.prior_settings.items():
        for key, value in own.items():
            click.echo(f"{prior + ': ' + key:16s} {value}")
            if f"{prior}: {key}" in rec.evidence:
                click.echo(f"{'':16s} why: {rec.evidence[f'{prior}: {key}']}")
    for key, text in rec.evidence.items():
        if key not in RECIPE_OPTIONS and ": " not in key:
            click.echo(f"{key:16s} why: {text}")


@main.group("data")
def data_group() -> None:
    """Datasets: fetch them into the data root."""


@data_group.command("fetch")
@click.argument("dataset", type=click.Choice(["mnist", "cifar10"]))
@click.option("--data-dir", default=None, help="Data root to fill (default: $BAYESCOMP_DATA, else the user cache).")
@click.option("--source", default=None, type=click.Path(), help="Copy from this local folder instead of downloading.")
def data_fetch_cmd(dataset: str, data_dir: str | None, source: str | None) -> None:
    """Fetch DATASET into the data root, checking every file's checksum."""
    from .data import fetch_cifar10, fetch_mnist

    try:
        folder = (fetch_mnist if dataset == "mnist" else fetch_cifar10)(data_dir, source)
    except _USER_ERRORS as exc:
        _fail(exc)
    click.echo(f"{dataset}: ready in {folder}")


@main.command("show")
@click.argument("run_dir", type=click.Path())
def show_cmd(run_dir: str) -> None:
    """Print the summary table of a finished run, or the progress of one still training (RUN_DIR.partial):
    epochs done, the last epoch's figures, time spent and an estimate of the time left."""
    from .pipeline import run_progress
    from .report.table import progress_rows
    from .runreport import read_run

    report_path = Path(run_dir) / "report.json"
    if report_path.is_file() and not run_dir.rstrip("/").endswith(".partial"):
        try:
            report = read_run(run_dir)
        except _USER_ERRORS as exc:
            _fail(exc)
        click.echo(format_table(summary_rows(report)))
        return
    try:
        click.echo(format_table(progress_rows(run_progress(run_dir))))
    except _USER_ERRORS as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    main()
