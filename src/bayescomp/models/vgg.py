"""VGG-16 for CIFAR-10 (the 15-layer variant of Li et al. 2016 / Zagoruyko's cifar.torch) as a flat chain."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

#: channels per convolution, "M" = 2×2 max-pool
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                    512, 512, 512, "M")


def vgg16_cifar(num_classes: int = 10) -> nn.Sequential:
    """13 conv 3×3 (+ batch norm + ReLU), 5 max-pools, FC 512→512 (+ batch norm + ReLU), FC 512→10.

    14,977,728 weights; input 3×32×32. Convolutions have no bias (batch norm follows each one).
    """
    layers: list[tuple[str, nn.Module]] = []
    in_ch, block, idx = 3, 1, 1
    for v in VGG16_CFG:
        if v == "M":
            layers.append((f"pool{block}", nn.MaxPool2d(2)))
            block, idx = block + 1, 1
            continue
        name = f"{block}_{idx}"
        layers += [(f"conv{name}", nn.Conv2d(in_ch, int(v), 3, padding=1, bias=False)),
                   (f"bn{name}", nn.BatchNorm2d(int(v))), (f"relu{name}", nn.ReLU())]
        in_ch, idx = int(v), idx + 1
    layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(512, 512)), ("bn_fc1", nn.BatchNorm1d(512)),
               ("relu_fc1", nn.ReLU()), ("fc2", nn.Linear(512, num_classes))]
    return nn.Sequential(OrderedDict(layers))
