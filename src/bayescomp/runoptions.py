"""The options of a run, written once: a table of `Option` records (`OPTIONS`).

Each record holds an option's name, type, default, help text, validation rule and the commands that take
it. From the table come the `RunOptions` dataclass (its fields, types and defaults), the command line's
options of every command that takes a run option (`clioptions.run_options`), the validation of a whole set
of options (`validate`) and of one (`check_option`), and the options a resumed run may not change
(`RESUME_FIXED`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, make_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .compress.thresholds import NO_SPLIT
from .convert import PRIORS, bayesianize
from .factories import first_layer, resolve_device
from .models import MODELS, build_model
from .nn.zdraw import Z_DRAWS
from .optioncheck import check_number, check_seed, check_thresholds, train_error
from .rundir import OPTIONS as OPTIONS_FILE
from .rundir import RunError
from .runreport import read_json, validate_options
from .train import TrainConfig, distributed
from .train.config import length_change_refused

Check = Callable[[Any, Any], None]  # (value, the whole options) -> None, or a RunError naming the flag

_RECIPE_DEFAULT = " (default: the recipe's)."
_TARGET_KEPT_HELP = ("Size target: choose each layer's threshold so that the compressed model keeps at most this share of "
                     "the weights (0 < FRACTION <= 1), groups ranked by log α across layers; not with --thresholds")
_NO_SPLIT_HELP = ("--auto-thresholds histogram, in a layer whose log α histogram shows no split: keep every group "
                  "(keep), or cut at the prior's noise floor, log α 2 for ghs and -3 for gnj (floor)")


@dataclass(frozen=True)
class Option:
    """One run option: a field of `RunOptions` and, where `commands` name it, a command-line option.

    - `annotation`, `default`: the field's type (as a string) and default.
    - `help`: the help text of `compress`; `helps`: another command's, where it differs; `defaults`: another
      command's default, where it differs (None in the commands that read a run: the run's own).
    - `recipe`: a training-recipe setting: `compress` takes the recipe's value unless it is given.
    - `cli`: how the command line reads the value: "value", "per_layer" (a number or name=value pairs),
      "lr_scale" (kind=factor pairs), "path", "negated" (a --no-... flag that sets the field to False).
    - `check(value, options)`: refuses a bad value with a `RunError` that names the flag.
    - `resume_fixed`: a resumed run must have the value it started with (it shapes the training).
    """

    name: str
    flag: str
    annotation: str
    default: Any = None
    help: str | None = None
    commands: tuple[str, ...] = ("compress",)
    choices: tuple[str, ...] | None = None
    cli: str = "value"
    cli_default: Any = None
    recipe: bool = False
    check: Check | None = None
    resume_fixed: bool = False
    helps: Mapping[str, str | None] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def default_for(self, command: str) -> Any:
        """The command line's default of this option in `command` (None: not given)."""
        if command in self.defaults:
            return self.defaults[command]
        if self.recipe and command == "compress":
            return None  # the recipe's value
        return self.cli_default if self.cli_default is not None else self.default

    def help_for(self, command: str) -> str | None:
        """The help text of this option in `command`."""
        if command in self.helps:
            return self.helps[command]
        if self.recipe and command == "compress" and self.help is not None:
            return self.help + _RECIPE_DEFAULT
        return self.help


# ---- the checks of single options (each names its flag) ----

def _known(table: Mapping[str, Any], what: str) -> Check:
    def check(value: Any, opts: Any) -> None:
        if value not in table:
            raise RunError(f"--{what}: unknown {what} {value!r}; choose one of: {', '.join(sorted(table))}")
    return check


def _positive_int(flag: str, noun: str, minimum: int = 1) -> Check:
    def check(value: Any, opts: Any) -> None:
        if not isinstance(value, int) or value < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
            raise RunError(f"{flag}: {noun} must be {need}, got {value if minimum == 1 else repr(value)}")
    return check


