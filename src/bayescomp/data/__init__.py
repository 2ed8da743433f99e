"""Dataset readers (MNIST, CIFAR-10) with checksum verification, safe parsing and offline-friendly fetching."""

from __future__ import annotations

from .cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar10_augment,
    cifar10_label_names,
    fetch_cifar10,
    load_cifar10,
)
from .mnist import fetch_mnist, load_mnist
from .paths import DATASETS, INPUT_SHAPES, DataError, input_shape, resolve_data_dir

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "INPUT_SHAPES",
    "DataError",
    "cifar10_augment",
    "cifar10_label_names",
    "fetch_cifar10",
    "fetch_mnist",
    "input_shape",
    "load_cifar10",
    "load_mnist",
    "resolve_data_dir",
]
