"""Export: the ONNX graph runs in onnxruntime and gives PyTorch's outputs; safetensors round-trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bayescomp
from bayescomp.cli import main
from bayescomp.compress import compress
from bayescomp.io.export import export_onnx, export_safetensors
from bayescomp.io.plain import build_from_spec
from bayescomp.models import build_model

ort = pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")
DATA = Path(os.environ.get("BAYESCOMP_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def _compressed(name: str):
    torch.manual_seed(0)
    bmodel = bayescomp.bayesianize(build_model(name), "gnj")
    with torch.no_grad():
        for m in bmodel.modules():
            if isinstance(m, bayescomp.nn.GroupSparseLayer):
                m.z_logvar[: m.n_groups // 3] = 2.0  # prune a third of every layer's groups
    return compress(bmodel.eval())


@pytest.mark.parametrize("name, shape", [("lenet300", (1, 28, 28)), ("lenet5", (1, 28, 28))])
def test_onnx_matches_pytorch(tmp_path, name, shape):
    result = _compressed(name)
    path = export_onnx(result.model, tmp_path / "m.onnx", shape)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, *shape)  # a batch size other than the export example's: the batch axis is dynamic
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = result.model(x).numpy()
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-4


def test_safetensors_round_trip(tmp_path):
    result = _compressed("lenet300")
    path = export_safetensors(result.model, tmp_path / "m.safetensors", {"architecture": result.report["architecture"]})
    tensors = safetensors_torch.load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    model = build_from_spec(json.loads(metadata["spec"]))
    model.load_state_dict(tensors)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), result.model(x))
    assert json.loads(metadata["meta"])["architecture"] == result.report["architecture"]


def test_export_command(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["compress", "--epochs", "1", "--train-subset", "300", "--data-dir", str(DATA),
                                  "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    for fmt in ("onnx", "safetensors"):
        r = CliRunner().invoke(main, ["export", str(out), "--format", fmt])
        assert r.exit_code == 0, r.output
        assert (out / f"model.{fmt}").stat().st_size > 1000
    r = CliRunner().invoke(main, ["export", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "not found" in r.output
