"""Fine-tuning after pruning: the decision is taken first and kept, the kept groups train on, and the one-go
run (`--finetune-epochs`), the two-step one (`bayescomp finetune RUN`) and a resumed one give the same model."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import Interrupted

import bayescomp
from bayescomp import pipeline
from bayescomp.cli import main
from bayescomp.compress import PruneError, compress, group_masks
from bayescomp.pipeline import RunError, RunOptions, finetune_run, load_posterior, run
from bayescomp.train import CheckpointError, TrainConfig, finetune_config, lr_at, predict
from bayescomp.train.loop import flush_denormals

ROOT = Path(__file__).resolve().parents[1]
DATA = str(Path(os.environ.get("BAYESCOMP_DATA", ROOT.parent / "shared" / "datasets")))

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = RunOptions(model="lenet300", prior="ghs", epochs=2, train_subset=1000, data_dir=DATA, seed=3, kl_weight=0.3)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, a run without fine-tuning, the same run fine-tuned 2 epochs in one go, their options).

    Two epochs on 1000 examples separate no groups yet, so the thresholds are each layer's median score
    after training (read off a first run: training is deterministic), which prunes about half the groups.
    """
    root = tmp_path_factory.mktemp("ft")
    torch.set_num_threads(1)
    run(BASE, root / "probe", progress=False)
    probe = load_posterior(root / "probe" / "posterior.pt")
    medians = {name: float(m.log_alpha().detach().median()) for name, m in probe.named_modules()
               if isinstance(m, bayescomp.nn.GroupSparseLayer)}
    opts = replace(BASE, thresholds=medians)
    plain = run(opts, root / "plain", progress=False)
    tuned = run(replace(opts, finetune_epochs=2), root / "tuned", progress=False)
    return root, plain, tuned, opts


def test_finetune_config_keeps_the_run_settings_and_falls_to_zero():
    base = TrainConfig(epochs=200, batch_size=64, lr=2e-3, warmup_epochs=30, seed=7, grad_clip=5.0, kl_weight=0.3,
                       lr_schedule="cosine", lr_decay_epochs=20)
    cfg = finetune_config(base, 10)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr_schedule, cfg.lr_decay_epochs) == (10, 0.0, "cosine", None)
    assert (cfg.batch_size, cfg.lr, cfg.seed, cfg.grad_clip, cfg.kl_weight) == (64, 2e-3, 7, 5.0, 0.3)
    cfg.validate()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="fine-tuning epochs"):
            finetune_config(base, bad)
    tempered = finetune_config(base, 10, 1e-3, kl_weight=0.05)
    assert (tempered.kl_weight, tempered.lr, tempered.warmup_epochs) == (0.05, 1e-3, 0.0)
    assert finetune_config(base, 10, kl_weight=None).kl_weight == 0.3


def test_the_fine_tuning_kl_weight_reaches_the_fine_tuning_only(runs, tmp_path):
    """`finetune_kl_weight` at the run's own KL weight is the run fine-tuned as before, bit for bit; a lower one
    trains the same cut posterior to another, with its KL weight recorded in the run's config."""
    root, plain, tuned, opts = runs
    same = run(replace(opts, finetune_epochs=2, finetune_kl_weight=opts.kl_weight), tmp_path / "same", progress=False)
    assert (same["test_error"], same["test_error_uncompressed"]) == (tuned["test_error"], tuned["test_error_uncompressed"])
    a, b = (torch.load(f / "posterior.pt", weights_only=False)["state_dict"] for f in (root / "tuned", tmp_path / "same"))
    assert _states_equal(a, b)
    low = run(replace(opts, finetune_epochs=2, finetune_kl_weight=0.01), tmp_path / "low", progress=False)
    assert low["architecture"] == tuned["architecture"]  # the same cut
    assert low["config"]["finetune_kl_weight"] == 0.01 and tuned["config"]["finetune_kl_weight"] is None
    c = torch.load(tmp_path / "low" / "posterior.pt", weights_only=False)["state_dict"]
    assert not _states_equal(a, c)
    # less KL: the kept weights' posteriors are narrower (the KL pulls their variances up)
    var = [k for k in a if k.endswith("weight_logvar")]
    assert var and all(c[k].mean() < a[k].mean() for k in var)


