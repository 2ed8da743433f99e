"""Every command that works on a chain run works on a graph run (residual sums, concatenations).

Runs are tiny (1 epoch on a few dozen synthetic CIFAR-10 images written in the official format) and read their
data with --no-verify, the checksum opt-out every data-reading command has. What is checked is what each
command promises: threshold-sweep points shrink monotonically with the threshold and are the models `compress`
makes; `--auto-thresholds validation` stays within its budget on the held-out split; precision sensitivity
rebuilds exactly the compressed graph; the report page names non-empty PNG figures; a safetensors export
reloads to a model with equal outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import write_cifar
from torch import fx

import bayescomp.io
from bayescomp.cli import main
from bayescomp.compress import compress, graph_compress, graph_shrinker, group_masks
from bayescomp.compress.sensitivity import VERDICTS, precision_sensitivity
from bayescomp.compress.thresholds import classification_error, validation_split, validation_thresholds
from bayescomp.data import input_shape, load_cifar10
from bayescomp.io import load_plain, read_packed
from bayescomp.io.export import export_safetensors, load_safetensors
from bayescomp.models import MODELS
from bayescomp.nn import GroupSparseLayer
from bayescomp.pipeline import example_input, load_data, load_posterior
from bayescomp.report.plots import plot_weights
from bayescomp.train import predict

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Synthetic CIFAR-10 (80 training, 40 test images); NOT the official checksums, so commands need --no-verify."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, n_train=16, n_test=40, seed=1)
    return root


def _compress(cifar: Path, out: Path, model: str, *extra: str) -> Path:
    result = CliRunner().invoke(main, [
        "compress", "--model", model, "--epochs", "1", "--batch-size", "16", "--data-dir", str(cifar),
        "--out", str(out), "--quiet", "--no-augment", "--no-verify", *extra,
    ])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def concat_run(cifar, tmp_path_factory):
    return _compress(cifar, tmp_path_factory.mktemp("runs") / "concat", "concat_net", "--train-subset", "64")


@pytest.fixture(scope="module")
def resnet_run(cifar, tmp_path_factory):
    return _compress(cifar, tmp_path_factory.mktemp("runs") / "resnet20", "resnet20", "--train-subset", "32")


def _test_set(cifar: Path):
    return load_cifar10("test", cifar, verify=False)


def _error_of(model, cifar: Path) -> float:
    x, y = _test_set(cifar)
    return 100.0 * float((predict(model, x) != y).float().mean())


# ---- the example input: one place -----------------------------------------------------------------------------


def test_example_input_has_the_dataset_shape():
    for name, (_, dataset) in MODELS.items():
        x = example_input(name)
        assert tuple(x.shape) == (2, *input_shape(dataset)) and not bool(x.any())
    assert input_shape("mnist") == (1, 28, 28) and input_shape("cifar10") == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown dataset"):
        input_shape("imagenet")


# ---- 1. threshold-sweep ---------------------------------------------------------------------------------------


def test_threshold_sweep_on_graph_run(resnet_run, cifar):
    bmodel = load_posterior(resnet_run / "posterior.pt")
    scores = torch.cat([m.log_alpha().detach().flatten() for m in bmodel.modules() if isinstance(m, GroupSparseLayer)])
    lo, hi = float(scores.min()), float(scores.max())
    # below every score (prunes everything: skipped), three quantiles, above every score (keeps everything)
    values = [lo - 1.0] + [float(torch.quantile(scores, q)) for q in (0.2, 0.5, 0.8)] + [hi + 1.0]
    result = CliRunner().invoke(main, ["threshold-sweep", str(resnet_run), "--values", ",".join(map(repr, values)),
                                       "--data-dir", str(cifar), "--no-verify"])
    assert result.exit_code == 0, result.output
    doc = json.loads((resnet_run / "threshold_sweep.json").read_text())
    points = doc["points"]
    assert [p["threshold"] for p in points] == values
    assert points[0]["skipped"] and points[0]["weights_kept"] is None
    measured = points[1:]
    kept = [p["weights_kept"] for p in measured]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)  # strictly more weights as the threshold rises
    report = json.loads((resnet_run / "report.json").read_text())
    assert kept[-1] == report["weights_total"]
    # each point is the model compress() makes at that threshold, through the graph, with its test error
    mid = measured[1]
    c = compress(bmodel, mid["threshold"], example_input=example_input("resnet20"))
    assert isinstance(c.model, fx.GraphModule)
    assert (c.report["weights_kept"], c.report["architecture"]) == (mid["weights_kept"], mid["architecture"])
    assert _error_of(c.model, cifar) == pytest.approx(mid["test_error"], abs=1e-9)


def test_data_commands_verify_checksums_unless_told_not_to(resnet_run, cifar, tmp_path):
    """Synthetic files fail the published-checksum check; --no-verify (on every data-reading command) skips it."""
    report = json.loads((resnet_run / "report.json").read_text())
    for args in (["evaluate", str(resnet_run)], ["threshold-sweep", str(resnet_run), "--values", "0"],
                 ["prune", str(resnet_run), "--out", str(tmp_path / "p")],
                 ["report", str(resnet_run), "--sensitivity"]):
        refused = CliRunner().invoke(main, [*args, "--data-dir", str(cifar)])
        assert refused.exit_code == 1 and "MD5" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()
    result = CliRunner().invoke(main, ["evaluate", str(resnet_run), "--data-dir", str(cifar), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert f"{report['test_error']:.2f}" in result.output
    result = CliRunner().invoke(main, ["prune", str(resnet_run), "--out", str(tmp_path / "p"), "--data-dir", str(cifar),
                                       "--no-verify"])
    assert result.exit_code == 0, result.output
    pruned = json.loads((tmp_path / "p" / "report.json").read_text())
    assert pruned["weights_kept"] == report["weights_kept"]  # the run's own thresholds
    assert _error_of(read_packed(tmp_path / "p" / "model.bcz")[0], cifar) == pytest.approx(pruned["test_error"], abs=1e-9)


# ---- 2. --auto-thresholds validation --------------------------------------------------------------------------


def test_validation_thresholds_on_graph_run(cifar, tmp_path):
    out = _compress(cifar, tmp_path / "val", "concat_net", "--train-subset", "80", "--auto-thresholds", "validation",
                    "--val-budget", "0")
    report = json.loads((out / "report.json").read_text())
    choice = report["threshold_choice"]
    bmodel = load_posterior(out / "posterior.pt")
    layers = [n for n, m in bmodel.named_modules() if isinstance(m, GroupSparseLayer)]
    assert sorted(choice) == sorted(layers) and all(c["method"] == "validation" for c in choice.values())
    assert report["thresholds"] == {n: c["value"] for n, c in choice.items()}
    assert report["validation_examples"] == 8 and report["train_examples"] == 72
    # the choice keeps fewer weights than keeping everything, and its validation error is no worse (budget 0)
    (x, y), _ = load_data("concat_net", str(cifar), 80, 0, verify=False)
    _, val_idx = validation_split(80, 0.1, 0)
    vx, vy = x[val_idx], y[val_idx]
    details = next(iter(choice.values()))["details"]
    assert details["feasible"] and report["weights_kept"] < report["weights_total"]
    chosen = compress(bmodel, report["thresholds"], example_input=example_input("concat_net"))
    assert chosen.report["weights_kept"] == report["weights_kept"] == details["weights_kept"]
    assert classification_error(chosen.model, vx, vy) <= classification_error(bmodel, vx, vy) + 1e-9
    assert _error_of(read_packed(out / "model.bcz")[0], cifar) == pytest.approx(report["test_error"], abs=1e-9)
    # a larger budget can only keep as much or less
    loose = validation_thresholds(bmodel, vx, vy, 50.0, example_input=example_input("concat_net"))
    assert next(iter(loose.values())).details["weights_kept"] <= details["weights_kept"]


# ---- 3. precision sensitivity ---------------------------------------------------------------------------------


def test_graph_shrinker_rebuilds_graph_compress(concat_run):
    bmodel = load_posterior(concat_run / "posterior.pt")
    example = example_input("concat_net")
    scores = torch.cat([m.log_alpha().detach() for m in bmodel.modules() if isinstance(m, GroupSparseLayer)])
    threshold = float(scores.median())  # prune about half of the groups
    c = graph_compress(bmodel, threshold, example_input=example)
    build = graph_shrinker(bmodel, group_masks(bmodel, threshold), example_input=example)
    x = torch.randn(5, 3, 32, 32)
    rebuilt, unrounded = build(c.bits), build(None)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), c.model(x))
        assert torch.equal(unrounded(x), graph_compress(bmodel, threshold, example_input=example,
                                                        round_weights=False).model(x))
        assert not torch.equal(unrounded(x), c.model(x))


def test_precision_sensitivity_on_graph_model(concat_run, cifar):
    bmodel = load_posterior(concat_run / "posterior.pt")
    report = json.loads((concat_run / "report.json").read_text())
    x, y = _test_set(cifar)
    example = example_input("concat_net")
    sens = precision_sensitivity(bmodel, x, y, report["thresholds"], ks=(1, 30), example_input=example)
    inferred = compress(bmodel, report["thresholds"], example_input=example)
    assert set(sens["layers"]) == set(inferred.bits)
    assert sens["error_inferred"] == pytest.approx(classification_error(inferred.model, x, y))
    unrounded = compress(bmodel, report["thresholds"], round_weights=False, example_input=example)
    assert sens["error_unrounded"] == pytest.approx(classification_error(unrounded.model, x, y))
    for name, entry in sens["layers"].items():
        b = entry["inferred_bits"]
        assert b == inferred.bits[name] and entry["verdict"] in VERDICTS
        assert [r["bits"] for r in entry["minus"]] == [max(b - 1, 0), 0]
        assert [r["bits"] for r in entry["plus"]] == [min(b + 1, 23), 23]
        assert entry["plus"][1]["error"] == pytest.approx(entry["error_layer_unrounded"])  # 23 bits: float32 exact
    with pytest.raises(TypeError, match="example_input"):  # a graph model without its example input
        precision_sensitivity(bmodel, x, y, report["thresholds"], ks=(1,))


# ---- 4. report ------------------------------------------------------------------------------------------------


def test_report_on_graph_run(concat_run, cifar):
    sweep = CliRunner().invoke(main, ["threshold-sweep", str(concat_run), "--values", "-9,-3,3", "--relative",
                                      "--data-dir", str(cifar), "--no-verify"])
    assert sweep.exit_code == 0, sweep.output
    result = CliRunner().invoke(main, ["report", str(concat_run), "--sensitivity", "--data-dir", str(cifar),
                                       "--no-verify"])
    assert result.exit_code == 0, result.output
    page = concat_run / "report.md"
    text = page.read_text()
    figures = ["log_alpha.png", "weights.png", "training.png", "threshold_pareto.png"]
    for fig in figures:
        assert f"]({fig})" in text
        data = (concat_run / fig).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    assert "## Precision sensitivity" in text and "_No " not in text
    for name in ("stem.0", "branch_a.0", "branch_b.0", "mix.0", "fc"):
        assert f"| {name} |" in text  # layer table, histogram table, sensitivity table


def test_plot_weights_of_graph_model_needs_its_masks(concat_run, tmp_path):
    bmodel = load_posterior(concat_run / "posterior.pt")
    with pytest.raises(ValueError, match="masks"):
        plot_weights(bmodel, None, tmp_path / "w.png")
    masks = compress(bmodel, None, round_weights=False, example_input=example_input("concat_net")).masks
    assert plot_weights(bmodel, masks, tmp_path / "w.png").read_bytes().startswith(PNG)


# ---- 5. export ------------------------------------------------------------------------------------------------


def test_safetensors_export_of_graph_run(resnet_run):
    safetensors = pytest.importorskip("safetensors")
    target = resnet_run / "model.safetensors"
    result = CliRunner().invoke(main, ["export", str(resnet_run), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    model, meta = load_safetensors(target)
    packed, _ = read_packed(resnet_run / "model.bcz")
    plain, _ = load_plain(resnet_run / "model.pt")
    assert isinstance(model, fx.GraphModule)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), packed(x)) and torch.equal(model(x), plain(x))
    report = json.loads((resnet_run / "report.json").read_text())
    assert meta["model"] == "resnet20" and meta["architecture"] == report["architecture"]
    with safetensors.safe_open(str(target), "pt") as f:  # what a reader without bayescomp sees
        metadata = f.metadata()
    assert metadata["version"] == "2" and "spec" not in metadata
    rebuilt = bayescomp.io.build_graph(json.loads(metadata["graph"]))
    assert set(rebuilt.state_dict()) == set(model.state_dict())


def test_safetensors_chain_round_trip_and_refusals(tmp_path):
    pytest.importorskip("safetensors")
    from bayescomp import bayesianize
    from bayescomp.models import build_model

    chain = compress(bayesianize(build_model("lenet300"), "gnj").eval()).model
    model, meta = load_safetensors(export_safetensors(chain, tmp_path / "c.safetensors", {"model": "lenet300"}))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert isinstance(model, torch.nn.Sequential) and torch.equal(model(x), chain(x))
    assert meta == {"model": "lenet300"}
    with pytest.raises(bayescomp.io.ModelFileError, match="not found"):
        load_safetensors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(bayescomp.io.ModelFileError):
        load_safetensors(tmp_path / "junk.safetensors")


def test_onnx_export_of_graph_run(resnet_run):
    ort = pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(main, ["export", str(resnet_run), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(resnet_run / "model.onnx"), providers=["CPUExecutionProvider"])
    model, _ = read_packed(resnet_run / "model.bcz")
    x = torch.randn(3, 3, 32, 32)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape and abs(got - expected).max() < 1e-4


# ---- 7, 8. models listing, io exports --------------------------------------------------------------------------


def test_models_listing_is_aligned():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(MODELS) and max(map(len, MODELS)) > 10  # a name longer than the old column
    starts = set()
    for line, (name, (_, dataset)) in zip(lines, MODELS.items(), strict=True):
        assert line.startswith(name + " ")
        starts.add(line.index(" " + dataset + " ") + 1)
    assert len(starts) == 1  # every dataset starts in the same column


def test_io_exports_graph_spec():
    assert {"graph_spec", "build_graph"} <= set(bayescomp.io.__all__)
    from bayescomp.io import plain

    assert bayescomp.io.graph_spec is plain.graph_spec and bayescomp.io.build_graph is plain.build_graph


def test_finetune_on_graph_run(concat_run, cifar, tmp_path):
    """Fine-tuning a graph model: the decision holds through the fx graph (`keeps=`), and the compressed
    GraphModule computes what the fine-tuned, masked posterior computes."""
    posterior = load_posterior(concat_run / "posterior.pt")
    medians = {n: float(m.log_alpha().detach().median()) for n, m in posterior.named_modules()
               if isinstance(m, GroupSparseLayer)}
    spec = ",".join(f"{n}={v!r}" for n, v in medians.items())
    result = CliRunner().invoke(main, ["finetune", str(concat_run), "--epochs", "1", "--thresholds", spec,
                                       "--out", str(tmp_path / "ft"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["finetune"]["epochs"] == 1 and report["config"]["thresholds"] == medians
    tuned = load_posterior(tmp_path / "ft" / "posterior.pt")
    keeps = {n: m.group_mask.clone() for n, m in tuned.named_modules() if isinstance(m, GroupSparseLayer)}
    assert keeps.keys() == medians.keys()
    assert all(torch.equal(keeps[n], group_masks(posterior, medians)[n]) for n in keeps)  # the decision taken before
    assert any(not bool(k.all()) for k in keeps.values())
    plain = compress(tuned, medians, keeps=keeps, round_weights=False, example_input=example_input("concat_net"))
    x, _ = _test_set(cifar)
    with torch.no_grad():
        assert torch.allclose(plain.model(x), tuned(x), atol=1e-4)
    saved, _ = load_plain(tmp_path / "ft" / "model.pt")
    assert _error_of(saved, cifar) == pytest.approx(report["test_error"])
