"""Engines move messages between a method's server side and its clients.

`InProcessEngine` (default) runs everything in one process. `build_engine(name, method)` picks one.
"""
from python_api.engine.base import FederatedClient, FederatedMethod, Message, Transport
from python_api.engine.inprocess import InProcessEngine

ENGINES = {"inprocess": InProcessEngine}


def build_engine(name, method, progress: bool = True):
    if callable(name):  # an engine factory (the Flower ServerApp passes its grid-bound transport this way)
        return name(method, progress=progress)
    if name not in ENGINES:
        raise ValueError(f"engine: unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](method, progress=progress)


__all__ = ["Message", "Transport", "FederatedClient", "FederatedMethod", "InProcessEngine", "build_engine",
           "ENGINES"]
