"""bayescomp.export_onnx(model_or_result, example_input, path): any number of inputs, dynamic batch, checked."""

import pytest
import torch
from torch import nn

import bayescomp
from bayescomp.io.export import ExportError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Conv2d(1, 4, 3)
        self.side = nn.Linear(3, 5)
        self.head = nn.Linear(4 * 4 * 4 + 5, 2)

    def forward(self, image, meta):
        return self.head(torch.cat([torch.relu(self.img(image)).flatten(1), torch.relu(self.side(meta))], 1))


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_export_of_a_compressed_chain_runs_at_any_batch_size(tmp_path):
    torch.manual_seed(0)
    bmodel = bayescomp.bayesianize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    keeps = {"0": torch.arange(6) < 4, "2": torch.arange(8) % 2 == 0}
    result = bayescomp.compress(bmodel, keeps=keeps)
    path = bayescomp.export_onnx(result, torch.randn(2, 6), tmp_path / "chain.onnx")
    assert path == tmp_path / "chain.onnx"
    x = torch.randn(7, 6)
    got = _run(path, {"input": x.numpy()})
    assert got.shape == (7, 3) and abs(torch.as_tensor(got) - result.model(x).detach()).max() <= 1e-5


def test_export_of_a_two_input_model_with_names(tmp_path):
    torch.manual_seed(1)
    example = (torch.randn(2, 1, 6, 6), torch.randn(2, 3))
    bmodel = bayescomp.bayesianize(TwoInputs(), example_input=example)
    result = bayescomp.compress(bmodel, keeps={"img": torch.arange(4) < 3, "side": torch.arange(3) < 2,
                                               "head": torch.arange(69) % 3 > 0}, example_input=example)
    path = bayescomp.export_onnx(result, example, tmp_path / "two.onnx", input_names=["image", "meta"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "meta"]
    feeds = (torch.randn(5, 1, 6, 6), torch.randn(5, 3))
    got = session.run(None, {"image": feeds[0].numpy(), "meta": feeds[1].numpy()})[0]
    assert abs(torch.as_tensor(got) - result.model(*feeds).detach()).max() <= 1e-5


def test_the_shape_form_still_works_and_bad_inputs_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2))
    path = bayescomp.export_onnx(model, tmp_path / "shape.onnx", (4,))
    assert _run(path, {"input": torch.zeros(3, 4).numpy()}).shape == (3, 2)
    with pytest.raises(ExportError, match="tensor or a tuple of tensors"):
        bayescomp.export_onnx(model, [1, 2], tmp_path / "bad.onnx")
    with pytest.raises(ExportError, match="1 names given for 2 inputs"):
        bayescomp.export_onnx(TwoInputs(), (torch.zeros(1, 1, 6, 6), torch.zeros(1, 3)), tmp_path / "b.onnx",
                              input_names=["x"])
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_export_command_takes_one_input_shape_per_input(tmp_path):
    from click.testing import CliRunner

    from bayescomp.cli import main

    torch.manual_seed(2)
    example = (torch.randn(2, 1, 6, 6), torch.randn(2, 3))
    result = bayescomp.compress(bayescomp.bayesianize(TwoInputs()), keeps={
        "img": torch.arange(4) < 3, "side": torch.arange(3) < 2, "head": torch.arange(69) % 3 > 0},
        example_input=example)
    bayescomp.save(result, tmp_path / "two.bcz")
    out = tmp_path / "two.onnx"
    run = CliRunner().invoke(main, ["export", str(tmp_path / "two.bcz"), "--out", str(out),
                                    "--input-shape", "1,6,6", "--input-shape", "3"])
    assert run.exit_code == 0, run.output
    feeds = {"input0": torch.randn(4, 1, 6, 6).numpy(), "input1": torch.randn(4, 3).numpy()}
    got = _run(out, feeds)
    want = bayescomp.load(tmp_path / "two.bcz")(*(torch.as_tensor(v) for v in feeds.values()))
    assert abs(torch.as_tensor(got) - want.detach()).max() <= 1e-5
    bad = CliRunner().invoke(main, ["export", str(tmp_path / "two.bcz"), "--input-shape", "1x6"])
    assert bad.exit_code != 0 and "not a shape such as 1,28,28" in bad.output
