"""The `bayescomp` command line (also `python -m bayescomp`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .clioptions import run_options, run_values
from .filecommands import FILE_COMMANDS, USER_ERRORS, fail
from .recipes import TRAINING_RECIPES
from .report.table import format_table, summary_rows


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bayescomp")
def main() -> None:
    """Bayesian Compression: train a group-sparse Bayesian network, prune it, quantise it, store it."""
    from .train.memory import keep_freed_memory

    keep_freed_memory(default=True)  # this process keeps freed heap memory (train/memory.py); opt-in for library users


for _command in FILE_COMMANDS:
    main.add_command(_command)


@main.command("compress")
@run_options("compress")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory (must not exist)."
)
@click.option(
    "--dataset",
    default=None,
    type=click.Choice(["mnist", "cifar10"]),
    help="Dataset (default: the model's own; must match it).",
)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT.partial.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress_cmd(out, dataset, resume, force, quiet, **params) -> None:
    """Train MODEL with a group-sparse prior, compress it, evaluate it, write OUT/."""
    from .models import MODELS
    from .pipeline import RunOptions, run
    from .recipes import RECIPE_OPTIONS, recipe_options
    from .train import distributed

    model = params["model"]
    if dataset is not None and model in MODELS and MODELS[model][1] != dataset:
        fail(ValueError(f"model {model} is built for {MODELS[model][1]}, not {dataset}"))
    values = run_values("compress", params)
    given = {k: values[k] for k in (*RECIPE_OPTIONS, "init_from", "thresholds", "max_multiply_adds")}
    opts = RunOptions(**(values | recipe_options(values["recipe"], given, prior=values["prior"], model=values["model"])))
    command = "bayescomp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = run(opts, out, resume=resume, force=force, progress=not quiet, command=command)
        main_rank = distributed.is_main()
    except USER_ERRORS as exc:
        fail(exc)
    finally:
        distributed.cleanup()
    if not main_rank:  # data-parallel: rank 0 reports; the other ranks only trained
        return
    click.echo(format_table(summary_rows(report)))
    click.echo(f"wrote {Path(out) / 'report.json'}")


@main.command("prune")
@click.argument("run_dir", type=click.Path())
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory for the new result."
)
@run_options("prune")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def prune_cmd(run_dir: str, out: str, force: bool, **params) -> None:
    """Compress the trained posterior of RUN_DIR again at other thresholds (no retraining).

    RUN_DIR may also be a run still training (or stopped): its newest checkpoint in RUN_DIR.partial is
    compressed, at the thresholds the run would choose (or --thresholds), and the run goes on untouched.
    During its fine-tuning, that is the fine-tuning's checkpoint, with the groups the run decided to keep.
    """
    from .pipeline import recompress

    values = run_values("prune", params)
    command = "bayescomp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = recompress(run_dir, out, values["thresholds"], data_dir=values["data_dir"],
                            bit_accounting=values["bit_accounting"], force=force,
                            variance_scale=values["variance_scale"], verify=values["verify_data"],
                            no_split=values["no_split"], command=command, target_kept=values["target_kept"],
                            max_multiply_adds=values["max_multiply_adds"])
    except USER_ERRORS as exc:
        fail(exc)
    click.echo(format_table(summary_rows(report)))
    click.echo(f"wrote {Path(out) / 'report.json'}")


@main.command("finetune")
@click.argument("run_dir", type=click.Path())
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs.")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory for the new result."
)
@run_options("finetune")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def finetune_cmd(run_dir: str, epochs: int, out: str, force: bool, quiet: bool, **params) -> None:
    """Prune the trained posterior of RUN_DIR, fine-tune what is kept, compress it into OUT/.

    The same as `compress ... --finetune-epochs EPOCHS` with the run's options, without training the run again.
    """
    from .pipeline import finetune_run

    command = "bayescomp " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = finetune_run(run_dir, out, epochs, **run_values("finetune", params), force=force,
                              progress=not quiet, command=command)
    except USER_ERRORS as exc:
        fail(exc)
    click.echo(format_table(summary_rows(report)))
    click.echo(f"wrote {Path(out) / 'report.json'}")


@main.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("--sensitivity", is_flag=True, help="Also measure each layer's precision sensitivity on the test set.")
@click.option("--method", type=click.Choice(["otsu", "gmm"]), default="otsu", show_default=True,
              help="How the page suggests thresholds from each layer's log α histogram.")
@run_options("report")
def report_cmd(run_dir: str, sensitivity: bool, method: str, **params) -> None:
    """Write RUN_DIR/report.md with its figures (PNG) for a run folder or a sweep folder."""
    from .report.page import write_report
    from .runfigures import ensure_figure_data, write_sensitivity
    from .runreport import read_run

    values = run_values("report", params)
    try:
        if (Path(run_dir) / "report.json").is_file():
            read_run(run_dir)  # a damaged report, or one of another run than the folder's files: refused here
            ensure_figure_data(run_dir)  # a folder from an earlier version: the figure data from its posterior
            if sensitivity:
                write_sensitivity(run_dir, data_dir=values["data_dir"], verify=values["verify_data"])
        page = write_report(run_dir, method=method)
    except (*USER_ERRORS, ImportError) as exc:
        fail(exc)
    click.echo(f"wrote {page}")


@main.command("sweep")
@click.option("--tau0", "tau0s", type=float, multiple=True, required=True,
              help="Global scale τ0 of the horseshoe prior; repeat for each value (--tau0 1e-5 --tau0 1e-3).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: one run per τ0 (tau0_<v>/) and sweep.json.")
@run_options("sweep")
@click.option("--force", is_flag=True, help="Retrain runs that already exist in OUT.")
@click.option("--report", "write_pages", is_flag=True, help="Also write report.md for every run and the sweep.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sweep_cmd(tau0s, out, force, write_pages, quiet, **params) -> None:
    """Train one horseshoe (ghs) run per τ0 into OUT/, and compare: Pareto front and the ELBO's choice."""
    from .pipeline import RunOptions
    from .sweep import sweep

    opts = RunOptions(prior="ghs", **run_values("sweep", params))
    try:
        result = sweep(opts, list(tau0s), out, progress=not quiet, force=force)
        if write_pages and result:
            from .report.page import write_report

            for p in result["points"]:
                write_report(Path(out) / p["run_dir"])
            write_report(out)
    except (*USER_ERRORS, ImportError) as exc:
        fail(exc)
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
@run_options("threshold-sweep")
def threshold_sweep_cmd(run_dir: str, values: str, relative: bool, layer: str | None, **params) -> None:
    """Compress RUN_DIR's posterior at several thresholds (no retraining); write RUN_DIR/threshold_sweep.json."""
    from .sweep import THRESHOLD_SWEEP_FILE, threshold_sweep

    try:
        numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {values!r}", param_hint="--values") from None
    target = Path(run_dir) / THRESHOLD_SWEEP_FILE
    try:
        given = run_values("threshold-sweep", params)
        points = threshold_sweep(run_dir, numbers, data_dir=given["data_dir"], relative=relative, layer=layer,
                                 bit_accounting=given["bit_accounting"], variance_scale=given["variance_scale"],
                                 out=target, verify=given["verify_data"])
    except USER_ERRORS as exc:
        fail(exc)
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
    for who, own in (*rec.model_settings.items(), *rec.prior_settings.items()):  # a zoo model's, a prior's
        for key, value in own.items():
            click.echo(f"{who + ': ' + key:16s} {value}")
            if f"{who}: {key}" in rec.evidence:
                click.echo(f"{'':16s} why: {rec.evidence[f'{who}: {key}']}")
    for key, text in rec.evidence.items():
        if key not in RECIPE_OPTIONS and ": " not in key:
            click.echo(f"{key:16s} why: {text}")


@main.group("data")
def data_group() -> None:
    """Datasets: fetch them into the data root."""


@data_group.command("fetch")
@click.argument("dataset", type=click.Choice(["mnist", "cifar10"]))
@run_options("fetch")
@click.option("--source", default=None, type=click.Path(), help="Copy from this local folder instead of downloading.")
def data_fetch_cmd(dataset: str, data_dir: str | None, source: str | None) -> None:
    """Fetch DATASET into the data root, checking every file's checksum."""
    from .data import fetch_cifar10, fetch_mnist

    try:
        folder = (fetch_mnist if dataset == "mnist" else fetch_cifar10)(data_dir, source)
    except USER_ERRORS as exc:
        fail(exc)
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
        except USER_ERRORS as exc:
            fail(exc)
        click.echo(format_table(summary_rows(report)))
        return
    try:
        click.echo(format_table(progress_rows(run_progress(run_dir))))
    except USER_ERRORS as exc:
        fail(exc)


if __name__ == "__main__":  # pragma: no cover
    main()
