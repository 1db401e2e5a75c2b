"""Method registry: `fcl-ext train <name>` looks the method up here.

A method module registers itself at import time:

    register_method(MethodSpec(name="glfc", config_cls=GLFCConfig, build=build_glfc,
                               description="..."))

`build(cfg, run_dir, device) -> FederatedMethod` (see python_api/messages.py). `get_method(name)`
imports `python_api.methods.<name>` on first use, so adding a method = adding a package that calls
register_method in its __init__.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

__all__ = ["MethodSpec", "register_method", "get_method", "available_methods"]

KNOWN_METHOD_MODULES = ("glfc", "fccl", "finetune", "lwf", "ewc", "icarl", "bic", "joint", "feddf", "fml")


@dataclass
class MethodSpec:
    name: str
    config_cls: type
    build: Callable          # (cfg, run_dir: Path, device: torch.device) -> FederatedMethod
    description: str = ""


_REGISTRY: dict = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"python_api.methods.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"python_api.methods.{name}":
                raise
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods()) or 'none'}")
    return _REGISTRY[name]


def available_methods() -> list:
    for mod in KNOWN_METHOD_MODULES:
        try:
            importlib.import_module(f"python_api.methods.{mod}")
        except ModuleNotFoundError:
            pass
    return sorted(_REGISTRY)
