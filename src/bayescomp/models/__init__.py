"""Plain PyTorch models of the paper's benchmarks, and a registry of them by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .lenet import lenet5_caffe, lenet300_100
from .resnet import concat_net, resnet18, resnet18_cifar, resnet20_cifar, resnet_mnist
from .vgg import vgg16_cifar

#: name -> (constructor, dataset name)
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "lenet300": (lenet300_100, "mnist"),
    "lenet5": (lenet5_caffe, "mnist"),
    "vgg16": (vgg16_cifar, "cifar10"),
    # residual and concatenating networks: compressed through their torch.fx graph (compress.analysis)
    "resnet20": (resnet20_cifar, "cifar10"),
    "resnet18_cifar": (resnet18_cifar, "cifar10"),
    "resnet_mnist": (resnet_mnist, "mnist"),
    "concat_net": (concat_net, "cifar10"),
}


def build_model(name: str) -> nn.Module:
    """A fresh plain model by its registry name (e.g. ``"lenet300"``)."""
    try:
        ctor, _ = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}") from None
    return ctor()


def model_dataset(name: str) -> str:
    """The dataset a registry model is built for."""
    build_model(name)  # validates the name
    return MODELS[name][1]


__all__ = ["MODELS", "build_model", "model_dataset", "concat_net", "lenet300_100", "lenet5_caffe", "resnet18",
           "resnet18_cifar", "resnet20_cifar", "resnet_mnist", "vgg16_cifar"]