def test_compress_keeps_overrides_the_thresholds():
    torch.manual_seed(0)
    model = bayescomp.bayesianize(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)),
                                  "ghs")
    with torch.no_grad():
        model[0].a_mu[:3] -= 30.0  # inputs 0-2 of the first layer: z ≈ 0, a high score
    thresholds = {"0": 10.0, "2": 10.0}
    keeps = group_masks(model, thresholds)
    assert keeps["0"].tolist() == [False] * 3 + [True] * 3
    by_thresholds = compress(model, thresholds)
    by_keeps = compress(model, thresholds, keeps=keeps)
    assert by_keeps.report["architecture"] == by_thresholds.report["architecture"] == "3-5"
    keeps["0"][1] = True  # keep one input the thresholds drop
    wider = compress(model, thresholds, keeps=keeps)
    assert wider.report["architecture"] == "4-5"
    assert wider.report["thresholds"] == by_thresholds.report["thresholds"]
    with pytest.raises(ValueError, match="not both"):
        compress(model, thresholds, keeps=keeps, masks={})


def test_finetune_keeps_the_decision_and_records_what_it_changed(runs):
    root, plain, tuned, opts = runs
    # the same posterior before fine-tuning, the same thresholds: the same groups kept
    assert tuned["thresholds"] == plain["thresholds"]
    assert tuned["architecture"] == plain["architecture"]
    assert tuned["weights_kept_pct"] < 60
    ft = tuned["finetune"]
    assert ft["epochs"] == 2 and len(ft["history"]) == 2
    assert ft["test_error_before"] == plain["test_error"]  # what the model measured before fine-tuning
    assert ft["test_error_uncompressed_before"] == plain["test_error_uncompressed"]
    steps = -(-1000 // opts.batch_size)
    assert ft["history"][-1]["lr"] == pytest.approx(lr_at(2 * steps - 1, 2 * steps, opts.lr, "cosine"))
    assert ft["history"][0]["lr"] < opts.lr
    assert tuned["test_error"] != plain["test_error"] or tuned["test_error_uncompressed"] != plain["test_error_uncompressed"]
    assert len(tuned["history"]) == 2  # the training run's history is kept as it was
    folder = root / "tuned"
    assert len((folder / "finetune_metrics.jsonl").read_text().splitlines()) == 2
    assert not (folder / "finetune.pt").exists() and not (folder / "checkpoint.pt").exists()
    # the posterior carries the decision: its masked network is what the compressed model computes
    posterior = load_posterior(folder / "posterior.pt")
    saved = torch.load(folder / "posterior.pt", weights_only=False)
    masks = {k[: -len(".group_mask")]: v for k, v in saved["state_dict"].items() if k.endswith(".group_mask")}
    # exactly the groups the thresholds kept in the posterior before fine-tuning
    before = group_masks(load_posterior(root / "plain" / "posterior.pt"), opts.thresholds)
    assert masks.keys() == before.keys() and all(torch.equal(masks[k], before[k]) for k in masks)
    assert [int(m.sum()) for m in masks.values()] == [int(a) for a in tuned["architecture"].split("-")]
    _, test = pipeline.load_data("lenet300", DATA)
    unrounded = compress(posterior, tuned["thresholds"], keeps=masks, round_weights=False)
    assert torch.equal(predict(unrounded.model, test[0][:2000]), predict(posterior, test[0][:2000]))


def test_finetune_command_equals_the_one_go_run(runs, monkeypatch):
    root, _, tuned, opts = runs
    args = ["finetune", str(root / "plain"), "--epochs", "2", "--out", str(root / "two"), "--quiet"]
    monkeypatch.setattr("sys.argv", ["bayescomp", *args])  # what the report records as its command
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output
    two = json.loads((root / "two" / "report.json").read_text())
    for key in ("test_error", "test_error_uncompressed", "architecture", "bits", "weights_kept", "thresholds"):
        assert two[key] == tuned[key], key
    assert two["finetune"]["test_error_before"] == tuned["finetune"]["test_error_before"]
    assert two["config"]["finetune_epochs"] == 2 and two["finetuned_from"] == str(root / "plain")
    assert two["command"] == "bayescomp " + " ".join(args)
    assert "training_command" not in two  # the first run was not started from the command line
    a = torch.load(root / "two" / "posterior.pt", weights_only=False)["state_dict"]
    b = torch.load(root / "tuned" / "posterior.pt", weights_only=False)["state_dict"]
    assert _states_equal(a, b)
    # a fine-tuned run is not fine-tuned again; a folder without a posterior is refused
    again = CliRunner().invoke(main, ["finetune", str(root / "two"), "--out", str(root / "three")])
    assert again.exit_code == 1 and "fine-tuned already" in again.output
    missing = CliRunner().invoke(main, ["finetune", str(root / "nowhere"), "--out", str(root / "three")])
    assert missing.exit_code == 1 and "no trained posterior" in missing.output
    zero = CliRunner().invoke(main, ["finetune", str(root / "plain"), "--epochs", "0", "--out", str(root / "three")])
    assert zero.exit_code == 1 and "fine-tuning epochs must be a positive integer" in zero.output
    assert not (root / "three").exists() and not (root / "three.partial").exists()


def test_explicit_thresholds_are_the_config_of_the_fine_tuned_run(runs, tmp_path):
    root, plain, _, opts = runs
    looser = {name: value + 0.01 for name, value in opts.thresholds.items()}
    report = finetune_run(root / "plain", tmp_path / "loose", 1, thresholds=looser, progress=False)
    assert report["config"]["thresholds"] == looser and report["config"]["auto_thresholds"] is None
    assert report["thresholds"] == looser
    assert report["weights_kept"] > plain["weights_kept"]  # looser thresholds keep more
    assert "threshold_choice" not in report


def test_thresholds_naming_some_layers_leave_the_others_at_the_run_s_own(runs, tmp_path):
    root, plain, _, opts = runs
    fc1 = opts.thresholds["fc1"] + 0.01
    report = finetune_run(root / "plain", tmp_path / "fc1", 1, thresholds={"fc1": fc1}, progress=False)
    assert report["thresholds"] == {**opts.thresholds, "fc1": fc1}
    assert report["config"]["thresholds"] == report["thresholds"] and report["config"]["auto_thresholds"] is None


def test_a_histogram_run_fine_tuned_with_one_layer_named_equals_the_one_go_run(tmp_path):
    """`finetune RUN --thresholds fc1=X` on a run whose histogram rule chose its thresholds gives the model and
    the config of `compress --auto-thresholds histogram --thresholds fc1=X --finetune-epochs N`."""
    hist = replace(BASE, auto_thresholds="histogram")
    trained = run(hist, tmp_path / "hist", progress=False)
    fc1 = float(load_posterior(tmp_path / "hist" / "posterior.pt").fc1.log_alpha().detach().median())
    two_step = finetune_run(tmp_path / "hist", tmp_path / "two", 1, thresholds={"fc1": fc1}, progress=False)
    one_go = run(replace(hist, thresholds={"fc1": fc1}, finetune_epochs=1), tmp_path / "one", progress=False)
    assert two_step["config"]["auto_thresholds"] == "histogram" and two_step["config"]["thresholds"] == {"fc1": fc1}
    assert two_step["thresholds"] == one_go["thresholds"] == {**trained["thresholds"], "fc1": fc1}
    for key in ("test_error", "architecture", "bits"):
        assert two_step[key] == one_go[key], key
    a = torch.load(tmp_path / "two" / "posterior.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "one" / "posterior.pt", weights_only=False)["state_dict"]
    assert _states_equal(a, b)
    assert {k: v for k, v in two_step["config"].items() if k != "data_dir"} == \
        {k: v for k, v in one_go["config"].items() if k != "data_dir"}


@pytest.fixture(scope="module")
def hist_run(tmp_path_factory):
    """(folder, report) of BASE with the histogram rule: after 2 epochs on 1000 examples no layer splits yet."""
    root = tmp_path_factory.mktemp("hist")
    torch.set_num_threads(1)
    report = run(replace(BASE, auto_thresholds="histogram"), root / "hist", progress=False)
    assert report["threshold_choice"]["fc1"]["details"].get("degenerate")
    return root / "hist", report


@pytest.fixture
def floor_at_fc1_median(hist_run, monkeypatch):
    """The horseshoe's noise floor moved to the median score of the run's fc1, so that `--no-split floor` cuts
    half of that layer (at 2 epochs every score is far below the real floor 2, which would keep all)."""
    median = float(load_posterior(hist_run[0] / "posterior.pt").fc1.log_alpha().detach().median())
    monkeypatch.setattr(bayescomp.nn.ghs._GroupHS, "noise_floor", median)
    return median


def test_a_histogram_run_fine_tuned_with_no_split_floor_equals_the_one_go_run(hist_run, floor_at_fc1_median,
                                                                               tmp_path):
    """`finetune RUN --no-split floor` chooses the run's thresholds again with the floor, and gives the model and
    config of `compress --auto-thresholds histogram --no-split floor --finetune-epochs N`."""
    folder, trained = hist_run
    two_step = finetune_run(folder, tmp_path / "two", 1, no_split="floor", progress=False)
    one_go = run(replace(BASE, auto_thresholds="histogram", no_split="floor", finetune_epochs=1), tmp_path / "one",
                 progress=False)
    assert two_step["thresholds"]["fc1"] == one_go["thresholds"]["fc1"] == floor_at_fc1_median
    assert two_step["threshold_choice"]["fc1"]["details"] == {"degenerate": True, "no_split": "floor"}
    assert two_step["threshold_choice"] == one_go["threshold_choice"]
    assert int(two_step["architecture"].split("-")[0]) < int(trained["architecture"].split("-")[0])
    for key in ("thresholds", "test_error", "architecture", "bits"):
        assert two_step[key] == one_go[key], key
    a = torch.load(tmp_path / "two" / "posterior.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "one" / "posterior.pt", weights_only=False)["state_dict"]
    assert _states_equal(a, b)
    assert two_step["config"]["no_split"] == "floor" and two_step["config"]["auto_thresholds"] == "histogram"
    assert {k: v for k, v in two_step["config"].items() if k != "data_dir"} == \
        {k: v for k, v in one_go["config"].items() if k != "data_dir"}


def test_layers_named_at_training_stay_named_when_fine_tuning_names_others(hist_run, tmp_path):
    """A histogram run trained with fc1 given, fine-tuned with fc2 given: the config keeps both, as the one-go
    `compress --auto-thresholds histogram --thresholds fc1=A,fc2=B --finetune-epochs N` records them."""
    folder, _ = hist_run
    posterior = load_posterior(folder / "posterior.pt")
    fc1, fc2 = (float(m.log_alpha().detach().median()) for m in (posterior.fc1, posterior.fc2))
    hist = replace(BASE, auto_thresholds="histogram", thresholds={"fc1": fc1})
    run(hist, tmp_path / "named", progress=False)
    two_step = finetune_run(tmp_path / "named", tmp_path / "two", 1, thresholds={"fc2": fc2}, progress=False)
    assert two_step["config"]["thresholds"] == {"fc1": fc1, "fc2": fc2}
    assert two_step["config"]["auto_thresholds"] == "histogram"
    assert {n: c["method"] for n, c in two_step["threshold_choice"].items()} == \
        {"fc1": "given", "fc2": "given", "fc3": "otsu"}
    one_go = run(replace(hist, thresholds={"fc1": fc1, "fc2": fc2}, finetune_epochs=1), tmp_path / "one",
                 progress=False)
    assert two_step["thresholds"] == one_go["thresholds"] and two_step["test_error"] == one_go["test_error"]


def test_prune_no_split_floor_chooses_a_histogram_run_s_thresholds_again(hist_run, floor_at_fc1_median, tmp_path):
    folder, trained = hist_run
    result = CliRunner().invoke(main, ["prune", str(folder), "--no-split", "floor", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["thresholds"]["fc1"] == floor_at_fc1_median
    assert report["threshold_choice"]["fc1"]["details"]["no_split"] == "floor"
    assert "fc1 " + f"{floor_at_fc1_median:.2f} (no split found: cut at the noise floor)" in result.output
    assert report["weights_kept"] < trained["weights_kept"]
    # the run itself is left as it was
    assert json.loads((folder / "report.json").read_text())["thresholds"] == trained["thresholds"]
    # the command that made the run, beside this one
    again = pipeline.recompress(folder, tmp_path / "q", None, command="bayescomp prune hist --out q")
    assert "command" not in trained and "source_command" not in again
    assert again["command"] == "bayescomp prune hist --out q"
    twice = pipeline.recompress(tmp_path / "q", tmp_path / "r", None, command="bayescomp prune q --out r")
    assert twice["source_command"] == "bayescomp prune hist --out q" and twice["command"] == "bayescomp prune q --out r"


def test_prune_with_one_layer_named_records_it_as_given(hist_run, runs, tmp_path):
    """The report of `prune RUN --thresholds fc1=X` says fc1 was given; the others keep the rule's record."""
    folder, trained = hist_run
    fc1 = float(load_posterior(folder / "posterior.pt").fc1.log_alpha().detach().median())
    report = pipeline.recompress(folder, tmp_path / "p", {"fc1": fc1})
    choice = report["threshold_choice"]
    assert choice["fc1"]["method"] == "given" and choice["fc1"]["value"] == fc1
    assert choice["fc1"]["kept"] == int(report["architecture"].split("-")[0]) < 784
    assert {k: choice[k] for k in ("fc2", "fc3")} == {k: trained["threshold_choice"][k] for k in ("fc2", "fc3")}
    every = pipeline.recompress(folder, tmp_path / "q", 100.0)  # one number: every layer given
    assert {c["method"] for c in every["threshold_choice"].values()} == {"given"}
    # a run whose thresholds were set by hand has no choice to record
    root, _, _, opts = runs
    hand = pipeline.recompress(root / "plain", tmp_path / "h", {"fc1": opts.thresholds["fc1"] + 0.01})
    assert "threshold_choice" not in hand


def test_no_split_floor_needs_the_histogram_rule(runs, tmp_path):
    root, _, _, _ = runs
    with pytest.raises(RunError, match="needs --auto-thresholds histogram"):
        finetune_run(root / "plain", tmp_path / "f", 1, no_split="floor", progress=False)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.partial").exists()
    result = CliRunner().invoke(main, ["prune", str(root / "plain"), "--no-split", "floor", "--out",
                                       str(tmp_path / "p")])
    assert result.exit_code == 1 and "needs --auto-thresholds histogram" in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()
    with pytest.raises(RunError, match="--no-split must be one of"):
        pipeline.validate(replace(BASE, auto_thresholds="histogram", no_split="drop"))
    result = CliRunner().invoke(main, ["compress", "--model", "lenet300", "--epochs", "1", "--no-split", "floor",
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "needs --auto-thresholds histogram" in result.output
    assert not (tmp_path / "c").exists()


def test_thresholds_that_prune_a_whole_layer_stop_before_fine_tuning(runs):
    root, _, _, _ = runs
    with pytest.raises(PruneError, match="every group of layer fc1"):
        finetune_run(root / "plain", root / "none", 2, thresholds=-1e9, progress=False)
    assert not (root / "none").exists() and not (root / "none.partial").exists()


def test_bad_finetune_epochs_are_refused_before_any_folder(tmp_path):
    with pytest.raises(RunError, match="fine-tuning epochs"):
        run(replace(BASE, finetune_epochs=-1), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad.partial").exists()
    result = CliRunner().invoke(main, ["compress", "--epochs", "1", "--finetune-epochs", "-2", "--out",
                                       str(tmp_path / "cli")])
    assert result.exit_code == 1 and "fine-tuning epochs" in result.output


def test_a_stopped_fine_tuning_resumes_bit_for_bit(runs, tmp_path, monkeypatch):
    root, _, tuned, opts = runs
    opts = replace(opts, finetune_epochs=2)
    real_fit = pipeline.fit

    def stop_after_first_finetune_epoch(model, train, config, **kwargs):
        if Path(kwargs["checkpoint"]).name == pipeline.FINETUNE_CHECKPOINT:
            def stop(row):
                if row["epoch"] == 2:
                    raise Interrupted  # (before epoch 2's checkpoint is written: the one of epoch 1 is kept)
            kwargs["on_epoch"] = stop
        return real_fit(model, train, config, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "fit", stop_after_first_finetune_epoch)
        with pytest.raises(Interrupted):
            run(opts, tmp_path / "r", progress=False)
    assert (tmp_path / "r.partial" / "finetune.pt").is_file()
    # a look at it meanwhile (`bayescomp prune DIR.partial`) compresses the fine-tuning's checkpoint, with its
    # decision, and leaves it alone
    checkpoint = (tmp_path / "r.partial" / "finetune.pt").read_bytes()
    peek = pipeline.recompress(tmp_path / "r", tmp_path / "peek", None, data_dir=DATA)
    assert (tmp_path / "r.partial" / "finetune.pt").read_bytes() == checkpoint
    assert peek["unfinished"] | {"from": None} == {"from": None, "epochs_trained": 2, "epochs": 2,
                                                   "finetune_epochs_done": 1, "finetune_epochs": 2}
    assert peek["architecture"] == tuned["architecture"]  # the decision the fine-tuning took, not a new one
    at_epoch_1 = torch.load(tmp_path / "r.partial" / "finetune.pt", weights_only=False)["model"]
    assert _states_equal(torch.load(tmp_path / "peek" / "posterior.pt", weights_only=False)["state_dict"], at_epoch_1)
    assert not _states_equal(at_epoch_1, torch.load(tmp_path / "r.partial" / "checkpoint.pt", weights_only=False)["model"])
    with pytest.raises(CheckpointError, match="cannot be extended"):
        run(replace(opts, finetune_epochs=3), tmp_path / "r", resume=True, progress=False)
    report = run(opts, tmp_path / "r", resume=True, progress=False)
    for key in ("test_error", "test_error_uncompressed", "architecture", "bits"):
        assert report[key] == tuned[key], key
    assert [r["loss"] for r in report["finetune"]["history"]] == [r["loss"] for r in tuned["finetune"]["history"]]
    a = torch.load(tmp_path / "r" / "posterior.pt", weights_only=False)["state_dict"]
    b = torch.load(root / "tuned" / "posterior.pt", weights_only=False)["state_dict"]
    assert _states_equal(a, b)


def test_flush_denormals_zeroes_them_inside_the_block_only():
    tiny = torch.tensor([1e-39, 1.0])  # 1e-39 is a float32 denormal
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    assert (tiny * 1.0)[0] != 0
    with flush_denormals():
        assert (tiny * 1.0)[0] == 0 and (tiny * 1.0)[1] == 1
    assert (tiny * 1.0)[0] != 0


def test_the_training_command_is_kept_beside_the_fine_tuning_one(runs, tmp_path):
    root, _, _, _ = runs
    shutil.copytree(root / "plain", tmp_path / "plain")
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    report["command"] = "bayescomp compress --model lenet300 --prior ghs --out plain"
    report["config"]["init_from"] = str(tmp_path / "gone.pt")  # a start file deleted since: not needed here
    (tmp_path / "plain" / "report.json").write_text(json.dumps(report))
    tuned = finetune_run(tmp_path / "plain", tmp_path / "tuned", 1, progress=False, command="bayescomp finetune plain")
    assert tuned["training_command"] == report["command"] and tuned["command"] == "bayescomp finetune plain"
    assert json.loads((tmp_path / "tuned" / "report.json").read_text())["training_command"] == report["command"]
    assert tuned["config"]["init_from"] == str(tmp_path / "gone.pt")


def test_progress_counts_the_fine_tuning_epochs(tmp_path):
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "options.json").write_text(json.dumps({"model": "lenet300", "prior": "ghs", "epochs": 3,
                                                   "finetune_epochs": 4}))
    (work / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "seconds": 10.0}) + "\n" for i in range(3)))
    progress = pipeline.run_progress(tmp_path / "run")  # training done, fine-tuning not begun
    assert (progress["finetune_epochs_done"], progress["seconds_left"]) == (0, pytest.approx(4 * 10.0))
    (work / "finetune_metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 20.0, "test_error": 1.5}) + "\n")
    progress = pipeline.run_progress(tmp_path / "run")
    assert progress["finetune_epochs_done"] == 1 and progress["last"]["test_error"] == 1.5
    assert progress["seconds_spent"] == pytest.approx(50.0)
    assert progress["epoch_seconds"] == pytest.approx(12.5)  # the last four epochs: 10, 10, 10, 20
    assert progress["seconds_left"] == pytest.approx(3 * 12.5)
    result = CliRunner().invoke(main, ["show", str(tmp_path / "run")])
    assert result.exit_code == 0 and "fine-tuning epochs" in result.output and "1 of 4" in result.output


_DDP_WORKER = r'''
import json
import sys

import torch

from bayescomp.pipeline import RunOptions, run
from bayescomp.train import distributed

torch.set_num_threads(1)
out, data, thresholds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
opts = RunOptions(model="lenet300", prior="ghs", epochs=1, train_subset=512, data_dir=data, seed=3, kl_weight=0.3,
                  batch_size=64, thresholds=thresholds, finetune_epochs=2)
report = run(opts, out + "/run", progress=False)
with open(f"{out}/rank{distributed.rank()}.json", "w") as f:
    json.dump({"keys": sorted(report)}, f)
distributed.cleanup()
'''


def test_data_parallel_fine_tuning_on_two_processes(runs, tmp_path):
    """Every process prunes and fine-tunes (their collectives must meet), rank 0 alone measures and writes."""
    import socket
    import subprocess
    import sys

    _, _, _, opts = runs
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "GROUP_RANK")}
        env.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path), DATA,
                                       json.dumps(opts.thresholds)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    assert "finetune" in json.loads((tmp_path / "rank0.json").read_text())["keys"]
    assert json.loads((tmp_path / "rank1.json").read_text())["keys"] == []  # rank 1 only trained
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["finetune"]["epochs"] == 2 and len(report["finetune"]["history"]) == 2
    assert report["environment"]["processes"] == 2 and "test_error_before" in report["finetune"]


def test_report_page_shows_the_fine_tuning(runs, tmp_path):
    from bayescomp.report.page import write_report

    root, _, tuned, _ = runs
    shutil.copytree(root / "tuned", tmp_path / "tuned")
    text = write_report(tmp_path / "tuned").read_text()
    before = tuned["finetune"]["test_error_before"]
    assert f"| fine-tuned after pruning | 2 epochs; test error before: {before:.2f}% compressed" in text
    section = text.split("## Fine-tuning after pruning", 1)[1]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and ln[2:3].isdigit()]
    assert [int(r.split("|")[1]) for r in rows[:2]] == [1, 2]
