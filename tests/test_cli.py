"""The command line end to end on a small real MNIST subset, and its errors (the README's examples: test_readme.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bayescomp.cli import main
from bayescomp.data import load_mnist
from bayescomp.io import load_plain
from bayescomp.train import predict

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets"))

REQUIRED = ["model", "prior", "epochs", "seed", "test_error", "test_error_uncompressed", "architecture",
            "weights_total", "weights_kept", "weights_kept_pct", "bits", "cr_architecture", "cr_fast",
            "train_seconds", "layers"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = CliRunner().invoke(main, [
        "compress", "--model", "lenet300", "--prior", "gnj", "--epochs", "2", "--train-subset", "3000",
        "--out", str(out), "--data-dir", str(DATA), "--quiet", "--thresholds", "fc1=-2.8,fc2=-3,fc3=-5",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_compress_writes_report_and_model(finished_run):
    out, output = finished_run
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED:
        assert key in report, key
    assert report["model"] == "lenet300" and report["prior"] == "gnj" and report["epochs"] == 2
    assert report["train_examples"] == 3000
    assert [layer["threshold"] for layer in report["layers"]] == [-2.8, -3.0, -5.0]
    assert report["weights_total"] == 266200
    assert report["architecture"] == "-".join(str(lay["inputs_kept"]) for lay in report["layers"])
    assert len(report["bits"]) == 3 and all(1 <= b <= 23 for b in report["bits"])
    assert report["test_error"] < 25.0
    assert not Path(str(out) + ".partial").exists()
    assert "architecture" in output and "CR fast prediction" in output
    # one JSON line of metrics per epoch
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_reported_error_is_the_saved_models_error(finished_run):
    out, _ = finished_run
    report = json.loads((out / "report.json").read_text())
    model, meta = load_plain(out / "model.pt")
    x, y = load_mnist("test", DATA)
    err = 100.0 * float((predict(model, x) != y).float().mean())
    assert err == pytest.approx(report["test_error"], abs=1e-9)
    assert meta["architecture"] == report["architecture"]
    # the saved model is plain PyTorch: no Bayesian parameter names
    assert not any("_mu" in k or "_logvar" in k for k in model.state_dict())


def test_evaluate_command(finished_run):
    out, _ = finished_run
    result = CliRunner().invoke(main, ["evaluate", str(out), "--data-dir", str(DATA)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert f"{report['test_error']:.2f}" in result.output


def _run_cli(args, tmp_path):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuchnet"], "unknown model"),
    (["--prior", "laplace"], "unknown prior"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--epochs", "-3"], "epochs must be a positive integer"),
    (["--prior", "gnj", "--tau0", "1e-3"], "--tau0"),
    (["--prior", "ghs", "--tau0", "0"], "tau0"),
])
def test_bad_options_fail_cleanly(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_corrupt_data_fails_cleanly(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(DATA / "mnist", root / "mnist")
    target = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    os.chmod(target, 0o644)
    blob = bytearray(target.read_bytes())
    blob[100] ^= 0xFF
    target.write_bytes(bytes(blob))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(root), "--quiet",
                                       "--epochs", "1", "--train-subset", "100"])
    assert result.exit_code == 1
    assert "t10k-labels" in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_thresholds_that_prune_everything_fail_cleanly(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "200", "--thresholds", "-50"])
    assert result.exit_code == 1
    assert "removes every group of layer fc1" in result.output
    assert not out.exists()


def test_clip_var_per_layer_clamps_those_layers_only(tmp_path, monkeypatch):
    from bayescomp import pipeline
    from bayescomp.convert import group_layers

    seen = {}
    real_fit = pipeline.fit

    def spy(model, *args, **kwargs):
        seen.update({name: layer.max_var for name, layer in group_layers(model).items()})
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit", spy)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet", "--prior",
                                       "ghs", "--epochs", "1", "--train-subset", "200", "--clip-var", "fc1=0.2"])
    assert result.exit_code == 0, result.output
    assert seen == {"fc1": 0.2, "fc2": None, "fc3": None}  # the recipe's clamps are replaced, not merged
    assert json.loads((out / "report.json").read_text())["config"]["max_var"] == {"fc1": 0.2}
    seen.clear()
    result = CliRunner().invoke(main, ["compress", "--out", str(tmp_path / "o2"), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "200", "--clip-var", "0.5"])
    assert result.exit_code == 0, result.output
    assert seen == {"fc1": 0.5, "fc2": 0.5, "fc3": 0.5}


@pytest.mark.parametrize("value, message", [
    ("fc9=0.2", "lenet300 does not have: fc9"),
    ("fc1=-1", "for fc1 must be a positive finite number"),
    ("0", "must be a positive finite number"),
    ("fc1=abc", "expected a number or name=value pairs"),
])
def test_bad_clip_var_fails_before_any_folder(tmp_path, value, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "100", "--clip-var", value])
    assert result.exit_code != 0 and message in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "runs" / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "100"])
    assert result.exit_code == 1 and "cannot write output directory" in result.output
    assert blocker.read_text() == "not a directory"


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "runs" / "nested" / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "100"])
    assert result.exit_code == 0, result.output
    assert (out / "report.json").is_file()


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "100"])
    assert result.exit_code == 1 and "already exists" in result.output
    assert (out / "keep.txt").read_text() == "precious"


def test_evaluate_missing_dir(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope"), "--data-dir", str(DATA)])
    assert result.exit_code == 1 and "not found" in result.output


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "bayescomp", "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lenet300" in proc.stdout and "lenet5" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "bayescomp", "compress", "--model", "nope", "--out", "/tmp/x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --model: unknown model")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_device_option(tmp_path):
    """--device cpu trains as before; CUDA asked for on a machine without it is a clear error, before any work."""
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet", "--epochs", "1",
                                  "--train-subset", "200", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["environment"]["device"] == "cpu"
    r = CliRunner().invoke(main, ["compress", "--out", str(tmp_path / "x"), "--data-dir", str(DATA), "--quiet",
                                  "--device", "tpu"])
    assert r.exit_code == 1 and "device" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["compress", "--out", str(tmp_path / "y"), "--data-dir", str(DATA), "--quiet",
                                      "--device", "cuda"])
        assert r.exit_code == 1 and "no CUDA" in r.output
        assert not (tmp_path / "y").exists() and not (tmp_path / "y.partial").exists()


@pytest.mark.parametrize("value", ["0", "-0.5", "nan"])
def test_bad_kl_weight_fails_before_any_folder(tmp_path, value):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--train-subset", "100", f"--kl-weight={value}"])
    assert result.exit_code != 0 and "KL weight must be positive and finite" in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def _small_run_report(tmp_path, *flags) -> dict:
    """report.json of a `compress` run on 200 examples (2 steps per epoch at batch 128) with these flags."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--train-subset", "200", *flags])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_kl_weight_reaches_training_and_the_report(tmp_path):
    report = _small_run_report(tmp_path, "--epochs", "1", "--kl-weight", "0.25")
    assert report["config"]["kl_weight"] == 0.25
    assert [row["beta"] for row in report["history"]] == [0.25]


