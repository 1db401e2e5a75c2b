"""Class-incremental network: backbone features + a linear head that grows per task.

    net = IncrementalNet(backbone, num_classes=10)   # backbone has .features(x) and .feature_dim
    net.expand(20)          # new Linear(d, 20), default init, first 10 rows (weight+bias) copied
    net(x) -> logits, net.features(x) -> [N, d]

The reference's `network` (myNetwork.py) does exactly this (spec §1.1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["IncrementalNet", "expand_linear"]


def expand_linear(old: nn.Linear, num_out: int) -> nn.Linear:
    new = nn.Linear(old.in_features, num_out, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    keep = min(old.out_features, num_out)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
        if old.bias is not None:
            new.bias[:keep] = old.bias[:keep]
    return new


class IncrementalNet(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def expand(self, num_classes: int) -> None:
        if num_classes != self.fc.out_features:
            self.fc = expand_linear(self.fc, num_classes)

    def features(self, x):
        return self.backbone.features(x)

    def forward(self, x):
        return self.fc(self.backbone.features(x))
