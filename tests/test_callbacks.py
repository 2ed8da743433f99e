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


def test_two_epochs_of_a_real_lightning_trainer():
    """A real `Trainer.fit`: the loss Lightning backpropagates is the data term plus β·KL/N, β rising over the
    warm-up as in `fit`; `kl` and `kl_beta` are logged; the variances are clamped; the module is restored."""
    import lightning.pytorch as L

    n_train, batch_size, warmup_epochs, kl_weight = 16, 4, 1.0, 0.5
    batches = n_train // batch_size
    seen: list[tuple[int, float, float, float]] = []  # (step, loss backpropagated, data term, KL at that step)

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bayescomp.bayesianize(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "gnj",
                                             max_var=0.01)
            self.data_term = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.data_term = F.cross_entropy(self.net(x), y)
            return self.data_term

        def on_before_backward(self, loss):  # parameters not yet stepped: the KL is the one the loss holds
            seen.append((self.trainer.global_step, loss.item(), self.data_term.item(),
                         bayescomp.kl_divergence(self).item()))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train, 4, generator=gen), torch.randint(0, 3, (n_train,), generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    torch.manual_seed(0)
    lit = Lit()
    layers = [m for m in lit.modules() if isinstance(m, GroupSparseLayer)]
    with torch.no_grad():
        for layer in layers:
            layer.weight_logvar.fill_(0.0)  # σ² = 1, far above the clamp 0.01: only the callback brings it down
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KLCallback(n_train=n_train, warmup_epochs=warmup_epochs, kl_weight=kl_weight)])
    trainer.fit(lit, data)

    assert trainer.current_epoch == 2 and [s[0] for s in seen] == list(range(2 * batches))
    for step, loss, data_term, kl in seen:
        beta = kl_weight * min(1.0, (step + 1) / (warmup_epochs * batches))
        assert kl > 0
        assert loss == pytest.approx(data_term + beta * kl / n_train, rel=1e-5, abs=1e-7), step
    last_step, _, _, last_kl = seen[-1]
    assert trainer.callback_metrics["kl_beta"].item() == pytest.approx(kl_weight)  # the end of the ramp
    assert trainer.callback_metrics["kl"].item() == pytest.approx(last_kl, rel=1e-5)
    for layer in layers:
        assert layer.weight_logvar.max().item() <= math.log(0.01) + 1e-6
    assert "training_step" not in vars(lit)  # the wrapper is gone after fit