def test_lr_schedule_reaches_training_and_the_report(tmp_path):
    report = _small_run_report(tmp_path, "--epochs", "2", "--lr-schedule", "cosine")
    assert report["config"]["lr_schedule"] == "cosine"
    # 4 steps in all: the rate of step 1 (end of epoch 1) is lr·½(1 + cos(π/4)), of step 3 (the last)
    # lr·½(1 + cos(3π/4))
    assert report["history"][0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + 2 ** -0.5))
    assert report["history"][1]["lr"] == pytest.approx(1e-3 * 0.5 * (1 - 2 ** -0.5))


def test_lr_decay_epochs_reaches_training_and_the_report(tmp_path):
    report = _small_run_report(tmp_path, "--epochs", "3", "--lr-schedule", "cosine", "--lr-decay-epochs", "1")
    assert report["config"]["lr_decay_epochs"] == 1.0
    # 6 steps, the last 2 on the cosine: lr at the ends of epochs 1 and 2, lr·½(1 + cos(π/2)) = lr/2 at the last
    assert [row["lr"] for row in report["history"]] == pytest.approx([1e-3, 1e-3, 0.5e-3])


def test_lr_decay_epochs_without_cosine_fails_before_any_folder(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--lr-decay-epochs", "1"])
    assert result.exit_code != 0 and "lr_decay_epochs needs a decaying learning-rate schedule" in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_unknown_lr_schedule_fails_before_any_folder(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", "--out", str(out), "--data-dir", str(DATA), "--quiet",
                                       "--epochs", "1", "--lr-schedule", "step"])
    assert result.exit_code != 0 and "step" in result.output and "cosine" in result.output
    assert not out.exists() and not Path(str(out) + ".partial").exists()


