"""Reading a run folder safely: report.json and options.json checked field by field, and its files checked
against each other (model name, prior, architecture), before any command uses them.

Every error is one line that names the file and the field, so a damaged or mixed-up folder is refused
cleanly instead of failing somewhere deep inside a command (or, worse, being used: one model's name printed
beside another's error).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .rundir import MODEL_FILE, PACKED_FILE, POSTERIOR_FILE, REPORT, RunError

Check = Callable[[Any], bool]


def _num(v: Any) -> bool:
    """A JSON number (not a bool), not NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _finite(v: Any) -> bool:
    return _num(v) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return _int(v) and v >= 0


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _dict_of(check: Check) -> Check:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())


def _dict(v: Any) -> bool:
    return isinstance(v, dict)


def _row(v: Any) -> bool:
    """A row of a training history: an epoch number and figures (numbers, None, or per-layer counts)."""
    return (isinstance(v, dict) and _int(v.get("epoch"))
            and all(x is None or _num(x) or _dict_of(_num)(x) for x in v.values()))


_LAYER: dict[str, tuple[Check, str, bool]] = {
    "name": (_str, "a string", True),
    "kind": (_str, "a string", False),
    "threshold": (_optional(_num), "a number or null", False),
    "bits": (_optional(_count), "an integer ≥ 0 or null", False),
    "groups_total": (_optional(_count), "an integer ≥ 0 or null", False),
    "groups_kept": (_optional(_count), "an integer ≥ 0 or null", False),
    "inputs_total": (_count, "an integer ≥ 0", False),
    "inputs_kept": (_count, "an integer ≥ 0", False),
    "outputs_total": (_count, "an integer ≥ 0", False),
    "outputs_kept": (_count, "an integer ≥ 0", False),
    "weights_total": (_count, "an integer ≥ 0", False),
    "weights_kept": (_count, "an integer ≥ 0", False),
}

_FINETUNE: dict[str, tuple[Check, str, bool]] = {
    "epochs": (_count, "an integer ≥ 0", True),
    "test_error_before": (_finite, "a finite number", True),
    "test_error_uncompressed_before": (_finite, "a finite number", True),
    "seconds": (_num, "a number", False),
    "history": (_list_of(_row), "a list of epoch rows", False),
    "mean": (_dict, "an object", False),
}

_UNFINISHED: dict[str, tuple[Check, str, bool]] = {
    "from": (_str, "a string", False),
    "epochs_trained": (_count, "an integer ≥ 0", True),
    "epochs": (_count, "an integer ≥ 0", True),
    "finetune_epochs_done": (_count, "an integer ≥ 0", False),
    "finetune_epochs": (_count, "an integer ≥ 0", False),
    "mean_epochs_done": (_count, "an integer ≥ 0", False),
    "mean_epochs": (_count, "an integer ≥ 0", False),
}

_CHOICE: dict[str, tuple[Check, str, bool]] = {
    "value": (_optional(_num), "a number or null", False),
    "method": (_optional(_str), "a string", False),
    "reason": (_optional(_str), "a string", False),
    "kept": (_optional(_count), "an integer ≥ 0", False),
    "total": (_optional(_count), "an integer ≥ 0", False),
    "details": (_optional(_dict), "an object", False),
}