def _positive_finite(flag: str, *, repr_value: bool = True) -> Check:
    def check(value: Any, opts: Any) -> None:
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise RunError(f"{flag} must be a positive finite number, got {repr(value) if repr_value else value}")
    return check


def _choice(flag: str, choices: tuple[str | None, ...], text: str) -> Check:
    def check(value: Any, opts: Any) -> None:
        if value not in choices:
            raise RunError(f"{flag} must be {text}, got {value!r}")
    return check


def _check_layer_names(opts: Any, per_layer: Any, flag: str) -> None:
    """A per-layer option (a mapping) names only layers the model has: checked before any training."""
    if not isinstance(per_layer, Mapping):
        return
    layers = {n for n, m in build_model(opts.model).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    unknown = sorted(set(per_layer) - layers)
    if unknown:
        raise RunError(f"{flag} names layers that {opts.model} does not have: {', '.join(unknown)} "
                       f"(its layers: {', '.join(sorted(layers))})")


def _check_tau0(value: Any, opts: Any) -> None:
    if opts.prior != "ghs" and (value is not None or opts.global_kl is not None):
        raise RunError("--tau0 and --global-kl apply to the group horseshoe prior (--prior ghs) only")
    if value is not None and not (value > 0 and value < float("inf")):
        raise RunError(f"--tau0 must be a positive finite number, got {value}")


def _check_thresholds(value: Any, opts: Any) -> None:
    check_thresholds(value)
    _check_layer_names(opts, value, "--thresholds")


def check_size_target(kept: Any, macs: Any) -> None:
    """--target-kept / --max-multiply-adds: at most one of them, each in its range."""
    if kept is not None and not (isinstance(kept, (int, float)) and 0 < kept <= 1):
        raise RunError(f"--target-kept is the share of the weights kept, in (0, 1]; got {kept!r}")
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, int) or macs < 1):
        raise RunError(f"--max-multiply-adds must be a positive integer, got {macs!r}")
    if kept is not None and macs is not None:
        raise RunError("--target-kept and --max-multiply-adds: give one size target")


def _check_size_target(value: Any, opts: Any) -> None:
    """A size target (`check_size_target`), not with thresholds set another way."""
    kept, macs = opts.target_kept, opts.max_multiply_adds
    check_size_target(kept, macs)
    flag = "--target-kept" if kept is not None else "--max-multiply-adds" if macs is not None else None
    if flag is not None and (opts.thresholds is not None or opts.auto_thresholds is not None):
        raise RunError(f"{flag} chooses the thresholds: not with --thresholds or --auto-thresholds")


def _check_max_var(value: Any, opts: Any) -> None:
    """A variance clamp must be a positive finite number, for layers the model has."""
    if value is None:
        return
    per_layer = value if isinstance(value, Mapping) else {"": value}
    for name, v in per_layer.items():
        if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            where = f" for {name}" if name else ""
            raise RunError(f"variance clamp (--clip-var){where} must be a positive finite number, got {v!r}")
    _check_layer_names(opts, value, "--clip-var")


def _check_input_origin(value: Any, opts: Any) -> None:
    """A finite number in float32's range that the model's first layer can take (`bayesianize`)."""
    if value is None:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise RunError(f"--input-origin: input origin must be a finite number, got {value!r}")
    check_number(value, "--input-origin", float32=True)
    plain = build_model(opts.model)  # the first layer's twin says whether it can take the origin
    first = first_layer(plain)
    try:
        bayesianize(torch.nn.Sequential(plain.get_submodule(first)), opts.prior, keep_weights=False,
                    input_origin={"0": value})
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise RunError(f"--input-origin on model {opts.model}: {first}: {str(exc).removeprefix('0: ')}") from exc


def _check_init_from(value: Any, opts: Any) -> None:
    if value is not None and not Path(value).is_file():
        raise RunError(f"--init-from: checkpoint not found: {value}")


def _check_train_subset(value: Any, opts: Any) -> None:
    if value is not None and value < 1:
        raise RunError(f"--train-subset must be ≥ 1, got {value}")


