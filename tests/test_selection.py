"""Choices never read the test set: a run whose test labels are poisoned chooses the same thresholds (by the
validation rule, on a split held out of the training set, and by the fast recipe's rules), and only its
test error changes."""

from __future__ import annotations

import pytest
import torch

from bayescomp import pipeline
from bayescomp.compress.thresholds import validation_split
from bayescomp.data import load_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    try:
        x, y = load_mnist("train")
        xt, yt = load_mnist("test")
    except Exception as exc:  # pragma: no cover - only without the data set
        pytest.skip(f"MNIST not available: {exc}")
    return (x[:600].clone(), y[:600].clone()), (xt[:500].clone(), yt[:500].clone())


def _run(tmp_path, monkeypatch, mnist, poisoned: bool, name: str, **options):
    train, (xt, yt) = mnist
    if poisoned:  # every test label wrong: a choice that read them would change
        yt = (yt + 1 + torch.randint(0, 9, yt.shape, generator=torch.Generator().manual_seed(1))) % 10
    monkeypatch.setattr(pipeline, "load_data", lambda *a, **k: (train, (xt, yt)))
    opts = pipeline.RunOptions(model="lenet300", epochs=1, seed=2, batch_size=100, **options)
    return pipeline.run(opts, tmp_path / name, progress=False)


@pytest.mark.parametrize("options", [
    {"prior": "gnj", "auto_thresholds": "validation", "val_budget": 1.0},
    {"prior": "ghs", "auto_thresholds": "histogram", "lr": 1e-2, "kl_weight": 0.3, "finetune_epochs": 1,
     "finetune_lr": 1e-3, "pretrain_epochs": 1, "pretrain_lr": 1e-3},
], ids=["validation-rule", "fast-recipe-ghs"])
def test_poisoned_test_labels_change_nothing_but_the_test_error(tmp_path, monkeypatch, mnist, options):
    clean = _run(tmp_path, monkeypatch, mnist, False, "clean", **options)
    poisoned = _run(tmp_path, monkeypatch, mnist, True, "poisoned", **options)
    assert clean["thresholds"] == poisoned["thresholds"]
    assert clean["architecture"] == poisoned["architecture"]
    assert clean["weights_kept"] == poisoned["weights_kept"]
    assert poisoned["test_error"] > 80 > clean["test_error"]  # the poison reached the evaluation, and only it


def test_validation_split_is_held_out_of_the_training_set_only():
    train_idx, val_idx = validation_split(60_000, 0.1, seed=0)
    assert len(val_idx) == 6000 and len(train_idx) == 54_000
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert int(val_idx.max()) < 60_000  # indices of the training set: the test set is another file
    assert torch.equal(validation_split(60_000, 0.1, seed=0)[1], val_idx)  # fixed by its seed
