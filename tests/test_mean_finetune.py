"""The mean fine-tuning after the cut (`TrainConfig.sample=False`, `mean_config`, `--mean-epochs`): the network
computes with its posterior means, only they move, the pruned groups stay off, and a run records the phase."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import Interrupted
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayescomp
from bayescomp import pipeline
from bayescomp.cli import main
from bayescomp.compress import apply_masks, compress, group_masks
from bayescomp.nn.base import parameter_kind
from bayescomp.pipeline import RunError, RunOptions, load_posterior, run
from bayescomp.train import TrainConfig, finetune_config, fit, mean_config

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :4].argmax(1))


def _bayesian(prior: str) -> nn.Module:
    torch.manual_seed(0)
    return bayescomp.bayesianize(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)), prior)


def test_mean_config_is_the_fine_tuning_with_the_noise_off():
    base = TrainConfig(epochs=30, batch_size=64, lr=1e-2, warmup_epochs=10, seed=3, kl_weight=0.5,
                       lr_schedule="cosine", lr_scale={"variance": 3.0})
    cfg = mean_config(base, 3, 1e-3)
    assert cfg == replace(finetune_config(base, 3, 1e-3), sample=False)
    assert (cfg.epochs, cfg.lr, cfg.warmup_epochs, cfg.sample) == (3, 1e-3, 0.0, False)
    assert base.sample is True
    with pytest.raises(ValueError, match="sample must be True or False"):
        replace(base, sample=1).validate()


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_only_the_means_move_and_the_loss_is_the_evaluation_forward_s_cross_entropy(prior):
    x, y = _data()
    model = _bayesian(prior)
    keeps = {n: torch.arange(m.n_groups) % 3 != 0 for n, m in model.named_modules()
             if isinstance(m, bayescomp.nn.GroupSparseLayer)}
    apply_masks(model, keeps)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        start = float(F.cross_entropy(model.eval()(x), y))
    cfg = TrainConfig(epochs=3, batch_size=256, lr=1e-2, seed=1, sample=False)
    result = fit(model, (x, y), cfg, progress=False)
    # one batch per epoch, the noise off: the first epoch's loss is the evaluation forward's cross-entropy, exactly
    assert result.history[0]["loss"] == pytest.approx(start, rel=1e-6)
    assert result.history[0]["nll"] == pytest.approx(start, rel=1e-6)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(parameter_kind(n, model) == "mean" for n in moved)
    assert all(parameter_kind(n, model) != "variance" for n in moved), moved  # the bits' variances are left as they were
    assert group_masks(model, float("inf")).keys() == keeps.keys()
    for n, m in model.named_modules():
        if isinstance(m, bayescomp.nn.GroupSparseLayer):
            assert torch.equal(m.group_mask.cpu(), keeps[n])
    # the noise off: with the whole set in one batch, another seed (another noise stream) trains the same model
    other = _bayesian(prior)
    apply_masks(other, keeps)
    fit(other, (x, y), replace(cfg, seed=2), progress=False)
    for (n, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


OPTS = RunOptions(model="lenet300", prior="gnj", epochs=1, train_subset=600, data_dir=DATA, seed=2, target_kept=0.5,
                  finetune_epochs=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, the run fine-tuned 1 epoch, the same with 2 epochs of the mean fine-tuning after it)."""
    root = tmp_path_factory.mktemp("mean")
    torch.set_num_threads(1)
    return root, run(OPTS, root / "ft", progress=False), run(replace(OPTS, mean_epochs=2), root / "mean", progress=False)