def _check_auto_thresholds(value: Any, opts: Any) -> None:
    _choice("--auto-thresholds", (None, "histogram", "validation"), "'histogram' or 'validation'")(value, opts)
    if value is not None and opts.thresholds is not None:
        if value != "histogram" or not isinstance(opts.thresholds, Mapping):
            raise RunError("--thresholds with --auto-thresholds: only with the histogram rule, and only for named "
                           "layers (fc1=2.5), which the rule then leaves alone; a single number or the validation "
                           "rule excludes the other option")


def _check_no_split(value: Any, opts: Any) -> None:
    if value not in NO_SPLIT:
        raise RunError(f"--no-split must be one of {', '.join(NO_SPLIT)}, got {value!r}")
    if value != "keep" and opts.auto_thresholds != "histogram":
        raise RunError(f"--no-split {value} says what the histogram rule does in a layer without a split: "
                       "it needs --auto-thresholds histogram")


def _check_val_fraction(value: Any, opts: Any) -> None:
    if not 0.0 < value < 1.0:
        raise RunError(f"--val-fraction: validation fraction must be in (0, 1), got {value}")


def _check_val_budget(value: Any, opts: Any) -> None:
    if not (value >= 0 and value < float("inf")):
        raise RunError(f"--val-budget: validation error budget must be a finite number ≥ 0 (points), got {value}")


def _check_pretrain_epochs(value: Any, opts: Any) -> None:
    if value < 0:
        raise RunError(f"--pretrain-epochs must be ≥ 0, got {value}")


def _check_device(value: Any, opts: Any) -> None:
    resolve_device(value)


# ---- the table ----

_KL_WEIGHT_HELP = ("Final weight β of the KL term: 1 is the ELBO; below 1 keeps more groups and fits better, above 1 "
                   "prunes more")
_CLIP_VAR_SWEEP = "Clamp σ² ≤ this: one number, or name=value pairs for some layers (default: the recipe)."
_BOTH = ("compress", "sweep")
_NO_SPLIT_AGAIN = _NO_SPLIT_HELP + "; the run's thresholds are chosen again with it (default: the run's own)."
_AUTO_HELP = ("Choose the log α thresholds after training: the split between the two modes of each layer's histogram, "
              "or the most compression within --val-budget on a validation split held out of the training set. With "
              "histogram, --thresholds fc1=2.5 sets the named layers' thresholds and the rule chooses the others'. "
              "Default: the recipe's (none with --thresholds for every layer).")


def _mean_epochs(value: Any, opts: Any) -> None:
    """--mean-epochs: an integer ≥ 0, and only after a fine-tuning (it goes on from the fine-tuned posterior)."""
    _positive_int("--mean-epochs", "mean fine-tuning epochs", minimum=0)(value, opts)
    if value and not getattr(opts, "finetune_epochs", 0):
        raise RunError(f"--mean-epochs {value} follows the fine-tuning: give --finetune-epochs too (≥ 1)")