#: report.json: field -> (check, what it must be, required)
REPORT_FIELDS: dict[str, tuple[Check, str, bool]] = {
    "model": (_str, "a model name", True),
    "prior": (_str, "a prior name", True),
    "test_error": (_finite, "a finite number", True),
    "test_error_uncompressed": (_finite, "a finite number", True),
    "architecture": (_str, "a string", True),
    "weights_total": (_count, "an integer ≥ 0", True),
    "weights_kept": (_count, "an integer ≥ 0", True),
    "weights_kept_pct": (_finite, "a finite number", True),
    "bits": (_list_of(_optional(_count)), "a list of integers (or null)", True),
    "cr_architecture": (_num, "a number", True),
    "cr_fast": (_num, "a number", True),
    "layers": (_list_of(_dict), "a list of layer objects", True),
    "thresholds": (_optional(_dict_of(_optional(_num))), "an object of layer: number", False),
    "epochs": (_optional(_count), "an integer ≥ 0", False),
    "seed": (_optional(_int), "an integer", False),
    "train_examples": (_count, "an integer ≥ 0", False),
    "validation_examples": (_count, "an integer ≥ 0", False),
    "train_seconds": (_num, "a number", False),
    "compress_seconds": (_num, "a number", False),
    "exponent_bits": (_count, "an integer ≥ 0", False),
    "bit_accounting": (lambda v: v in ("code", "paper"), "'code' or 'paper'", False),
    "variance_scale": (lambda v: _finite(v) and v > 0, "a positive number", False),
    "rounded": (lambda v: isinstance(v, bool), "true or false", False),
    "bits_reduce": (_str, "a string", False),
    "cr_max": (_num, "a number", False),
    "cr_file": (_num, "a number", False),
    "file_bytes": (_count, "an integer ≥ 0", False),
    "packed": (_dict, "an object", False),
    "config": (_dict, "an object", False),
    "history": (_list_of(_row), "a list of epoch rows", False),
    "environment": (_dict, "an object", False),
    "threshold_choice": (_optional(_dict_of(_dict)), "an object of layer: choice", False),
    "finetune": (_dict, "an object", False),
    "unfinished": (_dict, "an object", False),
    "command": (_str, "a string", False),
    "source_command": (_str, "a string", False),
    "training_command": (_str, "a string", False),
    "recompressed_from": (_str, "a string", False),
    "finetuned_from": (_str, "a string", False),
}


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(doc: Mapping[str, Any], fields: Mapping[str, tuple[Check, str, bool]], path: Path,
                  where: str = "") -> None:
    for name, (check, what, required) in fields.items():
        if name not in doc:
            if required:
                raise RunError(f"{path}: field {where + name!r} is missing")
            continue
        if not check(doc[name]):
            raise RunError(f"{path}: field {where + name!r} must be {what}, got {_shown(doc[name])}")


