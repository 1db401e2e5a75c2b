"""MobileNetV2, CIFAR variant (specs/fccl.md 2.2): 3x3 stride-1 stem, stride 1 in the second stage.

The reference pools with avg_pool2d(4) on the 4x4 map a 32x32 input leaves; adaptive pooling is the same
there and also accepts other input sizes (the bundled demo uses 16x16 images).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from python_api.models import register_model
from python_api.models.init import apply_init

# (expansion, out_channels, blocks, first stride) per stage; stage 2 uses stride 1 for 32x32 inputs.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_channels * expansion
        self.stride = stride
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.ReLU(inplace=True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = None
        if stride == 1:
            # The reference keeps a residual on every stride-1 block, projecting when widths differ.
            self.shortcut = (nn.Identity() if in_channels == out_channels else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)))

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return out + self.shortcut(x) if self.shortcut is not None else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, init: str = "pytorch"):
        super().__init__()
        stem = _scaled(32, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True))
        blocks, channels = [], stem
        for expansion, out, count, stride in STAGES:
            out = _scaled(out, width)
            for index in range(count):
                blocks.append(InvertedResidual(channels, out, expansion, stride if index == 0 else 1))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        head = _scaled(1280, width)
        self.head = nn.Sequential(nn.Conv2d(channels, head, 1, bias=False), nn.BatchNorm2d(head),
                                  nn.ReLU(inplace=True))
        self.feature_dim = head
        self.classifier = nn.Linear(head, num_classes)
        apply_init(self, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mobilenetv2(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, init: str = "pytorch") -> MobileNetV2:
    return MobileNetV2(num_classes, width, in_channels, init)


register_model("mobilenetv2", mobilenetv2)
