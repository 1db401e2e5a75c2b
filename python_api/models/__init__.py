"""Model registry: `build_model(name, num_classes, **kw)`.

Built in: resnet10, resnet12, resnet18, resnet34 (CIFAR-style, `width=` option; num_classes=None
gives a feature extractor with `.features(x)` and `.feature_dim`). Every builder takes `init=` (see
models/init.py): ResNets default to GLFC's init, the FCCL-only backbones (efficientnet_b0, mobilenetv2,
googlenet) to PyTorch's; FCCL passes its `model.init` explicitly. Other modules add theirs:

    register_model("mobilenetv2", build_mobilenetv2)    # builder(num_classes=..., **kw) -> nn.Module
"""
from __future__ import annotations

from typing import Callable, Optional

from python_api.models.heads import IncrementalNet, expand_linear
from python_api.models.resnet_cifar import ResNetCIFAR, resnet10, resnet12, resnet18, resnet34

__all__ = ["register_model", "build_model", "available_models", "IncrementalNet", "expand_linear", "ResNetCIFAR"]

_MODELS: dict = {}


def register_model(name: str, builder: Optional[Callable] = None):
    """Register `builder(num_classes=..., **kw)`; usable as a decorator."""
    def deco(fn):
        _MODELS[name] = fn
        return fn
    return deco(builder) if builder is not None else deco


def available_models() -> list:
    return sorted(_MODELS)


def build_model(name: str, num_classes: Optional[int] = None, **kwargs):
    if name not in _MODELS:
        raise KeyError(f"model: unknown architecture {name!r}; available: {', '.join(available_models())}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


for _name, _fn in (("resnet10", resnet10), ("resnet12", resnet12), ("resnet18", resnet18), ("resnet34", resnet34)):
    register_model(_name, _fn)

from python_api.models import efficientnet, googlenet, mobilenetv2  # noqa: E402,F401  (FCCL backbones register themselves)
