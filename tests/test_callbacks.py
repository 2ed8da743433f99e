"""Tests of the Lightning KL callback: the loss it produces is the data term plus β·KL/N."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayescomp
from bayescomp.callbacks import KLCallback
from bayescomp.nn import GroupSparseLayer


class _Module(nn.Module):
    """Duck-typed LightningModule: a Bayesian MLP whose training_step returns the cross-entropy."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.net = bayescomp.bayesianize(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "gnj", max_var=0.01)
        self.as_dict = as_dict
        self.logged: dict[str, float] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return {"loss": loss} if self.as_dict else loss

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


@pytest.mark.parametrize("as_dict", [False, True])
def test_loss_gains_beta_kl_over_n_and_is_restored(as_dict):
    module = _Module(as_dict).eval()  # evaluation: the data term is deterministic
    trainer = SimpleNamespace(global_step=4, num_training_batches=10)
    cb = KLCallback(n_train=1000, warmup_epochs=2.0)
    batch = _batch()
    plain = module.training_step(batch, 0)
    cb.on_fit_start(trainer, module)
    out = module.training_step(batch, 0)
    loss, base = (out["loss"], plain["loss"]) if as_dict else (out, plain)
    beta = 5 / 20  # step 4 of a 2-epoch warm-up at 10 batches per epoch: (4 + 1) / 20
    kl = bayescomp.kl_divergence(module).item()
    assert kl > 0
    assert loss.item() == pytest.approx(base.item() + beta * kl / 1000, rel=1e-6)
    assert module.logged["kl"] == pytest.approx(kl, rel=1e-6) and module.logged["kl_beta"] == beta
    loss.backward()  # the KL term reaches the variational parameters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "z_logvar" in n)
    trainer.global_step = 100  # after the warm-up β = 1
    out = module.training_step(batch, 0)
    assert (out["loss"] if as_dict else out).item() == pytest.approx(base.item() + kl / 1000, rel=1e-6)
    cb.on_fit_end(trainer, module)
    again = module.training_step(batch, 0)
    assert (again["loss"] if as_dict else again).item() == pytest.approx(base.item(), rel=1e-6)


def test_kl_weight_is_the_end_of_the_ramp():
    module = _Module().eval()
    trainer = SimpleNamespace(global_step=4, num_training_batches=10)
    cb = KLCallback(n_train=1000, warmup_epochs=2.0, kl_weight=0.4)
    batch = _batch()
    base = module.training_step(batch, 0).item()
    cb.on_fit_start(trainer, module)
    kl = bayescomp.kl_divergence(module).item()
    assert module.training_step(batch, 0).item() == pytest.approx(base + 0.4 * 5 / 20 * kl / 1000, rel=1e-6)
    trainer.global_step = 100
    assert module.training_step(batch, 0).item() == pytest.approx(base + 0.4 * kl / 1000, rel=1e-6)
    assert module.logged["kl_beta"] == pytest.approx(0.4)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="KL weight"):
            KLCallback(n_train=10, kl_weight=bad)


def test_variances_are_clamped_after_each_batch():
    module = _Module()
    layer = next(m for m in module.modules() if isinstance(m, GroupSparseLayer))
    with torch.no_grad():
        layer.weight_logvar.fill_(0.0)  # σ² = 1 > max_var
    KLCallback(n_train=10).on_train_batch_end(SimpleNamespace(), module, None, None, 0)
    assert layer.weight_logvar.max().item() <= math.log(0.01) + 1e-6


def test_bad_arguments_and_plain_module():
    with pytest.raises(ValueError, match="n_train"):
        KLCallback(n_train=0)
    with pytest.raises(ValueError, match="warm-up"):
        KLCallback(n_train=10, warmup_epochs=-1)
    with pytest.raises(ValueError, match="no group-sparse layer"):
        KLCallback(n_train=10).on_fit_start(SimpleNamespace(global_step=0), nn.Linear(2, 2))


def test_with_a_real_lightning_trainer(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bayescomp.bayesianize(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "gnj")
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.seen.append(float(outputs["loss"]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    x, y = _batch()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    lit = Lit()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                        callbacks=[KLCallback(n_train=8)])
    trainer.fit(lit, data)
    assert len(lit.seen) == 2 and all(math.isfinite(v) for v in lit.seen)
    assert "training_step" not in vars(lit)  # the wrapper is gone after fit
