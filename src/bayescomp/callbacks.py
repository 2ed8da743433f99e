"""Training-loop integration: a PyTorch Lightning callback that turns a loss into the negative ELBO.

>>> trainer = lightning.Trainer(callbacks=[bayescomp.callbacks.KLCallback(n_train=60_000)])   # doctest: +SKIP

The LightningModule's `training_step` keeps returning its data term (e.g. the mean cross-entropy);
the callback adds β·KL/N to it — the place Distiller calls `before_backward_pass` — where N is the
training-set size and β ramps from 0 to 1 over `warmup_epochs` exactly as in `bayescomp.train.fit`.
After each training batch it applies the layers' variance clamps (`max_var`), as `fit` does after
each optimiser step. Lightning is optional: without it the class still works with any trainer
object that offers `global_step` and `num_training_batches` (this is how it is tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .convert import group_layers, kl_divergence
from .train.config import kl_beta

try:  # Lightning 2.x, then the older package name; neither is a dependency of bayescomp
    from lightning.pytorch import Callback as _Base
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback as _Base
    except ImportError:
        _Base = object


class KLCallback(_Base):  # type: ignore[misc, valid-type]
    """Add β·KL(q‖p)/N to the loss a LightningModule's `training_step` returns.

    - `n_train`: N, the number of training examples (not the batch size).
    - `warmup_epochs`: β rises linearly from 0 to `kl_weight` over this many epochs (0: β = `kl_weight`
      throughout).
    - `kl_weight`: the final β (default 1: the ELBO; see `TrainConfig.kl_weight`).
    - `log`: log ``kl`` (the summed KL) and ``kl_beta`` with the module's `log`.
    """

    def __init__(self, n_train: int, warmup_epochs: float = 0.0, log: bool = True, kl_weight: float = 1.0) -> None:
        super().__init__()
        if not n_train > 0:
            raise ValueError(f"n_train must be a positive number of training examples, got {n_train!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warm-up epochs must be ≥ 0, got {warmup_epochs}")
        if not (kl_weight > 0 and math.isfinite(kl_weight)):
            raise ValueError(f"KL weight must be positive and finite, got {kl_weight!r}")
        self.kl_weight = float(kl_weight)
        self.n_train = int(n_train)
        self.warmup_epochs = float(warmup_epochs)
        self.log_kl = log
        self._original: Any = None

    def beta(self, trainer: Any) -> float:
        """β at the trainer's current optimiser step."""
        steps = max(1, int(getattr(trainer, "num_training_batches", 1) or 1))
        return kl_beta(int(trainer.global_step), steps, self.warmup_epochs, self.kl_weight)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not group_layers(pl_module):
            raise ValueError("KLCallback: the module has no group-sparse layer; call bayescomp.bayesianize first")
        if self._original is not None:  # already wrapped (a second fit without on_fit_end)
            return
        original = pl_module.training_step
        self._original = original

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if out is None:  # the module skipped this batch
                return out
            beta = self.beta(trainer)
            kl = kl_divergence(pl_module)
            term = beta * kl / self.n_train
            if self.log_kl and hasattr(pl_module, "log"):
                pl_module.log("kl", kl.detach(), on_step=True, on_epoch=False)
                pl_module.log("kl_beta", float(beta), on_step=True, on_epoch=False)
            if isinstance(out, Mapping):
                out = dict(out)
                out["loss"] = out["loss"] + term
                return out
            return out + term

        pl_module.training_step = training_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for layer in group_layers(pl_module).values():
            layer.clamp_variances()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._original is not None:
            if "training_step" in vars(pl_module):
                del pl_module.training_step  # back to the class's method
            self._original = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)


__all__ = ["KLCallback"]