OPTIONS: tuple[Option, ...] = (
    Option("model", "--model", "str", "lenet300", "Model from the zoo (see `bayescomp models`).", _BOTH,
           check=_known(MODELS, "model"), resume_fixed=True, helps={"sweep": "Model from the zoo."}),
    Option("prior", "--prior", "str", "gnj", "Group prior: gnj (normal-Jeffreys) or ghs (horseshoe).",
           check=_known(PRIORS, "prior"), resume_fixed=True),
    Option("tau0", "--tau0", "float | None", None, "Horseshoe: global scale τ0 of the prior (default 1e-5).",
           check=_check_tau0, resume_fixed=True),
    Option("global_kl", "--global-kl", "str | None", None,
           "Horseshoe: KL of the global scale, derived (default) or the paper-literal variant.", _BOTH,
           choices=("derived", "paper"), resume_fixed=True, helps={"sweep": None}),
    Option("recipe", "--recipe", "str | None", None,
           "Training recipe: fast (from a trained network in minutes) or paper (200 epochs from scratch, the paper's "
           "setting). It sets every option marked 'the recipe's' that you do not give (`bayescomp recipes` lists "
           "them).", choices=("fast", "paper"), cli_default="paper"),
    Option("epochs", "--epochs", "int", 10, "Training epochs", _BOTH, recipe=True,
           check=_positive_int("--epochs", "epochs"), helps={"sweep": None}),
    Option("data_dir", "--data-dir", "str | None", None,
           "Data root holding mnist/ (default: $BAYESCOMP_DATA, else the user cache).",
           (*_BOTH, "prune", "finetune", "threshold-sweep", "report", "evaluate", "fetch"),
           helps={"sweep": "Data root.", "prune": "Data root.", "threshold-sweep": "Data root.",
                  "finetune": "Data root (default: the run's).", "report": "Data root (for --sensitivity).",
                  "evaluate": "Data root holding mnist/ (or cifar10/).",
                  "fetch": "Data root to fill (default: $BAYESCOMP_DATA, else the user cache)."}),
    Option("seed", "--seed", "int", 0, None, _BOTH, check=lambda v, o: check_seed(v), resume_fixed=True),
    Option("batch_size", "--batch-size", "int", 128, "Examples per step", _BOTH, recipe=True, resume_fixed=True,
           helps={"sweep": None}),
    Option("lr", "--lr", "float", 1e-3, "Adam learning rate", _BOTH, recipe=True, resume_fixed=True,
           helps={"sweep": None}),
    Option("lr_scale", "--lr-scale", "dict[str, float]", None,
           "Learning-rate factors per parameter kind, e.g. variance=1,scale=10 (kinds: mean, variance, scale)",
           cli="lr_scale", recipe=True, resume_fixed=True),
    Option("lr_schedule", "--lr-schedule", "str", "constant",
           "constant: Adam at --lr throughout (the paper). cosine: the rate falls from --lr to 0 along half a cosine",
           choices=("constant", "cosine"), recipe=True, resume_fixed=True),
    Option("lr_decay_epochs", "--lr-decay-epochs", "float | None", None,
           "With --lr-schedule cosine: the fall takes only this many last epochs", recipe=True, resume_fixed=True,
           helps={"compress": "With --lr-schedule cosine: the fall takes only this many last epochs (default: the "
                              "recipe's; the paper recipe's: the whole run)."}),
    Option("z_draw", "--z-draw", "str", "example",
           "example: each example draws its own group scales z (the paper). batch: one z per batch, shared by its "
           "examples (fewer random numbers, a noisier ELBO)", choices=Z_DRAWS, recipe=True, resume_fixed=True),
    Option("warmup_epochs", "--warmup-epochs", "float", 0.0, "Linear KL warm-up length", _BOTH, recipe=True,
           check=lambda v, o: check_number(v, "--warmup-epochs", minimum=0), resume_fixed=True,
           helps={"sweep": None}),
    Option("kl_weight", "--kl-weight", "float", 1.0, _KL_WEIGHT_HELP, _BOTH, recipe=True, resume_fixed=True,
           helps={"sweep": _KL_WEIGHT_HELP + "."}),
    Option("thresholds", "--thresholds", "float | dict[str, float] | None", None,
           "log α thresholds: one number, or name=value pairs (fc1=-2.8,fc2=-3).", (*_BOTH, "prune", "finetune"),
           cli="per_layer", check=_check_thresholds,
           helps={"sweep": "log α thresholds: one number, or name=value pairs.",
                  "prune": "log α thresholds: one number, or name=value pairs (layers not named keep the run's own).",
                  "finetune": "log α thresholds that decide what is kept (default: the run's own): one number, or "
                              "name=value pairs (layers not named keep the run's own)."}),
    Option("max_var", "--clip-var", "float | dict[str, float] | None", None,
           "Clamp σ² ≤ this: one number for every layer, or name=value pairs (fc1=0.2) for those layers only "
           "(default: the model's recipe).", _BOTH, cli="per_layer", check=_check_max_var, resume_fixed=True,
           helps={"sweep": _CLIP_VAR_SWEEP}),
    Option("grad_clip", "--grad-clip", "float | None", None, "Clip the gradient norm to this value.",
           resume_fixed=True),
    Option("train_subset", "--train-subset", "int | None", None, "Train on N random training examples (quick runs).",
           _BOTH, check=_check_train_subset, resume_fixed=True,
           helps={"sweep": "Train on N random training examples."}),
    Option("bit_accounting", "--bit-accounting", "str", "code",
           "Bits per stored weight: 1+E+T (the paper's code) or T (the paper's table).",
           ("compress", "prune", "threshold-sweep"), choices=("code", "paper"),
           check=_choice("--bit-accounting", ("code", "paper"), "'code' or 'paper'"),
           helps={"prune": None, "threshold-sweep": "Bits per stored weight (default: the run's own)."},
           defaults={"threshold-sweep": None}),
    Option("init_from", "--init-from", "str | None", None, "state_dict of the plain model to start from.",
           cli="path", check=_check_init_from, resume_fixed=True),
    Option("pretrain_epochs", "--pretrain-epochs", "int", 0,
           "Train the plain model this many epochs first, then start the Bayesian model from it", _BOTH, recipe=True,
           check=_check_pretrain_epochs, resume_fixed=True,
           helps={"compress": "Train the plain model this many epochs first, then start the Bayesian model from it "
                              "(default: the recipe's, 0 with --init-from).",
                  "sweep": "Train the plain model this many epochs first, then start the Bayesian model from it."}),
    Option("pretrain_lr", "--pretrain-lr", "float | None", None,
           "Adam's learning rate for --pretrain-epochs (default: the recipe's; the paper recipe's: --lr).",
           recipe=True, check=_positive_finite("--pretrain-lr"), resume_fixed=True,
           helps={"compress": "Adam's learning rate for --pretrain-epochs (default: the recipe's; the paper "
                              "recipe's: --lr)."}),
    Option("input_origin", "--input-origin", "float | None", None,
           "The input value that carries no signal (MNIST here is in [-1, 1], blank -1): the first layer computes "
           "on x - origin, so blank inputs add neither signal nor sampling noise. Folded into the first layer's bias "
           "on compression: the compressed model takes the data as they are.", _BOTH, check=_check_input_origin,
           resume_fixed=True),
    Option("augment", "--no-augment", "bool", True, "CIFAR-10: no random crops and flips.", cli="negated",
           resume_fixed=True),
    Option("verify_data", "--no-verify", "bool", True,
           "Skip the published-checksum check (data you made yourself).",
           (*_BOTH, "prune", "threshold-sweep", "report", "evaluate"), cli="negated"),
    Option("auto_thresholds", "--auto-thresholds", "str | None", None, _AUTO_HELP, _BOTH,
           choices=("histogram", "validation"), recipe=True, check=_check_auto_thresholds,
           helps={"compress": _AUTO_HELP, "sweep": "Choose each run's thresholds after training (see `compress --help`)."}),
    Option("target_kept", "--target-kept", "float | None", None, _TARGET_KEPT_HELP, ("compress", "prune"), recipe=True,
           check=_check_size_target, helps={"prune": _TARGET_KEPT_HELP + "."}),
    Option("max_multiply_adds", "--max-multiply-adds", "int | None", None,
           "Size target: choose each layer's threshold so that the compressed model takes at most N multiply-adds "
           "per example, groups ranked by log α across layers; not with --thresholds.", ("compress", "prune"),
           check=lambda v, o: check_size_target(None, v)),
    Option("no_split", "--no-split", "str", "keep", _NO_SPLIT_HELP, (*_BOTH, "prune", "finetune"), choices=NO_SPLIT,
           recipe=True, check=_check_no_split, defaults={"prune": None, "finetune": None},
           helps={"sweep": _NO_SPLIT_HELP + ".", "prune": _NO_SPLIT_AGAIN, "finetune": _NO_SPLIT_AGAIN}),
    Option("val_budget", "--val-budget", "float", 0.5,
           "--auto-thresholds validation: allowed increase of the validation error (percentage points).", _BOTH,
           check=_check_val_budget, helps={"sweep": None}),
    Option("val_fraction", "--val-fraction", "float", 0.1,
           "--auto-thresholds validation: share of the training set held out for validation.", _BOTH,
           check=_check_val_fraction, helps={"sweep": None}),
    Option("variance_scale", "--variance-scale", "float", 1.0,
           "Multiply the posterior variances by this before reading each layer's bits (> 1: fewer bits).",
           ("compress", "prune", "threshold-sweep"), check=_positive_finite("--variance-scale", repr_value=False),
           helps={"threshold-sweep": "Variance scale for the bits (default: the run's own)."},
           defaults={"threshold-sweep": None}),
    Option("finetune_epochs", "--finetune-epochs", "int", 0,
           "After pruning, train the kept groups' posterior this many epochs more (the learning rate falling to 0), "
           "then compress exactly the groups kept", _BOTH, recipe=True,
           check=_positive_int("--finetune-epochs", "fine-tuning epochs", minimum=0),
           helps={"sweep": "After pruning, train the kept groups' posterior this many epochs more (the learning rate "
                           "falling to 0), then compress exactly the groups kept."}),
    Option("mean_epochs", "--mean-epochs", "int", 0,
           "After the fine-tuning, train the kept weights' posterior means this many epochs more with the noise off "
           "(cross-entropy alone, from --finetune-lr falling to 0); needs --finetune-epochs", _BOTH, recipe=True,
           check=_mean_epochs,
           helps={"sweep": "After the fine-tuning, train the kept weights' posterior means this many epochs more with "
                           "the noise off (cross-entropy alone, from --finetune-lr falling to 0); needs "
                           "--finetune-epochs."}),
    Option("finetune_lr", "--finetune-lr", "float | None", None,
           "The fine-tuning's starting learning rate, falling to 0 (default: the recipe's; else --lr).", recipe=True,
           check=_positive_finite("--finetune-lr"),
           helps={"compress": "The fine-tuning's starting learning rate, falling to 0 (default: the recipe's; else "
                              "--lr)."}),
    Option("finetune_kl_weight", "--finetune-kl-weight", "float | None", None,
           "The fine-tuning's KL weight; below 1 the kept weights fit the data more closely, with narrower posteriors "
           "(more bits)", recipe=True, check=_positive_finite("--finetune-kl-weight"),
           helps={"compress": "The fine-tuning's KL weight; below 1 the kept weights fit the data more closely, with "
                              "narrower posteriors (more bits) (default: the recipe's; else --kl-weight)."}),
    Option("device", "--device", "str", "cpu", "cpu, cuda, cuda:N, or auto (CUDA when available).",
           ("compress", "finetune"), check=_check_device,
           helps={"finetune": "cpu, cuda, cuda:N or auto (default: the run's)."}, defaults={"finetune": None}),
)

