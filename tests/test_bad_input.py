"""Bad input is refused in one line that names the file and field, or the option (issue 21, defects 6 and 7):
malformed and mismatched report.json through every command that reads a run folder, each bad option before
any data is loaded, refused pickles without unsafe advice, NaN errors that name the layer and the cause."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bayescomp
from bayescomp import pipeline, sweep
from bayescomp.cli import main
from bayescomp.train import TrainConfig, TrainingDivergedError, fit

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "run"
    result = CliRunner().invoke(main, ["compress", "--epochs", "1", "--train-subset", "100", "--out", str(out),
                                       "--data-dir", DATA, "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: the commands must refuse their input before they load any."""
    def refuse(*args, **kwargs):
        raise AssertionError("data were loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_data", refuse)
    monkeypatch.setattr(sweep, "load_data", refuse)


#: every command that reads a finished run folder (the folder's path goes after the command's own words)
READERS = {
    "show": ["show"],
    "evaluate": ["evaluate", "--data-dir", DATA],
    "report": ["report"],
    "threshold-sweep": ["threshold-sweep", "--values", "-3,-2"],
    "prune": ["prune", "--out", "{tmp}/pruned", "--data-dir", DATA],
    "finetune": ["finetune", "--epochs", "1", "--out", "{tmp}/tuned", "--data-dir", DATA, "--quiet"],
    "pack": ["pack"],
    "export": ["export"],
}


def reader_args(command: str, run_dir: Path, tmp: Path) -> list[str]:
    words = [w.replace("{tmp}", str(tmp)) for w in READERS[command]]
    return [words[0], str(run_dir), *words[1:]]


def _report(finished: Path) -> dict:
    return json.loads((finished / "report.json").read_text())


