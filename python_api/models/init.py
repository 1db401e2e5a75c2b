"""Weight initialisation schemes, one per method's official code (`model.init`).

    "pytorch"  the layers' own defaults (kaiming-uniform with a=sqrt(5) for conv/linear weights, BN γ=1 β=0):
               what the FCCL code uses for every backbone; no file under fccl/Network/ touches init
               (specs/fccl.md 2.2).
    "glfc"     GLFC's ResNet init (specs/glfc.md 1.1): conv weights N(0, sqrt(2 / (k·k·out_channels))),
               BN γ=1 β=0; linear layers and conv biases keep their defaults.

Side by side on the same data the GLFC init costs FCCL about 7 points of intra-domain accuracy (issue 16),
so each method's presets name the scheme of its own code.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["INIT_SCHEMES", "apply_init"]

INIT_SCHEMES = ("pytorch", "glfc")


def apply_init(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise `model` in place with `scheme` (one of INIT_SCHEMES) and return it.

    "pytorch" leaves a freshly built model as it is: its layers were initialised by their constructors."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init: {scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    if scheme == "glfc":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    return model
