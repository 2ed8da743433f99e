"""LeNet-300-100 and LeNet-5-Caffe as plain `nn.Sequential` chains (named layers)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def lenet300_100(num_classes: int = 10) -> nn.Sequential:
    """784-300-100-10 fully connected network with ReLU (266,200 weights)."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(784, 300),
            relu1=nn.ReLU(),
            fc2=nn.Linear(300, 100),
            relu2=nn.ReLU(),
            fc3=nn.Linear(100, num_classes),
        )
    )


def lenet5_caffe(num_classes: int = 10) -> nn.Sequential:
    """Caffe's LeNet-5: conv 20@5×5 → max-pool → conv 50@5×5 → max-pool → FC 800→500 → ReLU → FC 500→10.

    430,500 weights. As in Caffe's definition, the convolutions have no nonlinearity of their own.
    """
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 20, 5),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(20, 50, 5),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(800, 500),
            relu1=nn.ReLU(),
            fc2=nn.Linear(500, num_classes),
        )
    )
