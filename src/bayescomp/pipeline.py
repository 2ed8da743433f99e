"""One run end to end — data, model, training, compression, evaluation — into an output folder.

The folder appears only when the run succeeds: work happens in ``DIR.partial`` (checkpoint, metrics),
which is renamed to ``DIR`` at the end. A failed or interrupted run leaves ``DIR.partial`` with its
last good checkpoint and the options it was started with (``options.json``), from which ``resume=True``
continues (with the same options: others are refused) and which `recompress` can compress while the run
is still training.

The run layer, one module per job: the options (`runoptions`: one table generating `RunOptions`, the command
line's options and the validation), the parts a run is made of (`factories`: models, data, device), the
decision (`decision`: the threshold rule a run's options name, `compress.thresholds`' rule objects), the
unfinished run (`unfinished`), the figure data for the report page (`runfigures`), and the folder's life
cycle (`rundir`: the lock on ``DIR.partial``, what may be deleted, the atomic move into place). This module
holds the orchestrations — `run`, `recompress`, `finetune_run` — and the one result writer they share
(`write_result`).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .base import atomic_write
from .compress import PruneError, apply_masks, group_masks
from .compress.thresholds import SizeTarget
from .decision import choose_thresholds, decide_again, no_split_again
from .factories import (
    augmentation,
    build_bayesian,
    evaluate_compression,
    example_input,
    hold_out,
    load_data,
    load_posterior,
    plain_start,
    posterior_state,
    resolve_device,
)
from .io import packed_report, save_plain
from .io import save as save_packed
from .models import build_model
from .optioncheck import check_thresholds
from .recipes import recipe
from .rundir import (
    CHECKPOINT,
    FINETUNE_CHECKPOINT,
    FINETUNE_METRICS,
    MEAN_CHECKPOINT,
    MEAN_METRICS,
    METRICS,
    MODEL_FILE,
    OPTIONS,
    PACKED_FILE,
    POSTERIOR_FILE,
    REPORT,
    RunError,
    RunFolder,
    check_out,
    commit,
    final_dir,
    prepare,
    refuse_in_use,
    same_folder,
    work_dir,
)
from .runfigures import write_figure_data
from .runoptions import (
    RunOptions,
    check_option,
    check_resume_options,
    check_size_target,
    config_record,
    read_options,
    train_config,
    validate,
)
from .runreport import read_run
from .train import distributed, finetune_config, fit, mean_config
from .train.checkpoint import load_checkpoint, save_checkpoint
from .train.loop import flush_denormals
from .train.rotation import previous_checkpoint
from .unfinished import run_progress, unfinished_decision, unfinished_run


def prepare_out(out: str | os.PathLike, resume: bool, force: bool) -> RunFolder:
    """Check the output folder can be written, make and lock its working folder ``OUT.partial`` (`rundir.prepare`).

    Data-parallel, rank 0 makes and locks it; the other ranks wait for it and share it.
    """
    folder = prepare(out, resume=resume, force=force, lock=distributed.is_main())
    distributed.barrier()  # data-parallel: the other ranks wait until rank 0 has made DIR.partial
    return folder


def _refuse_own_source(run_dir: Path, out: str | os.PathLike) -> None:
    """`prune`/`finetune` write a new folder: never the run they read, nor its working folder."""
    if str(out).strip() and any(same_folder(Path(out), p) for p in (final_dir(run_dir), work_dir(run_dir))):
        raise RunError(f"--out {out} is the run being read ({run_dir}); write the result to another folder")


def finetune(opts: RunOptions, bmodel: torch.nn.Module, train, test, thresholds, work: Path, *,
             example: torch.Tensor | None = None, resume: bool = False,
             progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Prune `bmodel` at `thresholds`, then fine-tune the posterior of what is kept: (keeps, what report.json
    records of it under `finetune`: its length, the errors the model had before it, its time and history).

    The decision comes first and stays: the layers' `group_mask` switches the pruned groups off (the
    network computes without them, in training as at evaluation), and `fit` trains the rest for
    `opts.finetune_epochs` epochs with the run's settings (`finetune_config`: no warm-up, the learning rate
    falling to 0), checkpointed in `work/finetune.pt`; with `resume`, a fine-tuning stopped there continues.
    The caller compresses with `keeps=`, so the compressed model keeps exactly these groups, even one whose
    score crossed its threshold meanwhile.

    Why. Pruning a group that still carried a little signal costs accuracy (on LeNet-300-100 with the
    horseshoe, mostly fc1's input pixels); the kept weights can take that signal over.

    With `opts.mean_epochs`, the posterior means of what is kept are then trained alone, the noise off
    (`train.mean_config`; checkpointed in `work/finetune_mean.pt`), recorded under `finetune.mean`.

    Data-parallel, every process calls this (the models are identical, so are the decisions); the errors
    before fine-tuning are measured on rank 0 only. `example`: as for `evaluate_compression`.
    """
    record: dict[str, Any] = {"epochs": opts.finetune_epochs}
    if distributed.is_main():
        before = evaluate_compression(bmodel, test, thresholds, opts.bit_accounting, opts.variance_scale,
                                      example=example)[1]
        record.update(test_error_before=before["test_error"],
                      test_error_uncompressed_before=before["test_error_uncompressed"])
    keeps = group_masks(bmodel, thresholds)
    empty = [name for name, keep in keeps.items() if not bool(keep.any())]
    if empty:
        raise PruneError(f"the thresholds prune every group of layer(s) {', '.join(empty)}: nothing left to fine-tune")
    apply_masks(bmodel, keeps)
    checkpoint = work / FINETUNE_CHECKPOINT
    resume = resume and (checkpoint.is_file() or previous_checkpoint(checkpoint).is_file())
    with flush_denormals():  # the pruned groups' weights decay towards 0 (see there)
        result = fit(bmodel, train, finetune_config(train_config(opts), opts.finetune_epochs, opts.finetune_lr,
                                                    opts.finetune_kl_weight), test=test,
                     checkpoint=checkpoint, resume=resume, metrics=work / FINETUNE_METRICS, progress=progress,
                     transform=augmentation(opts))
        record |= {"seconds": result.seconds, "history": result.history}
        if opts.mean_epochs:  # then the means alone, the noise off (`train.mean_config`)
            checkpoint = work / MEAN_CHECKPOINT
            again = resume and (checkpoint.is_file() or previous_checkpoint(checkpoint).is_file())
            means = fit(bmodel, train, mean_config(train_config(opts), opts.mean_epochs, opts.finetune_lr), test=test,
                        checkpoint=checkpoint, resume=again, metrics=work / MEAN_METRICS, progress=progress,
                        transform=augmentation(opts))
            record["mean"] = {"epochs": opts.mean_epochs, "seconds": means.seconds, "history": means.history}
    return keeps, record