def test_a_run_with_mean_epochs_records_the_phase_and_compresses_the_groups_the_fine_tuning_kept(runs):
    root, tuned, means = runs
    tmp_path = root
    assert means["architecture"] == tuned["architecture"]
    assert means["finetune"]["mean"]["epochs"] == 2 and len(means["finetune"]["mean"]["history"]) == 2
    assert "mean" not in tuned["finetune"]
    # the Bayesian fine-tuning is the same in both; the mean phase then moves the weights
    def timeless(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert timeless(means["finetune"]["history"]) == timeless(tuned["finetune"]["history"])
    assert means["weights_kept_pct"] <= 50
    assert (means["test_error"], means["test_error_uncompressed"]) != (tuned["test_error"], tuned["test_error_uncompressed"])
    folder = tmp_path / "mean"
    assert len((folder / "finetune_mean_metrics.jsonl").read_text().splitlines()) == 2
    assert not (folder / "finetune_mean.pt").exists()
    # the saved posterior's masked network is what the compressed model computes (rounding aside)
    posterior = load_posterior(folder / "posterior.pt")
    masks = group_masks(posterior, float("inf"))
    unrounded = compress(posterior, means["thresholds"], keeps=masks, round_weights=False)
    x = torch.rand(64, 784)
    assert torch.allclose(unrounded.model(x), posterior.eval()(x), atol=1e-5)


def test_a_run_stopped_in_its_mean_fine_tuning_can_be_looked_at_and_resumes_to_the_same_model(runs, tmp_path,
                                                                                                 monkeypatch):
    _, _, means = runs
    real_fit = pipeline.fit

    def stop_in_the_second_mean_epoch(model, train, config, **kwargs):
        if not config.sample:
            def stop(row):
                if row["epoch"] == 2:
                    raise Interrupted  # (before epoch 2's checkpoint: the one of epoch 1 is kept)
            kwargs["on_epoch"] = stop
        return real_fit(model, train, config, **kwargs)

    opts = replace(OPTS, mean_epochs=2)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "fit", stop_in_the_second_mean_epoch)
        with pytest.raises(Interrupted):
            run(opts, tmp_path / "r", progress=False)
    work = tmp_path / "r.partial"
    assert (work / "finetune_mean.pt").is_file() and (work / "finetune.pt").is_file()
    progress = pipeline.run_progress(tmp_path / "r")  # (read off the metrics, which the epoch's row reached)
    assert (progress["mean_epochs_done"], progress["mean_epochs"]) == (2, 2)
    peek = pipeline.recompress(tmp_path / "r", tmp_path / "peek", None, data_dir=DATA)
    assert peek["unfinished"] | {"from": None} == {"from": None, "epochs_trained": 1, "epochs": 1,
                                                   "finetune_epochs_done": 1, "finetune_epochs": 1,
                                                   "mean_epochs_done": 1, "mean_epochs": 2}
    assert peek["architecture"] == means["architecture"]
    at_epoch_1 = torch.load(work / "finetune_mean.pt", weights_only=False)["model"]
    looked = torch.load(tmp_path / "peek" / "posterior.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(looked[k], at_epoch_1[k]) for k in at_epoch_1)
    report = run(opts, tmp_path / "r", resume=True, progress=False)
    for key in ("test_error", "test_error_uncompressed", "architecture", "bits"):
        assert report[key] == means[key], key
    assert [r["loss"] for r in report["finetune"]["mean"]["history"]] == \
        [r["loss"] for r in means["finetune"]["mean"]["history"]]


def test_mean_epochs_need_a_fine_tuning(tmp_path, monkeypatch):
    with pytest.raises(RunError, match="--mean-epochs 2 follows the fine-tuning"):
        run(RunOptions(model="lenet300", epochs=1, train_subset=100, data_dir=DATA, mean_epochs=2), tmp_path / "o",
            progress=False)
    assert not (tmp_path / "o").exists()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compress", "--out", "c", "--epochs", "1", "--mean-epochs", "-1", "--quiet"])
    assert result.exit_code != 0 and "--mean-epochs" in result.output
    assert not (tmp_path / "c").exists()
    x, y = _data(n=64)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ValueError, match="mean_epochs=1 follows the fine-tuning"):
        bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=0, mean_epochs=1, progress=False)
    with pytest.raises(ValueError, match="mean fine-tuning epochs"):
        bayescomp.compress_pretrained(net, loader, epochs=1, mean_epochs=-1, progress=False)


def test_compress_pretrained_with_mean_epochs_counts_them_in_its_history():
    x, y = _data(n=128)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    result = bayescomp.compress_pretrained(net, loader, epochs=1, finetune_epochs=1, mean_epochs=2, target_kept=0.5,
                                           progress=False)
    assert len(result.report["history"]) == 4


def test_no_fine_tuning_given_drops_the_recipe_s_mean_fine_tuning(monkeypatch):
    from bayescomp import recipes

    monkeypatch.setitem(recipes.TRAINING_RECIPES, "fast", replace(recipes.FAST, mean_epochs=3))
    assert recipes.recipe_options("fast", {})["mean_epochs"] == 3
    assert recipes.recipe_options("fast", {"finetune_epochs": 2})["mean_epochs"] == 3
    assert recipes.recipe_options("fast", {"finetune_epochs": 0})["mean_epochs"] == 0
    assert recipes.recipe_options("fast", {"finetune_epochs": 0, "mean_epochs": 1})["mean_epochs"] == 1  # refused later
