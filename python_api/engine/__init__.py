"""Engines move messages between a method's server side and its clients.

`InProcessEngine` (default) runs everything in one process; the Flower engine (engine/flower/) runs the
same method objects on Flower's runtimes. Engines register by name in engine/registry.py;
`build_engine(name, method)` picks one. The message vocabulary is python_api/messages.py.
"""
from python_api.engine.inprocess import InProcessEngine
from python_api.engine.registry import available_engines, build_engine, get_engine, register_engine
from python_api.messages import FederatedClient, FederatedMethod, Message, Transport

__all__ = ["Message", "Transport", "FederatedClient", "FederatedMethod", "InProcessEngine", "build_engine",
           "get_engine", "register_engine", "available_engines"]
