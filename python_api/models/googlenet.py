"""GoogLeNet, CIFAR variant (specs/fccl.md 2.2): a 192-channel 3x3 stem, no early down-sampling,
inception stages 3/4/5 with two stride-2 max-pools, global average pool (AvgPool2d(8) at 32x32).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from python_api.models import register_model
from python_api.models.init import apply_init

# (in, 1x1, 3x3 reduce, 3x3, double-3x3 reduce, double-3x3, pool projection); None marks a max-pool.
INCEPTIONS = (
    (192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), None,
    (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
    (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128), None,
    (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class Inception(nn.Module):
    def __init__(self, in_channels, n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj):
        super().__init__()
        self.branch1 = nn.Sequential(*_conv_bn_relu(in_channels, n1x1, 1))
        self.branch2 = nn.Sequential(*_conv_bn_relu(in_channels, n3x3_reduce, 1), *_conv_bn_relu(n3x3_reduce, n3x3, 3))
        # The 5x5 branch is two stacked 3x3 convolutions, as in the reference.
        self.branch3 = nn.Sequential(*_conv_bn_relu(in_channels, n5x5_reduce, 1), *_conv_bn_relu(n5x5_reduce, n5x5, 3),
                                     *_conv_bn_relu(n5x5, n5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_channels, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, init: str = "pytorch"):
        super().__init__()

        def scaled(channels: int) -> int:
            return max(2, int(round(channels * width)))

        stem = scaled(192)
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, stem, 3))
        layers, channels = [], stem
        for spec in INCEPTIONS:
            if spec is None:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                continue
            block = Inception(channels, *(scaled(c) for c in spec[1:]))
            layers.append(block)
            channels = block.out_channels
        self.inceptions = nn.Sequential(*layers)
        self.feature_dim = channels
        self.classifier = nn.Linear(channels, num_classes)
        apply_init(self, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.inceptions(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def googlenet(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, init: str = "pytorch") -> GoogLeNet:
    return GoogLeNet(num_classes, width, in_channels, init)


register_model("googlenet", googlenet)