#: options that shape the training trajectory or the trained model: a resumed run must have the same ones
#: (`epochs` may grow; thresholds, bits, device, data location may change). `val_fraction` counts only
#: where a validation split is held out (`check_resume_options`).
RESUME_FIXED = tuple(o.name for o in OPTIONS if o.resume_fixed)


def _field(o: Option) -> tuple[str, str, Any]:
    default = field(default_factory=dict) if o.annotation.startswith("dict[") else field(default=o.default)
    return o.name, o.annotation, default


#: Everything that defines a run (stored in report.json as `config`): one field per `OPTIONS` record, and
#: `extra` for the fields a later version recorded that this one does not know.
RunOptions = make_dataclass("RunOptions", [*(_field(o) for o in OPTIONS),
                                           ("extra", "dict[str, Any]", field(default_factory=dict))])
RunOptions.__module__ = __name__
RunOptions.__doc__ = "Everything that defines a run (stored in report.json as `config`); see `OPTIONS`."


def check_option(name: str, value: Any) -> None:
    """Refuse a bad value of one run option given on its own (`prune`'s --variance-scale): its table check,
    for an option whose check needs no other option."""
    check = next(o for o in OPTIONS if o.name == name).check
    if check is not None:
        check(value, None)


def train_config(opts: Any) -> TrainConfig:
    """The training settings of the Bayesian model's run."""
    return TrainConfig(opts.epochs, opts.batch_size, opts.lr, opts.warmup_epochs, opts.seed, opts.grad_clip,
                       opts.kl_weight, lr_schedule=opts.lr_schedule, lr_decay_epochs=opts.lr_decay_epochs,
                       lr_scale=dict(opts.lr_scale), z_draw=opts.z_draw)


