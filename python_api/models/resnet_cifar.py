"""CIFAR-style ResNets (3×3 stem, stride 1, no max-pool): ResNet-10/12/18/34 and width variants.

GLFC's backbone is the ResNet-18 of its reference (spec §1.1): BasicBlock [2,2,2,2], widths
64/128/256/512, conv init N(0, sqrt(2/(k·k·out))), BN γ=1 β=0, global average pooling (= the
reference's AvgPool2d(4) on 32×32 inputs, and works for any input size). The reference's CBAM modules
are never called, so they are left out. FCCL's ResNets are the same networks with PyTorch's default
init (`init="pytorch"`, python_api/models/init.py); GLFC's init stays the default here.

    net = ResNetCIFAR([2, 2, 2, 2], num_classes=100)        # logits
    net = ResNetCIFAR([2, 2, 2, 2], num_classes=None)       # feature extractor: forward -> [N, 512]
    net.features(x), net.feature_dim
    resnet18(num_classes=10, width=16)                      # narrow variant: widths 16/32/64/128
    resnet10(num_classes=10, init="pytorch")                # FCCL's init (the layers' defaults)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from python_api.models.init import apply_init

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet10", "resnet12", "resnet18", "resnet34", "BLOCK_COUNTS"]

BLOCK_COUNTS = {10: [1, 1, 1, 1], 12: [2, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetCIFAR(nn.Module):
    def __init__(self, block_counts: Sequence[int] = (2, 2, 2, 2), num_classes: Optional[int] = None,
                 width: int = 64, in_channels: int = 3, init: str = "glfc"):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, (n, cout) in enumerate(zip(block_counts, widths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes) if num_classes else None
        apply_init(self, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return f if self.fc is None else self.fc(f)


def _builder(depth: int):
    def build(num_classes: Optional[int] = None, width: int = 64, in_channels: int = 3, init: str = "glfc",
              **_ignored) -> ResNetCIFAR:
        return ResNetCIFAR(BLOCK_COUNTS[depth], num_classes=num_classes, width=width, in_channels=in_channels,
                           init=init)
    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}, BasicBlock {BLOCK_COUNTS[depth]}, widths w/2w/4w/8w."
    return build


resnet10, resnet12, resnet18, resnet34 = (_builder(d) for d in (10, 12, 18, 34))
