"""What a run is made of: the zoo model and its Bayesian twin, the data, the device, the plain start, and the
measured compression of a trained posterior. Plain functions of the run's options (`runoptions.RunOptions`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .compress import compress
from .compress.thresholds import validation_split
from .convert import bayesianize
from .data import cifar10_augment, input_shape, load_cifar10, load_mnist
from .models import build_model
from .recipes import recipe
from .rundir import RunError
from .train import TrainConfig, evaluate, fit, predict
from .train.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from .runoptions import RunOptions


def build_bayesian(model: str, prior: str, *, plain: torch.nn.Module | None = None, keep_weights: bool = False,
                   max_var: float | Mapping[str, float] | None = None, tau0: float | None = None,
                   global_kl: str | None = None, input_origin: float | None = None) -> torch.nn.Module:
    """The Bayesian twin of a zoo model (a fresh one unless `plain` is given); `input_origin`: that of its
    first layer, which reads the data (`bayesianize`)."""
    options = {k: v for k, v in (("tau0", tau0), ("global_kl", global_kl)) if v is not None}
    plain = plain if plain is not None else build_model(model)
    origin = {first_layer(plain): input_origin} if input_origin else None
    return bayesianize(plain, prior, keep_weights=keep_weights, max_var=max_var, input_origin=origin, **options)


def first_layer(model: torch.nn.Module) -> str:
    """The name of the first nn.Linear/nn.Conv2d of a plain model (in registration order: the zoo's order)."""
    return next(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def load_posterior(path: str | os.PathLike) -> torch.nn.Module:
    """The trained Bayesian model stored in a run's posterior.pt (or a training checkpoint)."""
    state = load_checkpoint(path)
    try:
        bmodel = build_bayesian(state["model"], state["prior"], tau0=state.get("tau0"), global_kl=state.get("global_kl"))
        bmodel.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise RunError(f"{path} is not a bayescomp posterior: {exc}") from exc
    return bmodel.eval()


def example_input(model: str, batch: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
    """The example input for compressing a zoo model's posterior: zeros shaped like a batch of its dataset.

    A model that is not an `nn.Sequential` chain is compressed through its torch.fx graph, which needs
    a batch the model accepts; only the shapes matter (the values are never read). `model` is the zoo
    name a run records (report.json, posterior.pt). Every command that compresses a run's posterior
    takes its example input from here.
    """
    return torch.zeros(batch, *input_shape(recipe(model).dataset), device=device)


def evaluate_compression(bmodel: torch.nn.Module, test, thresholds, bit_accounting: str = "code",
                         variance_scale: float = 1.0, *, example: torch.Tensor | None = None,
                         keeps: Mapping[str, torch.Tensor] | None = None):
    """Compress a trained model and measure it: (CompressedModel, figures for report.json).

    `example`: the example input (`example_input`) that a model other than an `nn.Sequential` chain
    is compressed with, through its torch.fx graph. `keeps`: the groups to keep, decided beforehand
    (`finetune`), instead of those the thresholds keep.
    """
    t0 = time.perf_counter()
    err_uncompressed = evaluate(bmodel, *test)
    compressed = compress(bmodel, thresholds, keeps=keeps, bit_accounting=bit_accounting,
                          variance_scale=variance_scale, example_input=example)
    preds = predict(compressed.model, test[0])
    err = 100.0 * float((preds != test[1]).float().mean())
    figures = {"test_error": err, "test_error_uncompressed": err_uncompressed,
               "compress_seconds": time.perf_counter() - t0}
    return compressed, figures


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device value; a clear error where CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise RunError(f"--device: unknown device {name!r}; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name!r} asked for, but this machine/PyTorch build has no CUDA")
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def load_data(model: str, data_dir: str | None, train_subset: int | None = None, seed: int = 0, verify: bool = True):
    """(train, test) tensors of the model's dataset, with an optional seeded random training subset."""
    dataset = recipe(model).dataset
    if dataset == "mnist":
        x, y = load_mnist("train", data_dir, verify=verify)
        xt, yt = load_mnist("test", data_dir, verify=verify)
    elif dataset == "cifar10":
        x, y = load_cifar10("train", data_dir, verify=verify)
        xt, yt = load_cifar10("test", data_dir, verify=verify)
    else:  # pragma: no cover - recipes name known datasets only
        raise RunError(f"unknown dataset {dataset!r}")
    if train_subset is not None and train_subset < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:train_subset]
        x, y = x[idx], y[idx]
    return (x, y), (xt, yt)


def augmentation(opts: RunOptions):
    if recipe(opts.model).dataset == "cifar10" and opts.augment:
        return lambda batch, gen: cifar10_augment(batch, gen)
    return None


def plain_start(opts: RunOptions, train, test, progress: bool) -> tuple[torch.nn.Module, bool]:
    """The plain model to convert, and whether its weights are a trained start (kept as posterior means)."""
    plain = build_model(opts.model)
    trained = False
    if opts.init_from is not None:
        state = load_checkpoint(opts.init_from)
        state = state.get("state_dict", state)
        try:
            plain.load_state_dict(state)
        except RuntimeError as exc:
            raise RunError(f"--init-from {opts.init_from} does not fit model {opts.model}: {exc}") from exc
        trained = True
    if opts.pretrain_epochs > 0:
        lr = opts.lr if opts.pretrain_lr is None else opts.pretrain_lr
        config = TrainConfig(opts.pretrain_epochs, opts.batch_size, lr, 0.0, opts.seed, opts.grad_clip)
        plain = plain.to(resolve_device(opts.device))
        fit(plain, train, config, test=test, progress=progress, transform=augmentation(opts))
        plain = plain.cpu()
        trained = True
    return plain, trained


def posterior_state(opts: RunOptions, bmodel: torch.nn.Module) -> dict[str, Any]:
    """What posterior.pt holds (`load_posterior` reads it)."""
    return {"model": opts.model, "prior": opts.prior, "tau0": opts.tau0, "global_kl": opts.global_kl,
            "state_dict": bmodel.state_dict()}


def hold_out(opts: RunOptions, train):
    """(training set, validation split): with --auto-thresholds validation the split is held out of the
    TRAINING set (never the test set); otherwise (train, None)."""
    if opts.auto_thresholds != "validation":
        return train, None
    try:
        train_idx, val_idx = validation_split(len(train[0]), opts.val_fraction, opts.seed)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    return (train[0][train_idx], train[1][train_idx]), (train[0][val_idx], train[1][val_idx])