MALFORMED = {
    "a list": lambda r, text: "[]",
    "empty object": lambda r, text: "{}",
    "string test_error": lambda r, text: json.dumps({**r, "test_error": "1.2"}),
    "truncated": lambda r, text: text[: len(text) // 2],
    "null layers": lambda r, text: json.dumps({**r, "layers": None}),
    "bits of another length": lambda r, text: json.dumps({**r, "bits": r["bits"][:1]}),
    "config with a string lr": lambda r, text: json.dumps({**r, "config": {**r["config"], "lr": "fast"}}),
}

MESSAGES = {
    "a list": "a run report is a JSON object, got list",
    "empty object": "field 'model' is missing",
    "string test_error": "field 'test_error' must be a finite number, got \"1.2\"",
    "truncated": "is not valid JSON",
    "null layers": "field 'layers' must be a list of layer objects",
    "bits of another length": "field 'bits' has 1 entries for 3 layers",
    "config with a string lr": "field 'config.lr' must be a number",
}


@pytest.mark.parametrize("command", list(READERS))
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_report_is_one_line_naming_file_and_field(finished, tmp_path, no_data, command, case):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    text = (run_dir / "report.json").read_text()
    (run_dir / "report.json").write_text(MALFORMED[case](json.loads(text), text))
    before = sorted(p.name for p in run_dir.iterdir())
    line = _one_line_error(CliRunner().invoke(main, reader_args(command, run_dir, tmp_path)))
    assert str(run_dir / "report.json") in line and MESSAGES[case] in line
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


MISMATCHED = {
    "model": (lambda r: {**r, "model": "lenet5", "config": {**r["config"], "model": "lenet5"}}, "'model' is \"lenet5\""),
    "prior": (lambda r: {**r, "prior": "ghs", "config": {**r["config"], "prior": "ghs"}}, "'prior' is \"ghs\""),
    "architecture": (lambda r: {**r, "architecture": "784-10-10"}, "'architecture' is \"784-10-10\""),
    "config": (lambda r: {**r, "config": {**r["config"], "model": "lenet5"}}, "'config.model' (\"lenet5\") differs"),
}


@pytest.mark.parametrize("command", list(READERS))
@pytest.mark.parametrize("case", list(MISMATCHED))
def test_report_of_another_run_than_the_folder_s_files_is_refused(finished, tmp_path, no_data, command, case):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    change, message = MISMATCHED[case]
    (run_dir / "report.json").write_text(json.dumps(change(_report(finished))))
    line = _one_line_error(CliRunner().invoke(main, reader_args(command, run_dir, tmp_path)))
    assert str(run_dir / "report.json") in line and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("args, message", [
    (["--seed", "99999999999999999999999"], "--seed must be an integer from 0 to"),
    (["--seed", "-1"], "--seed must be an integer from 0 to"),
    (["--input-origin", "1e300"], "--input-origin must be a finite number within float32's range"),
    (["--input-origin", "nan"], "--input-origin"),
    (["--thresholds", "nan"], "--thresholds must be a number"),
    (["--thresholds", "fc1=nan"], "--thresholds for fc1 must be a number"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (["--lr", "nan"], "--lr: learning rate must be positive"),
    (["--lr", "0"], "--lr: learning rate must be positive"),
    (["--batch-size", "0"], "--batch-size: batch size must be a positive integer"),
    (["--kl-weight", "inf"], "--kl-weight: KL weight must be positive and finite"),
    (["--grad-clip", "nan"], "--grad-clip: gradient clip must be positive"),
    (["--lr-schedule", "cosine", "--lr-decay-epochs", "nan"], "--lr-decay-epochs"),
    (["--train-subset", "0"], "--train-subset must be ≥ 1"),
    (["--val-fraction", "nan", "--auto-thresholds", "validation"], "--val-fraction"),
    (["--variance-scale", "nan"], "--variance-scale must be a positive finite number"),
    (["--device", "tpu"], "--device"),
    (["--epochs", "0"], "--epochs"),
    (["--out", ""], "--out is empty"),
    (["--out", "."], "--out '.' names no folder of its own"),
    (["--out", "x.partial"], "reserved for the working folders"),
])
def test_bad_compress_option_is_refused_before_any_data_naming_the_option(tmp_path, monkeypatch, no_data, args,
                                                                          message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compress", "--out", "o", "--epochs", "1", "--quiet", *args])
    assert message in _one_line_error(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, message", [
    (["prune", "{run}", "--out", "{tmp}/p", "--thresholds", "nan"], "--thresholds must be a number"),
    (["prune", "{run}", "--out", "{tmp}/p", "--thresholds", "fc2=nan"], "--thresholds for fc2 must be a number"),
    (["prune", "{run}", "--out", "{tmp}/p", "--variance-scale", "nan"], "--variance-scale must be a positive"),
    (["finetune", "{run}", "--out", "{tmp}/p", "--thresholds", "nan"], "--thresholds must be a number"),
    (["finetune", "{run}", "--out", "{tmp}/p", "--epochs", "0"], "--epochs: fine-tuning epochs must be"),
    (["threshold-sweep", "{run}", "--values", "-3,nan"], "--values must be a number"),
    (["threshold-sweep", "{run}", "--values", "-3", "--variance-scale", "0"], "--variance-scale must be"),
])
def test_bad_option_of_a_reading_command_is_refused_before_any_data(finished, tmp_path, no_data, command, message):
    args = [w.replace("{run}", str(finished)).replace("{tmp}", str(tmp_path)) for w in command]
    before = sorted(p.name for p in finished.iterdir())
    assert message in _one_line_error(CliRunner().invoke(main, args))
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in finished.iterdir()) == before


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this-must-never-run",))


@pytest.mark.parametrize("name", ["posterior.pt", "model.pt"])
def test_refused_pickle_is_one_line_without_unsafe_advice(finished, tmp_path, capfd, name):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    torch.save({"state_dict": _Payload()}, run_dir / name)
    command = ["prune", str(run_dir), "--out", str(tmp_path / "p"), "--data-dir", DATA] if name == "posterior.pt" \
        else ["pack", str(run_dir)]
    line = _one_line_error(CliRunner().invoke(main, command))
    assert str(run_dir / name) in line and "never unpickles" in line
    assert "weights_only" not in line and "posix.system" in line
    assert "this-must-never-run" not in capfd.readouterr().out


def _tiny():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = bayescomp.bayesianize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
    return model, (x, y)


def test_nan_from_a_too_high_learning_rate_names_layer_parameter_and_the_rate():
    model, train = _tiny()
    with pytest.raises(TrainingDivergedError) as info:
        fit(model, train, TrainConfig(epochs=30, batch_size=16, lr=1e12), progress=False)
    text = str(info.value)
    assert "\n" not in text and "likely cause: a learning rate too high" in text and "--lr 1e+12" in text
    assert re.search(r"layer [02]\b", text) and re.search(r"\b[02]\.(weight|bias|z)_\w+", text), text


def test_nan_from_an_overflowing_layer_names_that_layer():
    model, train = _tiny()
    with torch.no_grad():
        model[2].weight_mu.fill_(3e38)  # finite, but its output overflows to inf
    with pytest.raises(TrainingDivergedError, match=r"step 1: the output of layer 2 is the first non-finite one "
                                                    r"\(its parameters are finite; the largest, 2\.weight_mu, "
                                                    r"reaches 3e\+38\); likely cause: a learning rate"):
        fit(model, train, TrainConfig(epochs=1, batch_size=16), progress=False)


def test_nan_in_the_data_is_named_as_the_data():
    model, (x, y) = _tiny()
    x[5, 3] = float("inf")
    with pytest.raises(TrainingDivergedError, match="the input batch holds NaN/inf values; the data are damaged"):
        fit(model, (x, y), TrainConfig(epochs=1, batch_size=64), progress=False)


def test_evaluate_of_a_bare_file_refuses_an_unknown_model_before_any_data(finished, no_data):
    result = CliRunner().invoke(main, ["evaluate", str(finished / "model.pt"), "--model", "nosuchnet"])
    assert "--model: unknown model 'nosuchnet'" in _one_line_error(result)


def test_export_of_a_bare_model_file_writes_beside_it(finished, tmp_path):
    shutil.copy(finished / "model.pt", tmp_path / "lenet.pt")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "lenet.pt"), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lenet.safetensors").is_file()


def test_sweep_refuses_a_bad_option_before_making_its_folder(tmp_path, no_data):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", "--tau0", "1e-5", "--tau0", "1e-3", "--out", str(out), "--lr", "nan",
                                       "--quiet"])
    assert "--lr: learning rate must be positive" in _one_line_error(result)
    assert not out.exists()


def test_show_of_an_unfinished_run_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "options.json").write_text(json.dumps({"model": "lenet300", "prior": "gnj", "epochs": 5}))
    row = {"epoch": 1, "loss": 0.5, "train_error": 9.0, "seconds": 2.0}
    (work / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "epoch": 2})[:20])
    result = CliRunner().invoke(main, ["show", str(work)])
    assert result.exit_code == 0, result.output
    assert "1 of 5" in result.output
    (work / "metrics.jsonl").write_text("[1, 2]\n" + json.dumps(row) + "\n")
    line = _one_line_error(CliRunner().invoke(main, ["show", str(work)]))
    assert f"{work / 'metrics.jsonl'}: line 1 is not an epoch row" in line
    (work / "metrics.jsonl").write_text(json.dumps({**row, "seconds": 1e308 * 10}) + "\n")
    assert "line 1 is not an epoch row" in _one_line_error(CliRunner().invoke(main, ["show", str(work)]))