def validate(opts: Any) -> None:
    """Refuse bad options before any work or file is made: each option's own check, in the table's order,
    then the training settings as a whole (`TrainConfig.validate`) and the split of the global batch."""
    for o in OPTIONS:
        if o.check is not None:
            o.check(getattr(opts, o.name), opts)
    try:
        train_config(opts).validate()
    except ValueError as exc:
        raise train_error(exc) from exc
    if opts.batch_size % distributed.world_size():
        raise RunError(f"--batch-size {opts.batch_size} is the global batch: it must be divisible by the number of "
                       f"processes ({distributed.world_size()})")


def config_record(opts: Any) -> dict[str, Any]:
    """The options as report.json records them (`config`)."""
    return {k: v for k, v in asdict(opts).items() if k != "extra"} | opts.extra


def read_options(values: Any, path: Path, where: str = "") -> Any:
    """The RunOptions recorded in a file (options.json, or report.json's `config` with `where`="config."),
    checked field by field (`validate_options`) and as a whole (`validate`); errors name the file and field."""
    validate_options(values, path, RunOptions, where=where)
    fields = RunOptions.__dataclass_fields__
    opts = RunOptions(**{k: v for k, v in values.items() if k in fields and k != "extra"},
                      extra={k: v for k, v in values.items() if k not in fields})
    try:  # (the run's start file and device need not be here to read what it made)
        validate(replace(opts, init_from=None, device="cpu"))
    except RunError as exc:
        raise RunError(f"{path}: {'field ' + repr(where.rstrip('.')) + ': ' if where else ''}{exc}") from exc
    return opts


