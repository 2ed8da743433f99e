"""Input origin: a layer computing on x − c. An input at c adds neither signal nor sampling noise, a pretrained
start keeps its function, and the compressed plain layer, which takes x itself, computes what the masked
posterior computes (c folded into its bias), for the chain and the graph compressor alike."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bayescomp
from bayescomp.cli import main
from bayescomp.compress import apply_masks, compress, group_masks
from bayescomp.models import lenet5_caffe, lenet300_100
from bayescomp.nn import GroupSparseLayer
from bayescomp.pipeline import RunError, RunOptions, load_posterior, run

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")


def _posterior(model: nn.Module, prior: str, origin: dict[str, float], seed: int) -> nn.Module:
    """A Bayesian model whose scales and means are spread out (so that pruning and E[z] matter)."""
    torch.manual_seed(seed)
    bm = bayescomp.bayesianize(model, prior, input_origin=origin)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bm.modules():
            if isinstance(m, GroupSparseLayer):
                m.weight_mu.mul_(1.0 + 0.3 * torch.randn(m.weight_mu.shape, generator=gen))
                if m.bias_mu is not None:
                    m.bias_mu.copy_(0.2 * torch.randn(m.bias_mu.shape, generator=gen))
    return bm.eval()


def _half_kept(bm: nn.Module) -> dict[str, torch.Tensor]:
    """Each layer keeps the groups whose score is below its median."""
    return {name: m.log_alpha().detach() < m.log_alpha().detach().median()
            for name, m in bm.named_modules() if isinstance(m, GroupSparseLayer)}


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
@pytest.mark.parametrize("model_name,first", [("lenet300", "fc1"), ("lenet5", "conv1")])
@pytest.mark.parametrize("traced", [False, True])
def test_compressed_model_takes_x_and_equals_the_masked_posterior(prior, model_name, first, traced):
    plain = lenet300_100() if model_name == "lenet300" else lenet5_caffe()
    bm = _posterior(plain, prior, {first: -1.0}, seed=3)
    keeps = _half_kept(bm)
    example = torch.zeros(1, 1, 28, 28) if traced else None
    result = compress(bm, keeps=keeps, round_weights=False, example_input=example)
    ref = copy.deepcopy(bm)
    apply_masks(ref, keeps)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), ref(x), atol=1e-5, rtol=1e-5)
        # the origin matters: without it the masked posterior computes something else
        ref._modules[first].set_input_origin(0.0)
        assert (ref(x) - result.model(x)).abs().max() > 1e-2


def test_the_fold_uses_the_stored_rounded_weights():
    """b' = b − c·Σ_j Ŵ_j with Ŵ the kept weights as stored (rounded to the layer's bits)."""
    bm = _posterior(lenet300_100(), "gnj", {"fc1": -1.0}, seed=5)
    keeps = _half_kept(bm)
    result = compress(bm, keeps=keeps)
    fc1 = next(m for m in result.model.modules() if isinstance(m, nn.Linear))
    layer = bm.fc1
    out_kept = result.masks["fc1"].out_mask
    b = layer.posterior_bias()[out_kept]
    torch.testing.assert_close(fc1.bias.detach(), b + 1.0 * fc1.weight.detach().sum(1), atol=1e-5, rtol=1e-6)
    assert result.report["bits"][0] is not None  # the weights were rounded


def test_an_input_at_the_origin_adds_neither_signal_nor_noise():
    torch.manual_seed(0)
    layer = bayescomp.nn.LinearGroupHS(6, 4)
    layer.set_input_origin(-1.0)
    x = torch.full((5, 6), -1.0)
    x[:, 0] = torch.linspace(-1, 1, 5)  # only input 0 leaves the origin
    layer.train()
    torch.manual_seed(1)
    before = layer(x)
    with torch.no_grad():  # inputs 1-5 sit at the origin: their weights' means and variances do not matter
        layer.weight_mu[:, 1:] += 5.0
        layer.weight_logvar[:, 1:] += 4.0
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), before)
    with torch.no_grad():
        layer.weight_logvar[:, 0] += 4.0  # input 0 does leave it: its variance does
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), before)
    layer.eval()  # evaluation: W·diag(E[z])·(x − c) + b
    expected = (x + 1.0) @ (layer.weight_mu * layer.z_mean()).T + layer.bias_mu
    torch.testing.assert_close(layer(x), expected.detach())


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_a_pretrained_start_keeps_the_plain_function(prior):
    torch.manual_seed(2)
    plain = lenet5_caffe()
    torch.manual_seed(3)  # the same initial scales for both
    with_origin = bayescomp.bayesianize(plain, prior, input_origin={"conv1": -1.0, "fc1": 0.5}).eval()
    torch.manual_seed(3)
    without = bayescomp.bayesianize(plain, prior).eval()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(with_origin(x), without(x), atol=1e-4, rtol=1e-4)


def test_the_origin_travels_with_the_state_dict_and_old_states_load():
    bm = bayescomp.bayesianize(lenet300_100(), "ghs", input_origin={"fc1": -1.0})
    state = bm.state_dict()
    assert float(state["fc1.input_origin"]) == -1.0 and float(state["fc2.input_origin"]) == 0.0
    fresh = bayescomp.bayesianize(lenet300_100(), "ghs")
    fresh.load_state_dict(state)
    assert fresh.fc1._origin == -1.0 and fresh.fc2._origin == 0.0
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), bm.eval()(x))
    old = {k: v for k, v in state.items() if not k.endswith("input_origin")}  # saved before origins existed
    again = bayescomp.bayesianize(lenet300_100(), "ghs", input_origin={"fc1": -1.0})
    again.load_state_dict(old)
    assert again.fc1._origin == 0.0
    assert "input_origin=-1" in repr(bm.fc1) and "input_origin" not in repr(bm.fc2)


def test_bad_origins_are_refused_with_the_layer_named():
    with pytest.raises(ValueError, match="finite"):
        bayescomp.bayesianize(lenet300_100(), input_origin={"fc1": math.nan})
    with pytest.raises(ValueError, match="input_origin names .*fc9"):
        bayescomp.bayesianize(lenet300_100(), input_origin={"fc9": -1.0})
    padded = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
    with pytest.raises(ValueError, match="0: an input origin needs an unpadded convolution"):
        bayescomp.bayesianize(padded, input_origin={"0": -1.0})
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False))
    with pytest.raises(ValueError, match="needs a bias"):
        bayescomp.bayesianize(no_bias, input_origin={"1": -1.0})
    with pytest.raises(RunError, match="input origin must be a finite number"):
        run(RunOptions(input_origin=math.inf, data_dir=DATA), "unused-folder", progress=False)
    assert not Path("unused-folder").exists() and not Path("unused-folder.partial").exists()


def test_a_run_with_an_input_origin(tmp_path):
    """The CLI flag reaches the first layer; the posterior keeps it; a resume with another one is refused; the
    compressed model, reloaded, gives the run's test error on the data as they are."""
    out = tmp_path / "run"
    args = ["compress", "--model", "lenet300", "--prior", "ghs", "--epochs", "1", "--train-subset", "500",
            "--pretrain-epochs", "1", "--input-origin", "-1", "--data-dir", DATA, "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["input_origin"] == -1.0
    posterior = load_posterior(out / "posterior.pt")
    assert posterior.fc1._origin == -1.0 and posterior.fc2._origin == 0.0
    evaluated = CliRunner().invoke(main, ["evaluate", str(out), "--data-dir", DATA])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{report['test_error']:.2f}" in evaluated.output
    opts = RunOptions(model="lenet300", prior="ghs", epochs=1, train_subset=500, pretrain_epochs=1, data_dir=DATA)
    (tmp_path / "again.partial").mkdir()
    (tmp_path / "again.partial" / "options.json").write_text(json.dumps({**report["config"], "input_origin": -1.0}))
    (tmp_path / "again.partial" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(RunError, match=r"input_origin=-1\.0 \(now None\)"):
        run(opts, tmp_path / "again", resume=True, progress=False)
    # the masked posterior at the run's decision computes what the compressed model computes
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    keeps = group_masks(posterior, report["thresholds"])
    apply_masks(posterior, keeps)
    plain = bayescomp.compress(posterior, keeps=keeps, round_weights=False).model
    with torch.no_grad():
        torch.testing.assert_close(plain(x), posterior(x), atol=1e-5, rtol=1e-5)
