"""EfficientNet-B0, CIFAR variant (specs/fccl.md 2.2): 3x3 stride-1 stem, MBConv blocks with
squeeze-excitation (ratio 0.25 of the block input), swish, dropout 0.2 before the classifier, no
1280-channel head convolution.

Drop-connect is off by default, as in the official code: it configures a rate of 0.2 scaled by block
depth, but the depth counter is never incremented (fccl/Network/efficientnet.py:119-124, same in fccl+),
so every block's rate is 0. `drop_connect_rate=0.2` turns on the intended schedule.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from python_api.models import register_model
from python_api.models.init import apply_init

# (expansion, out_channels, blocks, kernel, first stride) per stage.
STAGES = ((1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2), (6, 112, 3, 5, 1),
          (6, 192, 4, 5, 2), (6, 320, 1, 3, 1))


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Drops whole residual branches per sample (stochastic depth), rescaling the kept ones."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(scale))))


class MBConv(nn.Module):
    def __init__(self, in_channels, out_channels, expansion, kernel, stride, drop_rate, se_ratio=0.25):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = None
        if expansion != 1:
            self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.SiLU())
        self.se = SqueezeExcitation(hidden, max(1, int(in_channels * se_ratio)))
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.se(self.depthwise(out)))
        if self.residual:
            out = drop_connect(out, self.drop_rate, self.training) + x
        return out


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.2, drop_connect_rate: float = 0.0, init: str = "pytorch"):
        super().__init__()

        def scaled(channels: int) -> int:
            return max(4, int(round(channels * width)))

        stem = scaled(32)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.SiLU())
        total = sum(stage[2] for stage in STAGES)
        blocks, channels, index = [], stem, 0
        for expansion, out, count, kernel, stride in STAGES:
            out = scaled(out)
            for position in range(count):
                rate = drop_connect_rate * index / total
                blocks.append(MBConv(channels, out, expansion, kernel, stride if position == 0 else 1, rate))
                channels, index = out, index + 1
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = channels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        apply_init(self, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


def efficientnet_b0(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, init: str = "pytorch",
                    drop_connect_rate: float = 0.0) -> EfficientNetB0:
    return EfficientNetB0(num_classes, width, in_channels, drop_connect_rate=drop_connect_rate, init=init)


register_model("efficientnet_b0", efficientnet_b0)
