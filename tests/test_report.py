"""Figures, the Markdown page and the precision sensitivity, on a tiny real run made with the CLI."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bayescomp.cli import main
from bayescomp.compress import compression_masks
from bayescomp.compress.sensitivity import VERDICTS, precision_sensitivity
from bayescomp.compress.thresholds import histogram_thresholds
from bayescomp.convert import bayesianize
from bayescomp.data import load_mnist
from bayescomp.models import build_model
from bayescomp.pipeline import load_posterior
from bayescomp.report.page import write_report
from bayescomp.report.plots import plot_log_alpha_histograms, plot_pareto, plot_training_curves, plot_weights
from bayescomp.runfigures import write_sensitivity

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "tmp"
    result = CliRunner().invoke(main, ["compress", "--model", "lenet300", "--epochs", "1", "--train-subset", "300",
                                       "--data-dir", str(DATA), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def posterior(tiny_run):
    return load_posterior(tiny_run / "posterior.pt")


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024, (path, len(data))


def test_plot_log_alpha_histograms(tiny_run, posterior, tmp_path):
    report = json.loads((tiny_run / "report.json").read_text())
    p = plot_log_alpha_histograms(posterior, report["thresholds"], tmp_path / "la.png")
    assert p == tmp_path / "la.png"
    _assert_png(p)
    # ThresholdChoice values, a single float, the defaults, and suggested lines all work
    _assert_png(plot_log_alpha_histograms(posterior, histogram_thresholds(posterior), tmp_path / "la2.png",
                                          suggested=histogram_thresholds(posterior, "gmm")))
    _assert_png(plot_log_alpha_histograms(posterior, -3.0, tmp_path / "la3.png"))
    _assert_png(plot_log_alpha_histograms(posterior, None, tmp_path / "la4.png"))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_plot_weights_mlp_and_conv(posterior, tmp_path):
    masks = compression_masks(posterior, {"fc1": -8.98, "fc2": -3.0, "fc3": -5.0})  # prunes some input pixels
    _assert_png(plot_weights(posterior, masks, tmp_path / "w.png"))
    _assert_png(plot_weights(posterior, None, tmp_path / "w_default.png"))
    torch.manual_seed(0)
    conv = bayesianize(build_model("lenet5"), "gnj", keep_weights=False)
    _assert_png(plot_weights(conv, None, tmp_path / "w_conv.png"))


def test_plot_pareto(tmp_path):
    points = [
        {"tau0": 1e-5, "test_error": 2.0, "weights_kept_pct": 5.0, "elbo": -100.0},
        {"tau0": 1e-4, "test_error": 1.8, "weights_kept_pct": 8.0, "elbo": -90.0},
        {"tau0": 1e-3, "test_error": 2.5, "weights_kept_pct": 9.0, "elbo": -95.0},
        {"tau0": 1e-2, "test_error": None, "weights_kept_pct": None, "elbo": None},
    ]
    _assert_png(plot_pareto(points, tmp_path / "pareto.png"))
    _assert_png(plot_pareto(points, tmp_path / "pareto_cr.png", x="weights_kept_pct", chosen=0))
    thresholds = [{"threshold": {"fc1": -3.0}, "test_error": 2.0, "weights_kept_pct": 4.0, "pareto": True}]
    _assert_png(plot_pareto(thresholds, tmp_path / "pareto_t.png"))
    with pytest.raises(ValueError, match="no point"):
        plot_pareto([{"test_error": None}], tmp_path / "none.png")


def test_plot_training_curves(tiny_run, tmp_path):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    _assert_png(plot_training_curves(rows, tmp_path / "curves.png"))
    synthetic = [{"epoch": e, "loss": 1.0 / e, "nll": 0.5 / e, "kl": 1e5 / e, "train_error": 10.0 / e,
                  "test_error": 9.0 / e, "groups_kept": {"fc1": 784 - 50 * e, "fc2": 300 - 10 * e}} for e in range(1, 8)]
    _assert_png(plot_training_curves(synthetic, tmp_path / "curves7.png"))
    with pytest.raises(ValueError):
        plot_training_curves([], tmp_path / "empty.png")


def test_write_report_run(tiny_run):
    assert {"scores.json", "weights.pt"} <= {p.name for p in tiny_run.iterdir()}  # written by the run
    write_sensitivity(tiny_run, data_dir=str(DATA))  # the run layer measures, the page only draws
    page = write_report(tiny_run)
    assert page == tiny_run / "report.md"
    text = page.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"log_alpha.png", "weights.png", "training.png"} <= set(images)
    for name in images:
        assert not os.path.isabs(name)
        _assert_png(tiny_run / name)
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["architecture"] in text and f"{report['test_error']:.2f}" in text
    for layer in ("fc1", "fc2", "fc3"):
        assert f"| {layer} |" in text
    assert "Precision sensitivity" in text and "unimodal" in text


def test_report_draws_only_what_the_folder_holds(tiny_run, tmp_path):
    """A folder without the figure data (an earlier version's) gets the page without those figures and a note;
    `bayescomp report` writes the data from the posterior, and the page then has them. report/ imports nothing
    from the run layer, so the page cannot compress anything again."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    for name in ("scores.json", "weights.pt", "sensitivity.json", "report.md", "log_alpha.png", "weights.png"):
        (old / name).unlink(missing_ok=True)
    text = write_report(old).read_text()
    assert "no scores.json" in text and "log_alpha.png" not in text and "training.png" in text
    assert not (old / "scores.json").exists()  # the page writes no data of its own
    result = CliRunner().invoke(main, ["report", str(old)])
    assert result.exit_code == 0, result.output
    text = (old / "report.md").read_text()
    assert "![log α histograms per layer](log_alpha.png)" in text and "weights.png" in text
    scores = json.loads((old / "scores.json").read_text())["layers"]
    assert set(scores) == {"fc1", "fc2", "fc3"} and len(scores["fc1"]["log_alpha"]) == 784
    run_layer = {"pipeline", "runreport", "rundir", "cli", "sweep", "runoptions", "factories", "decision",
                 "unfinished", "runfigures", "filecommands"}
    for path in (ROOT / "src" / "bayescomp" / "report").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = set((node.module or "").split("."))
                assert not parts & run_layer, (path.name, node.module)


def test_write_report_sweep_folder_and_errors(tmp_path):
    doc = {"kind": "tau0", "prior": "ghs", "elbo_choice": 1e-4, "elbo_choice_dir": "tau0_0.0001", "points": [
        {"tau0": 1e-5, "run_dir": "tau0_1e-05", "test_error": 3.0, "weights_kept_pct": 2.0, "cr_fast": 100.0,
         "cr_file": None, "elbo": -2000.0, "pareto": True},
        {"tau0": 1e-4, "run_dir": "tau0_0.0001", "test_error": 2.0, "weights_kept_pct": 4.0, "cr_fast": 50.0,
         "cr_file": None, "elbo": -1500.0, "pareto": True},
    ]}
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    page = write_report(tmp_path)
    text = page.read_text()
    assert "pareto.png" in text and "0.0001" in text
    _assert_png(tmp_path / "pareto.png")
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        write_report(tmp_path / "empty")


def test_precision_sensitivity(tiny_run, posterior):
    x, y = load_mnist("test", DATA)
    x, y = x[:1000], y[:1000]
    report = json.loads((tiny_run / "report.json").read_text())
    sens = precision_sensitivity(posterior, x, y, report["thresholds"], ks=(1, 2, 3, 4))
    assert set(sens["layers"]) == {"fc1", "fc2", "fc3"}
    assert sens["ks"] == [1, 2, 3, 4] and sens["n"] == 1000
    for name, entry in sens["layers"].items():
        b = entry["inferred_bits"]
        assert b == report["bits"][["fc1", "fc2", "fc3"].index(name)]
        assert [r["k"] for r in entry["minus"]] == [1, 2, 3, 4] == [r["k"] for r in entry["plus"]]
        for r in entry["minus"] + entry["plus"]:
            assert 0 <= r["bits"] <= 23 and 0.0 <= r["error"] <= 100.0
            assert r["delta"] == pytest.approx(r["error"] - sens["error_inferred"])
        assert [r["bits"] for r in entry["minus"]] == [max(b - k, 0) for k in (1, 2, 3, 4)]
        assert entry["verdict"] in VERDICTS and entry["reason"]
    # clamping at both ends
    wide = precision_sensitivity(posterior, x, y, report["thresholds"], ks=(30,))
    for entry in wide["layers"].values():
        assert entry["minus"][0]["bits"] == 0 and entry["minus"][0]["clamped"]
        assert entry["plus"][0]["bits"] == 23 and entry["plus"][0]["clamped"]
    with pytest.raises(ValueError):
        precision_sensitivity(posterior, x, y, None, ks=(0,))


@pytest.mark.skipif("report" not in main.commands, reason="the CLI has no `report` command yet")
def test_report_command(tiny_run):
    result = CliRunner().invoke(main, ["report", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output and (tiny_run / "report.md").is_file()
    missing = CliRunner().invoke(main, ["report", str(tiny_run / "nope")])
    assert missing.exit_code == 1 and "error:" in missing.output