#: a bad value of every run option that has a check, and the text its one-line error must hold
_BAD_VALUES = {
    "model": ("nope", "--model"), "prior": ("gauss", "--prior"), "tau0": (1e-3, "--tau0"),
    "epochs": (0, "--epochs"), "seed": (-1, "--seed"), "warmup_epochs": (-1.0, "--warmup-epochs"),
    "thresholds": ({"fc9": -3.0}, "--thresholds"), "max_var": (-0.1, "--clip-var"),
    "train_subset": (0, "--train-subset"), "bit_accounting": ("bytes", "--bit-accounting"),
    "init_from": ("/no/such/file.pt", "--init-from"), "pretrain_epochs": (-1, "--pretrain-epochs"),
    "pretrain_lr": (0.0, "--pretrain-lr"), "input_origin": (float("nan"), "--input-origin"),
    "auto_thresholds": ("guess", "--auto-thresholds"), "no_split": ("floor", "--no-split"),
    "val_budget": (-1.0, "--val-budget"), "val_fraction": (1.0, "--val-fraction"),
    "variance_scale": (0.0, "--variance-scale"), "finetune_epochs": (-2, "--finetune-epochs"),
    "finetune_lr": (-1.0, "--finetune-lr"), "finetune_kl_weight": (0.0, "--finetune-kl-weight"),
    "mean_epochs": (-1, "--mean-epochs"),
    "device": ("tpu", "--device"),
    "target_kept": (1.5, "--target-kept"), "max_multiply_adds": (0, "--max-multiply-adds"),
}


def test_run_options_are_written_once():
    """One table: RunOptions' fields and defaults, the command line's options of compress and sweep, and the
    validation all come from `runoptions.OPTIONS`; each option's check refuses a bad value naming its flag."""
    from dataclasses import fields, replace

    from bayescomp.rundir import RunError
    from bayescomp.runoptions import OPTIONS, RESUME_FIXED, RunOptions, validate

    defaults = RunOptions()
    assert [f.name for f in fields(RunOptions)] == [o.name for o in OPTIONS] + ["extra"]
    for o in OPTIONS:
        assert getattr(defaults, o.name) == ({} if o.annotation.startswith("dict[") else o.default), o.name
    assert "model" in RESUME_FIXED and "epochs" not in RESUME_FIXED and "device" not in RESUME_FIXED
    for command, own in (("compress", {"--out", "--dataset", "--resume", "--force", "--quiet"}),
                         ("sweep", {"--tau0", "--out", "--force", "--report", "--quiet"})):
        listed = set(re.findall(r"^  (--[a-z0-9-]+)", CliRunner().invoke(main, [command, "--help"]).output, re.M))
        assert listed == {o.flag for o in OPTIONS if command in o.commands} | own, command
    for command in {c for o in OPTIONS for c in o.commands} - {"compress", "sweep"}:  # the run-reading commands
        args = ["data", "fetch"] if command == "fetch" else [command]
        text = CliRunner().invoke(main, [*args, "--help"]).output
        assert all(f"  {o.flag} " in text for o in OPTIONS if command in o.commands), command
    assert {o.name for o in OPTIONS if o.check is not None} == set(_BAD_VALUES)
    validate(defaults)
    for name, (bad, flag) in _BAD_VALUES.items():
        with pytest.raises(RunError) as err:
            validate(replace(defaults, **{name: bad}))
        assert flag in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
