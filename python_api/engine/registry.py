"""Engine registry: the runner looks an engine up by name here and imports no engine itself.

An engine module registers itself at import time, as methods do (python_api/methods/__init__.py):

    register_engine(EngineSpec(name="inprocess", transport=InProcessEngine))
    register_engine(EngineSpec(name="flower", run=run_with_flower, prefix=True))

`transport(method, progress=...) -> Transport`: the runner's loop drives the rounds over it.
`run(method_name, cfg, out_dir=, resume=, engine=, verbose=) -> RunResult`: the engine owns the process
layout (Flower starts its runtime, whose ServerApp calls the runner back with a transport factory).
`prefix=True` claims every name starting with `name` ("flower-sim", "flower-..."), so the engine itself
says which of its variants exist. `get_engine(name)` imports the modules in KNOWN_ENGINE_MODULES on
first use, by name, so importing the runner imports neither an engine nor Flower.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["EngineSpec", "register_engine", "get_engine", "available_engines", "build_engine",
           "KNOWN_ENGINE_MODULES"]

KNOWN_ENGINE_MODULES = ("python_api.engine.inprocess", "python_api.engine.flower")


@dataclass
class EngineSpec:
    name: str
    transport: Optional[Callable] = None   # (method, progress=bool) -> Transport
    run: Optional[Callable] = None         # (method_name, cfg, out_dir=, resume=, engine=, verbose=) -> RunResult
    prefix: bool = False
    description: str = ""

    def __post_init__(self):
        if (self.transport is None) == (self.run is None):
            raise ValueError(f"engine {self.name!r}: give exactly one of transport= or run=")


_REGISTRY: dict = {}
_loaded = False


def register_engine(spec: EngineSpec) -> EngineSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _lookup(name: str) -> Optional[EngineSpec]:
    if name in _REGISTRY and not _REGISTRY[name].prefix:
        return _REGISTRY[name]
    for spec in _REGISTRY.values():
        if spec.prefix and name.startswith(spec.name):
            return spec
    return None


def _load_known() -> None:
    global _loaded
    if not _loaded:
        for module in KNOWN_ENGINE_MODULES:
            importlib.import_module(module)
        _loaded = True


def get_engine(name: str) -> EngineSpec:
    if not isinstance(name, str):
        raise TypeError(f"engine: expected a name, got {type(name).__name__}")
    spec = _lookup(name)
    if spec is None:
        _load_known()
        spec = _lookup(name)
    if spec is None:
        raise ValueError(f"engine: unknown engine {name!r}; available: {', '.join(available_engines())}")
    return spec


def available_engines() -> list:
    _load_known()
    return sorted(s.name + ("-*" if s.prefix else "") for s in _REGISTRY.values())


def build_engine(name, method, progress: bool = True):
    """The transport for `method`: a registered engine name, or a factory (the Flower ServerApp passes
    its grid-bound transport this way)."""
    if callable(name):
        return name(method, progress=progress)
    spec = get_engine(name)
    if spec.transport is None:
        raise ValueError(f"engine: {name!r} runs the whole training itself (run_training(engine={name!r})), "
                         "it has no transport to build here")
    return spec.transport(method, progress=progress)