def check_resume_options(work: Path, opts: Any) -> None:
    """Refuse to resume the run in `work` with options that would change what it trains (`RESUME_FIXED`).

    A run started by a version that did not record its options (no options.json) is resumed as asked.
    """
    path = work / OPTIONS_FILE
    if not path.is_file():
        return
    started = validate_options(read_json(path), path, RunOptions, required=())
    now = asdict(opts)
    keys = list(RESUME_FIXED)
    if "validation" in (started.get("auto_thresholds"), now.get("auto_thresholds")):
        keys += ["auto_thresholds", "val_fraction"]  # the held-out split changes the training set
    defaults = asdict(RunOptions())  # an option the starting version did not record had its default
    changed = [f"{k}={started.get(k, defaults.get(k))!r} (now {now.get(k)!r})" for k in keys
               if started.get(k, defaults.get(k)) != now.get(k)]
    changed += filter(None, [length_change_refused(opts.lr_schedule, started.get("epochs"), opts.epochs)])
    if changed:
        raise RunError(f"the run in {work} was started with other options: {', '.join(changed)}; "
                       f"resume with the same options, or start afresh with --force")


__all__ = ["OPTIONS", "RESUME_FIXED", "Option", "RunOptions", "check_option", "check_size_target", "check_resume_options", "config_record",
           "read_options", "train_config", "validate"]