def validate_report(report: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a parsed report.json (types, names, and that its parts agree); return it, or raise RunError."""
    from .convert import PRIORS
    from .models import MODELS

    path = Path(path)
    if not isinstance(report, dict):
        raise RunError(f"{path}: a run report is a JSON object, got {type(report).__name__}")
    _check_fields(report, REPORT_FIELDS, path)
    if report["model"] not in MODELS:
        raise RunError(f"{path}: field 'model' names no model of the zoo: {_shown(report['model'])}")
    if report["prior"] not in PRIORS:
        raise RunError(f"{path}: field 'prior' must be one of {', '.join(sorted(PRIORS))}, got {_shown(report['prior'])}")
    names = []
    for i, layer in enumerate(report["layers"]):
        _check_fields(layer, _LAYER, path, f"layers[{i}].")
        names.append(layer["name"])
    if len(set(names)) != len(names):
        raise RunError(f"{path}: field 'layers' names a layer twice")
    if len(report["bits"]) != len(names):
        raise RunError(f"{path}: field 'bits' has {len(report['bits'])} entries for {len(names)} layers")
    unknown = sorted(set(report.get("thresholds") or {}) - set(names))
    if unknown:
        raise RunError(f"{path}: field 'thresholds' names layers the run does not have: {', '.join(unknown)}")
    if report["weights_kept"] > report["weights_total"]:
        raise RunError(f"{path}: field 'weights_kept' ({report['weights_kept']}) exceeds 'weights_total' "
                       f"({report['weights_total']})")
    for key, fields in (("finetune", _FINETUNE), ("unfinished", _UNFINISHED)):
        if key in report:
            _check_fields(report[key], fields, path, f"{key}.")
    for name, choice in (report.get("threshold_choice") or {}).items():
        _check_fields(choice, _CHOICE, path, f"threshold_choice.{name}.")
    config = report.get("config")
    if config is not None:
        from .pipeline import RunOptions  # (pipeline reads run folders through this module)

        validate_options(config, path, RunOptions, where="config.", required=())
        for key in ("model", "prior"):
            if key in config and config[key] != report[key]:
                raise RunError(f"{path}: field 'config.{key}' ({_shown(config[key])}) differs from '{key}' "
                               f"({_shown(report[key])})")
    return report


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is a RunError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RunError(f"{path} is not valid JSON{where}; it may be truncated") from None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch rows of a metrics file (one JSON object a line). A torn last line (the process was killed while
    appending it) is skipped; any other line that is not an epoch row is a RunError naming the file and line."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunError(f"{path}: line {i + 1} is not valid JSON") from None
        if not _row(row) or not all(_finite(v) for v in row.values() if _num(v)):
            raise RunError(f"{path}: line {i + 1} is not an epoch row (an object with an integer 'epoch' and "
                           "finite numbers)")
        rows.append(row)
    return rows


def read_report(run_dir: str | os.PathLike, *, required: bool = True) -> dict[str, Any] | None:
    """The validated report.json of a run folder (`validate_report`); None if it has none and not `required`."""
    path = Path(run_dir) / REPORT
    if not path.is_file() and not required:
        return None
    return validate_report(read_json(path), path)


def _option_checks(annotation: str) -> tuple[Check, str]:
    """The check of a dataclass field from its annotation string ('float | None', 'dict[str, float] | None')."""
    parts = {p.strip().split("[")[0] for p in annotation.split("|")}
    simple: dict[str, tuple[Check, str]] = {
        "int": (_int, "an integer"), "float": (_num, "a number"), "str": (_str, "a string"),
        "bool": (lambda v: isinstance(v, bool), "true or false"), "None": (lambda v: v is None, "null"),
        "dict": (_dict_of(_num), "an object of layer: number"),
    }
    if not parts <= set(simple):  # a type this reader does not know: any JSON value
        return (lambda v: True), "any value"
    checks = [simple[p] for p in sorted(parts)]
    return (lambda v: any(c(v) for c, _ in checks)), " or ".join(w for _, w in checks)


def validate_options(values: Any, path: str | os.PathLike, options_type: type, *, where: str = "",
                     required: tuple[str, ...] = ("model", "prior", "epochs")) -> dict[str, Any]:
    """Check run options read from a file (options.json, or report.json's `config`: `where`="config.") against
    the fields of `options_type` (a dataclass: `pipeline.RunOptions`): each known field has its type; unknown
    ones are kept."""
    path = Path(path)
    if not isinstance(values, dict):
        what = f"field {where.rstrip('.')!r}" if where else "run options"
        raise RunError(f"{path}: {what} must be a JSON object, got {type(values).__name__}")
    fields = {name: (*_option_checks(str(f.type)), name in required)
              for name, f in options_type.__dataclass_fields__.items() if name != "extra"}
    fields["extra"] = (_dict, "an object", False)
    _check_fields(values, fields, path, where)
    return values


def _packed_meta(path: Path) -> dict[str, Any]:
    from .io import read_packed

    return read_packed(path)[1]


def check_files(run_dir: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Refuse a run folder whose files belong to different runs: model.pt, model.bcz and posterior.pt must be of
    the model (and prior, architecture) its report.json names. Files that are absent are not checked."""
    from .io import load_plain
    from .train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    report_path = run_dir / REPORT
    found: list[tuple[Path, Mapping[str, Any], tuple[str, ...]]] = []
    if (run_dir / MODEL_FILE).is_file():
        found.append((run_dir / MODEL_FILE, load_plain(run_dir / MODEL_FILE)[1], ("model", "prior", "architecture")))
    if (run_dir / PACKED_FILE).is_file():
        found.append((run_dir / PACKED_FILE, _packed_meta(run_dir / PACKED_FILE), ("architecture", "weights_total")))
    if (run_dir / POSTERIOR_FILE).is_file():
        state = load_checkpoint(run_dir / POSTERIOR_FILE)
        found.append((run_dir / POSTERIOR_FILE, state, ("model", "prior")))
        weights = state.get("state_dict")
        if isinstance(weights, Mapping):
            missing = [lay["name"] for lay in report["layers"] if lay.get("threshold") is not None
                       and not any(str(k).startswith(lay["name"] + ".") for k in weights)]
            if missing:
                raise RunError(f"{report_path}: field 'layers' names {', '.join(missing)}, which "
                               f"{run_dir / POSTERIOR_FILE} does not have: the files are of different runs")
    for path, meta, keys in found:
        for key in keys:
            if key in meta and meta[key] is not None and meta[key] != report[key]:
                raise RunError(f"{report_path}: field {key!r} is {_shown(report[key])}, but {path} is of "
                               f"{_shown(meta[key])}: the files are of different runs")


def read_run(run_dir: str | os.PathLike, *, required: bool = True) -> dict[str, Any] | None:
    """The report.json of a finished run folder, validated, with the folder's files checked against it."""
    report = read_report(run_dir, required=required)
    if report is not None:
        check_files(run_dir, report)
    return report


__all__ = ["REPORT_FIELDS", "check_files", "read_json", "read_metrics", "read_report", "read_run", "validate_options",
           "validate_report"]
