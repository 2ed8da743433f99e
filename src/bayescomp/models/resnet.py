"""Residual and branching networks in plain PyTorch (no downloads), for graph compression.

* `resnet20_cifar`: He et al.'s CIFAR ResNet-20 (3 stages × 3 basic blocks, 16/32/64 channels) with
  option-B shortcuts (1×1 convolution + batch norm where the shape changes, identity elsewhere).
* `resnet18`: torchvision's ResNet-18 layout (7×7 stem, max-pool, 64-128-256-512 basic blocks,
  1×1 conv + batch norm downsampling, global average pool, fc); module names match torchvision's.
* `resnet_mnist`: a small residual net for 1×28×28 inputs.
* `concat_net`: two branches concatenated along channels, then conv, pool and a linear layer.

These are not `nn.Sequential` chains: `bayescomp.compress` shrinks them through their traced graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """Option-B shortcut: a strided 1×1 convolution + batch norm where the shape changes."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3×3 conv + batch norm layers, a shortcut, the sum, then ReLU (torchvision's naming)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """Stem → stages of basic blocks → global average pool → flatten → fc."""

    def __init__(self, stem: nn.Module, stem_channels: int, widths: tuple[int, ...], blocks: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        in_ch = stem_channels
        for i, width in enumerate(widths, start=1):
            setattr(self, f"layer{i}", _stage(in_ch, width, blocks, 1 if i == 1 else 2))
            in_ch = width
        self.n_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet20_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-20 for 3×32×32 inputs: 3×3 stem (16), stages of 3 blocks at 16/32/64, option-B shortcuts.

    270,896 weights (convolutions, shortcut convolutions and fc; batch norm excluded).
    """
    stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    return ResNet(stem, 16, (16, 32, 64), 3, num_classes)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 (basic blocks [2, 2, 2, 2]) with the same module names."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 2, 1)
        self.layer2 = _stage(64, 128, 2, 2)
        self.layer3 = _stage(128, 256, 2, 2)
        self.layer4 = _stage(256, 512, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet18:
    """torchvision-style ResNet-18 (11,678,912 weights for 1000 classes); any input of at least 32×32."""
    return ResNet18(num_classes, in_channels)


def resnet18_cifar(num_classes: int = 10) -> ResNet18:
    """torchvision-style ResNet-18 with 10 classes, for 3×32×32 CIFAR-10 inputs (11,172,032 weights)."""
    return ResNet18(num_classes, 3)


def resnet_mnist(num_classes: int = 10, in_channels: int = 1) -> ResNet:
    """A small residual net for 1×28×28: 3×3 stem (16), blocks 16→16, 16→32 (stride 2), 32→32, pool, fc."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    model = ResNet(stem, 16, (16, 32), 1, num_classes)
    model.layer2.append(BasicBlock(32, 32))
    return model


class ConcatNet(nn.Module):
    """Stem → two branches (1×1 and 3×3) concatenated along channels → 3×3 conv → pool → linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(3 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.pool(self.mix(x))
        return self.fc(torch.flatten(x, 1))


def concat_net(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> ConcatNet:
    """A small branching net: two branches of `width` and 2·`width` channels joined by torch.cat."""
    return ConcatNet(num_classes, in_channels, width)


__all__ = ["BasicBlock", "ConcatNet", "ResNet", "ResNet18", "concat_net", "resnet18", "resnet18_cifar", "resnet20_cifar",
           "resnet_mnist"]
