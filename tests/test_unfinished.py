"""A run that has not finished: its options are recorded, a resume with other options is refused, and
its newest checkpoint can be compressed (`bayescomp prune DIR.partial`) while it goes on training."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import Interrupted, interrupted_run

import bayescomp
from bayescomp import pipeline
from bayescomp.cli import main
from bayescomp.compress.thresholds import histogram_thresholds
from bayescomp.pipeline import RunError, RunOptions, recompress, run
from bayescomp.report.table import progress_rows
from bayescomp.train import load_checkpoint, predict

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")


def _interrupted(tmp_path: Path, monkeypatch, **options) -> tuple[RunOptions, Path]:
    opts = RunOptions(model="lenet300", epochs=2, train_subset=1000, data_dir=DATA, **options)
    out = tmp_path / "run"
    interrupted_run(opts, out, monkeypatch)
    return opts, out


def test_unfinished_run_is_compressed_from_its_newest_checkpoint(tmp_path, monkeypatch):
    opts, out = _interrupted(tmp_path, monkeypatch)
    work = Path(str(out) + ".partial")
    assert not out.exists()
    assert json.loads((work / "options.json").read_text())["model"] == "lenet300"
    before = (work / "checkpoint.pt").read_bytes()

    report = recompress(out, tmp_path / "peek", None, data_dir=DATA)

    assert report["unfinished"] == {"from": str(work), "epochs_trained": 2, "epochs": 2}
    assert (work / "checkpoint.pt").read_bytes() == before  # the run is left alone
    # the same as compressing the checkpoint's model by hand, at the recipe's thresholds
    state = load_checkpoint(work / "checkpoint.pt")
    bmodel = bayescomp.bayesianize(bayescomp.models.build_model("lenet300"), "gnj", keep_weights=False)
    bmodel.load_state_dict(state["model"])
    by_hand = bayescomp.compress(bmodel.eval(), {"fc1": -2.8, "fc2": -3.0, "fc3": -5.0})
    assert report["architecture"] == by_hand.report["architecture"]
    assert report["bits"] == by_hand.report["bits"]
    x, y = bayescomp.data.load_mnist("test", DATA)
    err = 100.0 * float((predict(by_hand.model, x) != y).float().mean())
    assert report["test_error"] == pytest.approx(err, abs=1e-6)
    # the written folder is a normal run folder that every command reads
    assert {"report.json", "model.pt", "model.bcz", "posterior.pt"} <= {p.name for p in (tmp_path / "peek").iterdir()}
    assert not (tmp_path / "peek" / "options.json").exists()
    again = recompress(tmp_path / "peek", tmp_path / "again", None, data_dir=DATA)
    assert again["architecture"] == report["architecture"]


def test_prune_command_takes_the_partial_folder(tmp_path, monkeypatch):
    _, out = _interrupted(tmp_path, monkeypatch, prior="ghs", auto_thresholds="histogram")
    peek = tmp_path / "peek"
    result = CliRunner().invoke(main, ["prune", str(out) + ".partial", "--out", str(peek), "--data-dir", DATA])
    assert result.exit_code == 0, result.output
    report = json.loads((peek / "report.json").read_text())
    assert report["unfinished"]["epochs_trained"] == 2
    assert "2 of 2 (unfinished run)" in result.output
    # the run's own rule (Otsu split per layer) picked the thresholds
    posterior = pipeline.load_posterior(peek / "posterior.pt")
    expected = {name: c.value for name, c in histogram_thresholds(posterior).items()}
    assert [layer["threshold"] for layer in report["layers"]] == pytest.approx(list(expected.values()))


def test_resume_with_other_options_is_refused_and_same_options_finish(tmp_path, monkeypatch):
    opts, out = _interrupted(tmp_path, monkeypatch)
    with pytest.raises(RunError, match=r"prior='gnj' \(now 'ghs'\)"):
        run(RunOptions(**{**opts.__dict__, "prior": "ghs"}), out, resume=True, progress=False)
    with pytest.raises(RunError, match=r"max_var=None \(now 0\.01\)"):
        run(RunOptions(**{**opts.__dict__, "max_var": 0.01}), out, resume=True, progress=False)
    with pytest.raises(RunError, match=r"kl_weight=1\.0 \(now 0\.5\)"):
        run(RunOptions(**{**opts.__dict__, "kl_weight": 0.5}), out, resume=True, progress=False)
    # a run started by a version that did not record an option had that option's default
    options = Path(str(out) + ".partial") / "options.json"
    started = json.loads(options.read_text())
    del started["kl_weight"]
    options.write_text(json.dumps(started))
    pipeline.check_resume_options(Path(str(out) + ".partial"), opts)
    with pytest.raises(RunError, match=r"kl_weight=1\.0 \(now 2\.0\)"):
        pipeline.check_resume_options(Path(str(out) + ".partial"), RunOptions(**{**opts.__dict__, "kl_weight": 2.0}))
    with pytest.raises(RunError, match=r"lr_schedule='constant' \(now 'cosine'\)"):
        pipeline.check_resume_options(Path(str(out) + ".partial"), RunOptions(**{**opts.__dict__, "lr_schedule": "cosine"}))
    # thresholds and a longer run are allowed, and the longer run is what the folder then records
    with monkeypatch.context() as m:
        m.setattr(pipeline, "evaluate_compression", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
        with pytest.raises(Interrupted):
            run(RunOptions(**{**opts.__dict__, "epochs": 3, "thresholds": -3.0}), out, resume=True, progress=False)
    assert pipeline.run_progress(out)["epochs"] == 3 and pipeline.run_progress(out)["epochs_done"] == 3
    report = run(RunOptions(**{**opts.__dict__, "epochs": 3, "thresholds": -3.0}), out, resume=True, progress=False)
    assert [row["epoch"] for row in report["history"]] == [1, 2, 3]
    assert not (out / "options.json").exists() and not Path(str(out) + ".partial").exists()


def test_nothing_to_compress_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no trained posterior .* and no unfinished run"):
        recompress(tmp_path / "empty", tmp_path / "out", None, data_dir=DATA)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--data-dir", DATA])
    assert result.exit_code != 0 and "no unfinished run" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch):
    _, out = _interrupted(tmp_path, monkeypatch)
    work = Path(str(out) + ".partial")
    assert (work / "checkpoint.pt.prev").is_file()
    (work / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="compressing from the previous checkpoint"):
        report = recompress(out, tmp_path / "peek", None, data_dir=DATA)
    assert report["unfinished"]["epochs_trained"] == 1


def test_show_reports_the_progress_of_an_unfinished_run(tmp_path, monkeypatch):
    _, out = _interrupted(tmp_path, monkeypatch)
    for target in (str(out), str(out) + ".partial"):  # the run's name or its working folder
        result = CliRunner().invoke(main, ["show", target])
        assert result.exit_code == 0, result.output
        assert re.search(r"epochs\s+2 of 2\n", result.output)
        assert re.search(r"time left \(estimate\)\s+0 s\n", result.output)  # nothing left: `format_duration`
        assert f"bayescomp prune {out}.partial --out PEEK" in result.output
    progress = pipeline.run_progress(out)
    lines = (Path(str(out) + ".partial") / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert progress["epochs_done"] == 2 and progress["epochs"] == 2 and progress["last"] == last
    assert progress["seconds_spent"] == pytest.approx(sum(json.loads(line)["seconds"] for line in lines))
    assert progress["seconds_left"] == 0
    result = CliRunner().invoke(main, ["show", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no unfinished one" in result.output


def test_time_left_is_the_recent_epoch_time_times_the_epochs_left(tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "options.json").write_text(json.dumps({"model": "lenet300", "prior": "gnj", "epochs": 10}))
    rows = [{"epoch": i + 1, "seconds": s, "test_error": 2.0} for i, s in enumerate([100, 10, 20, 30, 40, 50])]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    progress = pipeline.run_progress(tmp_path / "run")
    assert progress["epoch_seconds"] == pytest.approx(30.0)  # the last five epochs: 10..50
    assert progress["seconds_left"] == pytest.approx(4 * 30.0)
    assert progress["seconds_spent"] == pytest.approx(250.0)


def test_progress_counts_the_fine_tuning_and_the_mean_fine_tuning(tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    options = {"model": "lenet300", "prior": "gnj", "epochs": 2, "finetune_epochs": 3, "mean_epochs": 4}
    (work / "options.json").write_text(json.dumps(options))
    for name, secs in (("metrics.jsonl", [10, 10]), ("finetune_metrics.jsonl", [10, 10, 10]),
                       ("finetune_mean_metrics.jsonl", [5])):
        (work / name).write_text("".join(json.dumps({"epoch": i + 1, "seconds": s, "loss": 0.5 + i}) + "\n"
                                         for i, s in enumerate(secs)))
    progress = pipeline.run_progress(tmp_path / "run")
    assert (progress["finetune_epochs_done"], progress["mean_epochs_done"], progress["mean_epochs"]) == (3, 1, 4)
    assert progress["seconds_spent"] == pytest.approx(55.0)
    assert progress["epoch_seconds"] == pytest.approx(9.0)  # the last five: 10, 10, 10, 10, 5
    assert progress["seconds_left"] == pytest.approx(3 * 9.0)  # three epochs of the means left
    assert progress["last"]["epoch"] == 1 and progress["last"]["seconds"] == 5
    assert ("mean fine-tuning epochs", "1 of 4") in progress_rows(progress)


def test_cosine_run_resumes_only_to_its_own_length(tmp_path, monkeypatch):
    """A cosine schedule is laid out over the epochs the run started with: a longer resume is refused."""
    opts, out = _interrupted(tmp_path, monkeypatch, lr_schedule="cosine")
    work = Path(str(out) + ".partial")
    with pytest.raises(RunError, match=r"epochs=2 \(now 3; the cosine learning-rate schedule .* cannot be extended\)"):
        run(RunOptions(**{**opts.__dict__, "epochs": 3}), out, resume=True, progress=False)
    pipeline.check_resume_options(work, opts)  # the same length is fine
    report = run(opts, out, resume=True, progress=False)
    assert report["config"]["lr_schedule"] == "cosine" and [row["epoch"] for row in report["history"]] == [1, 2]
    assert report["history"][-1]["lr"] < 0.1 * opts.lr


def test_prune_with_some_layers_named_keeps_the_run_s_thresholds_for_the_others(tmp_path, monkeypatch):
    _, out = _interrupted(tmp_path, monkeypatch)  # the recipe's thresholds: fc1 −2.8, fc2 −3, fc3 −5
    peek = recompress(out, tmp_path / "peek", {"fc2": -2.5}, data_dir=DATA)
    assert peek["thresholds"] == {"fc1": -2.8, "fc2": -2.5, "fc3": -5.0}
    again = recompress(tmp_path / "peek", tmp_path / "again", {"fc1": -2.0}, data_dir=DATA)
    assert again["thresholds"] == {"fc1": -2.0, "fc2": -2.5, "fc3": -5.0}
