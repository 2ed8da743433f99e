"""The command line end to end on residual networks: compress → model.pt and model.bcz → evaluate/prune/unpack.

CIFAR-10 is synthetic (random pixels and labels in the official python-pickle batches), with the checksum
table pointed at the files made here, so the run reads them as it reads the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import write_cifar
from torch import fx

from bayescomp.cli import main
from bayescomp.compress import Realign
from bayescomp.data import cifar10 as cifar_mod
from bayescomp.data import load_cifar10
from bayescomp.io import load_plain, read_packed
from bayescomp.models import MODELS
from bayescomp.pipeline import load_posterior
from bayescomp.recipes import recipe
from bayescomp.train import predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A synthetic CIFAR-10 root that passes the checksum check (the digest table patched for this module)."""
    root = tmp_path_factory.mktemp("cifar")
    digests = write_cifar(root)
    with pytest.MonkeyPatch.context() as mp:
        for name, digest in digests.items():
            mp.setitem(cifar_mod.FILE_MD5, name, digest)
        yield root


@pytest.fixture(scope="module")
def resnet20_run(cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "resnet20"
    result = CliRunner().invoke(main, [
        "compress", "--model", "resnet20", "--dataset", "cifar10", "--epochs", "1", "--batch-size", "16",
        "--train-subset", "32", "--data-dir", str(cifar), "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


def _test_error(model, root) -> float:
    x, y = load_cifar10("test", root)
    return 100.0 * float((predict(model, x) != y).float().mean())


def test_compress_resnet20_writes_graph_model_files(resnet20_run, cifar):
    out, output = resnet20_run
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "resnet20" and report["train_examples"] == 32
    assert report["weights_total"] == 270_896  # convolutions, shortcut convolutions and fc
    assert len(report["layers"]) == 22 and report["layers"][0]["name"] == "stem.0"
    assert report["packed"]["verified"] and report["file_bytes"] == (out / "model.bcz").stat().st_size
    assert "architecture" in output and not Path(str(out) + ".partial").exists()
    plain, meta = load_plain(out / "model.pt")
    packed, packed_meta = read_packed(out / "model.bcz")
    assert isinstance(plain, fx.GraphModule) and isinstance(packed, fx.GraphModule)
    assert meta["architecture"] == packed_meta["architecture"] == report["architecture"]
    # both files hold the model that was evaluated: same tensors, same test error as reported
    a, b = plain.state_dict(), packed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _test_error(plain, cifar) == pytest.approx(report["test_error"], abs=1e-9)
    assert _test_error(packed, cifar) == pytest.approx(report["test_error"], abs=1e-9)


def test_evaluate_run_folder_and_files(resnet20_run, cifar):
    out, _ = resnet20_run
    report = json.loads((out / "report.json").read_text())
    for target, extra in ((out, []), (out / "model.pt", ["--model", "resnet20"]),
                          (out / "model.bcz", ["--model", "resnet20"])):
        result = CliRunner().invoke(main, ["evaluate", str(target), "--data-dir", str(cifar), *extra])
        assert result.exit_code == 0, result.output
        assert f"{report['test_error']:.2f}" in result.output


def test_prune_across_shortcuts_then_unpack_and_pack(resnet20_run, cifar, tmp_path):
    """Recompress at per-layer median thresholds (about half of every layer's channels go, residual streams
    included), then the .bcz → model.pt → .bcz round trip of the CLI; every file computes the same thing."""
    out, _ = resnet20_run
    bmodel = load_posterior(out / "posterior.pt")
    medians = {n: float(m.log_alpha().detach().median()) + 1e-6 for n, m in bmodel.named_modules() if hasattr(m, "log_alpha")}
    pruned = tmp_path / "pruned"
    thresholds = ",".join(f"{n}={v!r}" for n, v in medians.items())
    result = CliRunner().invoke(main, ["prune", str(out), "--thresholds", thresholds, "--out", str(pruned),
                                       "--data-dir", str(cifar)])
    assert result.exit_code == 0, result.output
    report = json.loads((pruned / "report.json").read_text())
    assert report["weights_kept"] < report["weights_total"] // 2
    model, _ = read_packed(pruned / "model.bcz")
    assert any(isinstance(m, Realign) for m in model.modules())  # a sum's pruned operand channel is put back
    assert _test_error(model, cifar) == pytest.approx(report["test_error"], abs=1e-9)

    result = CliRunner().invoke(main, ["unpack", str(pruned / "model.bcz"), "--out", str(tmp_path / "u.pt")])
    assert result.exit_code == 0, result.output
    unpacked, _ = load_plain(tmp_path / "u.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(unpacked(x), model(x))
    result = CliRunner().invoke(main, ["pack", str(pruned), "--coder", "huffman", "--out", str(tmp_path / "h.bcz")])
    assert result.exit_code == 0, result.output
    repacked, _ = read_packed(tmp_path / "h.bcz")
    with torch.no_grad():
        assert torch.equal(repacked(x), model(x))


def test_concat_net_runs_end_to_end(cifar, tmp_path):
    out = tmp_path / "concat"
    result = CliRunner().invoke(main, [
        "compress", "--model", "concat_net", "--epochs", "1", "--batch-size", "16", "--train-subset", "32",
        "--data-dir", str(cifar), "--out", str(out), "--quiet", "--no-augment",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    model, _ = read_packed(out / "model.bcz")
    assert isinstance(model, fx.GraphModule)
    assert _test_error(model, cifar) == pytest.approx(report["test_error"], abs=1e-9)


def test_graph_models_are_registered_with_their_dataset():
    expected = {"resnet20": "cifar10", "resnet18_cifar": "cifar10", "resnet_mnist": "mnist", "concat_net": "cifar10"}
    for name, dataset in expected.items():
        assert MODELS[name][1] == dataset
    for name, (_, dataset) in MODELS.items():  # the recipe (what the run loads) agrees with the registry
        assert recipe(name).dataset == dataset, name
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0 and all(name in result.output for name in expected)


def test_dataset_mismatch_refused_early(tmp_path):
    result = CliRunner().invoke(main, ["compress", "--model", "resnet20", "--dataset", "mnist",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "built for cifar10" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