def run(opts: RunOptions, out: str | os.PathLike, *, resume: bool = False, force: bool = False,
        progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train, compress and evaluate one model; write DIR/report.json, model.bcz (packed), model.pt (plain),
    posterior.pt, metrics.jsonl.

    Under torchrun (WORLD_SIZE > 1) every process trains its share of each global batch; rank 0 alone writes
    DIR and returns the report, the others return an empty dict.
    """
    validate(opts)
    check_out(out)
    refuse_in_use(out)
    device = resolve_device(opts.device)
    distributed.init_from_env(device)  # joins the process group under torchrun (gloo on CPU, nccl on CUDA)
    train, test = load_data(opts.model, opts.data_dir, opts.train_subset, opts.seed, opts.verify_data)  # fail before any folder
    train, val = hold_out(opts, train)
    with prepare_out(out, resume, force) as folder:  # locked until the run ends, however it ends
        if folder.interrupted_move:  # killed while its finished folder was moved into place: complete that
            commit(folder)
            return json.loads((folder.final / REPORT).read_text())
        if resume:
            check_resume_options(folder.work, opts)
        report = _train_and_write(opts, folder, device, train, test, val, resume=resume, progress=progress,
                                  command=command)
    # Data-parallel: every process leaves together. A rank that tears its process group down while rank 0 still
    # compresses and writes can be aborted by gloo at exit ("terminate called without an active exception").
    distributed.barrier()
    return report


def _train_and_write(opts: RunOptions, folder: RunFolder, device: torch.device, train, test, val, *, resume: bool,
                     progress: bool, command: str | None) -> dict[str, Any]:
    """The body of `run` in its locked working folder: train, compress, evaluate, write, move into place."""
    work = folder.work
    max_var = recipe(opts.model).clamps(opts.prior) if opts.max_var is None else opts.max_var
    if distributed.is_main():  # (on resume: what may change, e.g. more epochs, is recorded too)
        atomic_write(work / OPTIONS, (json.dumps(asdict(opts), indent=2) + "\n").encode())

    torch.manual_seed(opts.seed)
    plain, trained = plain_start(opts, train, test, progress) if not resume else (build_model(opts.model), False)
    bmodel = build_bayesian(opts.model, opts.prior, plain=plain, keep_weights=trained, max_var=max_var or None,
                            tau0=opts.tau0, global_kl=opts.global_kl, input_origin=opts.input_origin).to(device)
    config = train_config(opts)
    result = fit(bmodel, train, config, test=test, checkpoint=work / CHECKPOINT, resume=resume,
                 metrics=work / METRICS, progress=progress, transform=augmentation(opts))
    example = example_input(opts.model, device=device)
    keeps = tuned = None
    if opts.finetune_epochs:  # every process prunes and fine-tunes
        thresholds, choice = choose_thresholds(opts, bmodel, val, example)
        keeps, tuned = finetune(opts, bmodel, train, test, thresholds, work, example=example, resume=resume,
                                progress=progress)
    if not distributed.is_main():
        return {}  # rank 0 compresses, evaluates and writes DIR
    if not opts.finetune_epochs:
        thresholds, choice = choose_thresholds(opts, bmodel, val, example)
    compressed, figures = evaluate_compression(bmodel, test, thresholds, opts.bit_accounting, opts.variance_scale,
                                               example=example, keeps=keeps)
    base = {"model": opts.model, "prior": opts.prior, "epochs": opts.epochs, "seed": opts.seed,
            "train_seconds": result.seconds, "train_examples": len(train[0]), "config": config_record(opts),
            "history": result.history, "environment": _environment(device)}
    fields: dict[str, Any] = {"finetune": tuned} if tuned is not None else {}
    if val is not None:
        fields["validation_examples"] = len(val[0])
    return write_result(folder, compressed, figures, base, bmodel=bmodel, posterior=posterior_state(opts, bmodel),
                        choice=choice and {name: c.to_dict() for name, c in choice.items()}, command=command, **fields)


def _environment(device: torch.device) -> dict[str, Any]:
    """Where a run trained (report.json's `environment`)."""
    return {"bayescomp": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processes": distributed.world_size(), "python": platform.python_version(),
            "machine": platform.machine(), "device": str(device)}


def write_result(folder: RunFolder, compressed, figures: Mapping[str, Any], base: Mapping[str, Any], *,
                 bmodel: torch.nn.Module, posterior: dict[str, Any], choice: Mapping[str, Any] | None = None,
                 command: str | None = None, command_was: str | None = None, **fields: Any) -> dict[str, Any]:
    """The one result writer of `run`, `recompress` and `finetune_run`: assemble report.json, write it with the
    run's files into the working folder, move the folder to its final name (`rundir.commit`); return the report.

    The report is `base` (a new run's own fields, or the report of the run compressed again) with the new
    compression's `figures` and report fields in place of its own, its threshold `choice` (none: the thresholds
    were set by hand), `fields`, and `command`; `command_was` names the field that keeps the command of
    the run in `base` (a run made from another: `source_command`, `training_command`). The files: the plain
    model (model.pt), the packed one (model.bcz, whose sizes the report records), the posterior, the data the
    report page draws (`runfigures`), and report.json last.
    """
    report = {k: v for k, v in base.items() if k not in compressed.report and k not in figures} | dict(figures) | \
        compressed.report
    report.pop("threshold_choice", None)
    if "size_target" not in compressed.report:
        report.pop("size_target", None)  # (a size target of the run compressed again)
    if choice:
        report["threshold_choice"] = dict(choice)
        size_target = next(iter(choice.values())).get("details", {}).get("size_target")
        if size_target is not None:  # the thresholds a size target chose: the report says which and how big
            report["size_target"] = size_target
    if command_was is not None and "command" in report:
        report[command_was] = report.pop("command")
    report.update(fields)
    if command:
        report["command"] = command
    work = folder.work
    meta = {k: report.get(k) for k in ("model", "prior", "architecture", "bits", "test_error")}
    save_plain(work / MODEL_FILE, compressed.model, meta)
    save_packed(compressed, work / PACKED_FILE)
    packed = packed_report(compressed, work / PACKED_FILE)
    report.update({k: packed[k] for k in ("cr_max", "file_bytes", "cr_file")})
    report["packed"] = {k: v for k, v in packed.items() if k not in ("cr_max", "file_bytes", "cr_file")}
    save_checkpoint(work / POSTERIOR_FILE, posterior)
    write_figure_data(work, bmodel, compressed)
    atomic_write(work / REPORT, (json.dumps(report, indent=2) + "\n").encode())
    commit(folder)  # (drops the checkpoints and options.json: report.json holds the options as `config`)
    return report


def recompress(run_dir: str | os.PathLike, out: str | os.PathLike, thresholds: float | Mapping[str, float] | None,
               *, data_dir: str | None = None, bit_accounting: str = "code", force: bool = False,
               variance_scale: float = 1.0, verify: bool = True, no_split: str | None = None,
               command: str | None = None, target_kept: float | None = None,
               max_multiply_adds: int | None = None) -> dict[str, Any]:
    """Compress a run's posterior again (other thresholds), evaluate it, write a new run folder.

    A finished run is compressed from its posterior.pt. A run still training (or stopped before the end)
    is compressed from the newest checkpoint in its ``DIR.partial`` (`unfinished_run`; while it is being
    fine-tuned, the fine-tuning's, `unfinished_decision`): a look at a long run half way, which leaves the
    run alone; the report's `unfinished` says at which epoch.

    `thresholds=None` keeps the thresholds the run used (its report's `thresholds`; for an unfinished run,
    the ones it would choose: its --thresholds, its --auto-thresholds rule, or the recipe's); a mapping that
    names some layers changes only those, the others keep the run's; the report's `threshold_choice`
    records them as given. `no_split` ("keep" or "floor"): a run of the histogram rule chooses its thresholds
    again with that in the layers without a split (`decision.decide_again`). `verify=False` skips the data files'
    checksum check (data you made yourself). `command`: this command line, recorded as the report's
    `command`; the one that made the run compressed again becomes its `source_command`. `target_kept` or
    `max_multiply_adds`: a size target chooses the thresholds instead (`compress.thresholds.SizeTarget`; a
    finished run only).
    """
    run_dir = Path(run_dir)
    check_thresholds(thresholds)
    size_target = target_kept is not None or max_multiply_adds is not None
    if size_target and (thresholds is not None or no_split is not None):
        raise RunError("--target-kept/--max-multiply-adds choose the thresholds: not with --thresholds or --no-split")
    if size_target:
        check_size_target(target_kept, max_multiply_adds)
    check_option("variance_scale", variance_scale)
    check_option("bit_accounting", bit_accounting)
    check_out(out)
    _refuse_own_source(run_dir, out)
    refuse_in_use(out)
    posterior_path = run_dir / POSTERIOR_FILE
    unfinished = opts = None
    if posterior_path.is_file():
        state = load_checkpoint(posterior_path)
        bmodel = load_posterior(posterior_path)
        previous = read_run(run_dir, required=False) or {"model": state["model"], "prior": state["prior"]}
        if no_split is not None:
            opts = no_split_again(_run_options(run_dir, previous), no_split)
    else:
        if size_target:
            raise RunError(f"{run_dir}: a size target compresses a finished run's posterior; this run has none yet")
        opts, bmodel, epoch, work = unfinished_run(run_dir)
        if no_split is not None:
            no_split_again(opts, no_split)
        state = posterior_state(opts, bmodel)
        previous = {"model": opts.model, "prior": opts.prior, "epochs": opts.epochs, "seed": opts.seed,
                    "config": config_record(opts)}
        unfinished = {"from": str(work), "epochs_trained": epoch, "epochs": opts.epochs}
    _, test = load_data(state["model"], data_dir, 1, verify=verify)
    folder = prepare_out(out, False, force)
    keeps = choice = None
    try:
        if unfinished is not None:
            thresholds, keeps, tuned, means = unfinished_decision(opts, bmodel, unfinished["from"], thresholds,
                                                                  data_dir, verify)
            if tuned:
                unfinished.update(finetune_epochs_done=tuned, finetune_epochs=opts.finetune_epochs)
            if means:
                unfinished.update(mean_epochs_done=means, mean_epochs=opts.mean_epochs)
        elif size_target:
            chosen = SizeTarget(target_kept, max_multiply_adds, example_input(state["model"])).choose(bmodel)
            thresholds = {name: float(c.value) for name, c in chosen.items()}
            choice = {name: c.to_dict() for name, c in chosen.items()}
        else:  # the run's own thresholds (a recipe's, or the user's), not the priors' defaults
            thresholds, choice = decide_again(opts, bmodel, previous, thresholds)
        compressed, figures = evaluate_compression(bmodel, test, thresholds, bit_accounting, variance_scale,
                                                   example=example_input(state["model"]), keeps=keeps)
        origin = {"unfinished": unfinished} if unfinished is not None else {"recompressed_from": str(run_dir)}
        report = write_result(folder, compressed, figures, previous, bmodel=bmodel, posterior=state, choice=choice,
                              command=command, command_was="source_command", **origin)
    except BaseException:
        folder.abandon()
        raise
    return report


def _run_options(run_dir: Path, previous: Mapping[str, Any]) -> RunOptions:
    """The options a finished run was made with: its report (`previous`)'s `config`."""
    if "config" not in previous:
        raise RunError(f"{run_dir / REPORT}: field 'config' is missing: the run's options are unknown")
    return read_options(previous["config"], run_dir / REPORT, where="config.")


def finetune_run(run_dir: str | os.PathLike, out: str | os.PathLike, epochs: int, *,
                 thresholds: float | Mapping[str, float] | None = None, no_split: str | None = None,
                 data_dir: str | None = None, device: str | None = None, force: bool = False, progress: bool = True,
                 command: str | None = None) -> dict[str, Any]:
    """Prune a finished run's posterior and fine-tune it for `epochs` epochs (`finetune`); write a new run folder.

    The run's own settings are used (its report's `config`: training set, batch, rate, KL weight, seed),
    with `finetune_epochs=epochs`, so the result is the one `run` gives for those options in one go.
    `thresholds=None` keeps the run's own thresholds (its report's `thresholds`); others are recorded in the
    new report's `config` (in place of the run's --auto-thresholds rule; a validation split the run held out
    stays held out). A mapping naming some layers only changes those: the others keep the run's own (for a
    run whose histogram rule chose them, the config then records the rule and the named layers, as
    `compress --auto-thresholds histogram --thresholds ...` would). `no_split`: a histogram run's thresholds
    are chosen again with it (`decision.decide_again`), as `compress --no-split` would have. `data_dir` and `device`
    default to the run's.
    """
    run_dir = Path(run_dir)
    posterior_path = run_dir / POSTERIOR_FILE
    if not isinstance(epochs, int) or epochs < 1:
        raise RunError(f"--epochs: fine-tuning epochs must be a positive integer, got {epochs!r}")
    check_thresholds(thresholds)
    check_out(out)
    _refuse_own_source(run_dir, out)
    refuse_in_use(out)
    if not posterior_path.is_file():
        raise RunError(f"no trained posterior at {posterior_path}: fine-tuning needs a finished run")
    previous = read_run(run_dir)
    opts = _run_options(run_dir, previous)
    if opts.finetune_epochs:
        raise RunError(f"the run in {run_dir} is fine-tuned already ({opts.finetune_epochs} epochs)")
    opts.finetune_epochs = epochs
    opts.data_dir = data_dir if data_dir is not None else opts.data_dir
    opts.device = device if device is not None else opts.device
    opts.no_split = no_split if no_split is not None else opts.no_split
    validate(replace(opts, init_from=None))  # the start the run came from is not needed any more
    torch_device = resolve_device(opts.device)
    train, test = load_data(opts.model, opts.data_dir, opts.train_subset, opts.seed, opts.verify_data)
    train, _ = hold_out(opts, train)  # the training set the posterior was trained on
    bmodel = load_posterior(posterior_path).to(torch_device)
    given = thresholds
    thresholds, choice = decide_again(opts if no_split is not None else None, bmodel, previous, given)
    if given is not None:  # the config records how the decision was taken
        partial = isinstance(given, Mapping) and isinstance(thresholds, Mapping) and set(given) < set(thresholds)
        if partial and opts.auto_thresholds == "histogram":  # named layers given, the rest the rule's (as `run`)
            named = opts.thresholds if isinstance(opts.thresholds, Mapping) else {}
            opts.thresholds = {**named, **given}
        else:
            opts.thresholds, opts.auto_thresholds, opts.no_split = thresholds, None, "keep"
    folder = prepare_out(out, False, force)
    try:
        example = example_input(opts.model, device=torch_device)
        keeps, tuned = finetune(opts, bmodel, train, test, thresholds, folder.work, example=example,
                                progress=progress)
        compressed, figures = evaluate_compression(bmodel, test, thresholds, opts.bit_accounting,
                                                   opts.variance_scale, example=example, keeps=keeps)
        report = write_result(folder, compressed, figures, previous, bmodel=bmodel,
                              posterior=posterior_state(opts, bmodel), choice=choice, command=command,
                              command_was="training_command", config=config_record(opts), finetune=tuned,
                              finetuned_from=str(run_dir))
    except BaseException:
        folder.abandon()
        raise
    return report


#: (the run layer's names that callers reach through `pipeline`: the options, the parts, the unfinished run)
__all__ = ["FINETUNE_CHECKPOINT", "POSTERIOR_FILE", "REPORT", "RunError", "RunOptions", "check_resume_options",
           "example_input", "finetune", "finetune_run", "load_data", "load_posterior", "prepare_out", "recompress",
           "run", "run_progress", "validate", "write_result"]
