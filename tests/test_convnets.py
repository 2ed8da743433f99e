"""Convolutional networks: VGG-16 and LeNet-5 shrink exactly, VGG trains and compresses, CIFAR-10 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import randomise as _randomise
from helpers import write_cifar
from torch import nn

import bayescomp
from bayescomp.cli import main
from bayescomp.compress import AppendOnes, apply_masks, compress, propagate
from bayescomp.io import load_plain
from bayescomp.models import build_model
from bayescomp.nn import GroupSparseLayer


def _random_keeps(bmodel: nn.Module, gen: torch.Generator, all_but_one: str | None = None) -> dict[str, torch.Tensor]:
    keeps = {}
    for name, m in bmodel.named_modules():
        if isinstance(m, GroupSparseLayer):
            if name == all_but_one:
                k = torch.zeros(m.n_groups, dtype=torch.bool)
                k[int(torch.randint(m.n_groups, (1,), generator=gen))] = True
            else:
                k = torch.rand(m.n_groups, generator=gen) < 0.6
                k[0] = True
            keeps[name] = k
    return keeps


def _check_equivalent(bmodel, keeps, x, atol):
    decision = propagate(bmodel, keeps)
    result = compress(bmodel, masks=decision, round_weights=False)
    masked = bmodel.eval()
    apply_masks(masked, keeps)
    with torch.no_grad():
        expected = masked(x)
        got = result.model(x)
    assert torch.allclose(got, expected, atol=atol, rtol=1e-4), (got - expected).abs().max()
    assert not any(isinstance(m, GroupSparseLayer) for m in result.model.modules())
    return result


@pytest.mark.parametrize("seed", [0, 1])
def test_vgg16_shrunk_equals_masked(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bmodel = bayescomp.bayesianize(build_model("vgg16"), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen, all_but_one="conv3_2" if seed == 0 else "conv5_3")
    x = torch.randn(2, 3, 32, 32, generator=gen)
    result = _check_equivalent(bmodel, keeps, x, atol=1e-3)
    # pruned channels are really gone: each conv keeps at most its gated-on channels
    for layer in result.report["layers"]:
        if layer["kind"] == "conv2d":
            assert layer["outputs_kept"] <= layer["groups_kept"]
    plain_params = sum(p.numel() for p in build_model("vgg16").parameters())
    assert sum(p.numel() for p in result.model.parameters()) < plain_params
    # constants of pruned channels feeding zero-padded convolutions travel in a ones-channel
    assert any(isinstance(m, AppendOnes) for m in result.model.modules())


def test_lenet5_shrunk_equals_masked_and_flatten_mapping():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    bmodel = bayescomp.bayesianize(build_model("lenet5"), "gnj")
    _randomise(bmodel, gen)
    keeps = _random_keeps(bmodel, gen, all_but_one="conv2")
    x = torch.randn(5, 1, 28, 28, generator=gen)
    result = _check_equivalent(bmodel, keeps, x, atol=1e-4)
    masks = result.masks
    # a pruned conv2 channel removes its whole block of 16 flattened inputs of fc1
    kept_channels = masks["conv2"].out_mask
    fc1_in = masks["fc1"].in_mask.view(50, 16)
    assert not fc1_in[~kept_channels].any()
    arch = result.report["architecture"].split("-")
    assert int(arch[0]) == int(masks["conv1"].out_mask.sum()) and int(arch[1]) == int(kept_channels.sum())


def test_unsupported_module_in_chain_is_named():
    # a channel shuffle reorders channels: no rule covers it, and the error names it and the way out
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ChannelShuffle(2), nn.Flatten(), nn.Linear(4, 2))
    bmodel = bayescomp.bayesianize(model, "gnj")
    with pytest.raises(bayescomp.UnsupportedLayerError, match="1: ChannelShuffle is not supported.*register_channelwise"):
        compress(bmodel)


def test_vgg16_one_training_step_and_compress():
    torch.manual_seed(0)
    bmodel = bayescomp.bayesianize(build_model("vgg16"), "gnj", keep_weights=True).train()
    opt = torch.optim.Adam(bmodel.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = bmodel.conv1_1.weight_mu.detach().clone()
    loss = F.cross_entropy(bmodel(x), y) + bayescomp.kl_divergence(bmodel) / 50000
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, bmodel.conv1_1.weight_mu)
    result = compress(bmodel.eval(), thresholds=-3.0)
    assert len(result.report["bits"]) == 15
    assert result.report["weights_total"] == 14_977_728
    with torch.no_grad():
        assert result.model(x).shape == (4, 10)


def _write_cifar(root: Path) -> None:
    write_cifar(root, n_train=8, n_test=6)


def test_vgg16_cifar10_pipeline_on_synthetic_batches(tmp_path):
    root = tmp_path / "data"
    _write_cifar(root)
    out = tmp_path / "run"
    args = ["compress", "--model", "vgg16", "--dataset", "cifar10", "--epochs", "1", "--batch-size", "8",
            "--train-subset", "8", "--data-dir", str(root), "--out", str(out), "--quiet", "--no-verify",
            "--thresholds", "-3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "vgg16" and report["weights_total"] == 14_977_728
    model, _ = load_plain(out / "model.pt")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar10_checksums_are_enforced_by_default(tmp_path):
    root = tmp_path / "data"
    _write_cifar(root)
    result = CliRunner().invoke(main, ["compress", "--model", "vgg16", "--epochs", "1", "--data-dir", str(root),
                                       "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1 and "error:" in result.output
    assert not (tmp_path / "run").exists()


def test_dataset_must_match_model(tmp_path):
    result = CliRunner().invoke(main, ["compress", "--model", "lenet300", "--dataset", "cifar10",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "built for mnist" in result.output


def test_init_from_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    plain = build_model("lenet300")
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    from bayescomp.factories import plain_start
    from bayescomp.runoptions import RunOptions

    opts = RunOptions(model="lenet300", init_from=str(path))
    start, trained = plain_start(opts, None, None, progress=False)
    assert trained and torch.equal(start.fc1.weight, plain.fc1.weight)
    bad = tmp_path / "bad.pt"
    torch.save({"fc1.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(RuntimeError, match="does not fit model lenet300"):
        plain_start(RunOptions(model="lenet300", init_from=str(bad)), None, None, progress=False)
