"""Flower engine: the same method objects and config on Flower's simulation and deployment runtimes.

    fcl-ext train glfc --config glfc-demo --engine flower-sim        # simulation (virtual SuperNodes)
    flwr run python_api/engine/flower/app <federation> --run-config "method='glfc' config='glfc-demo'"

server_app.py   ServerApp: the shared training loop with a FlowerTransport (the method's server side,
                and by default the GLFC proxy, run in the ServerApp process)
client_app.py   ClientApp: hosts clients by node_config partition-id, state in Context.state
transport.py    engine Message <-> Flower Message, RNG threading, missed replies
control.py      engine control messages to one node (hello/discovery, state, proxy work)
codec.py        payload trees <-> ArrayRecord + ConfigRecord (no pickle)
proxy.py        optional: the GLFC proxy on a SuperNode with node_config role=proxy
See docs/flower.md. Importing this package does not import flwr; the in-process engine never does.
The package registers the "flower-*" engine names (python_api/engine/registry.py) when imported.
"""
from __future__ import annotations

from python_api.engine.registry import EngineSpec, register_engine

__all__ = ["FLOWER_ENGINES", "run_with_flower", "flower_available"]

FLOWER_ENGINES = ("flower-sim",)


def flower_available() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


def run_with_flower(method_name: str, cfg, out_dir=None, resume: bool = False, engine: str = "flower-sim",
                    verbose: bool = True, **options):
    """runner.run_training for engine names starting with "flower"."""
    from python_api.config import ConfigError
    if not flower_available():
        raise ConfigError(f"--engine {engine}: Flower is not installed; pip install '.[flower]'")
    if engine != "flower-sim":
        raise ConfigError(f"--engine {engine}: unknown; use flower-sim here, or `flwr run "
                          "python_api/engine/flower/app` against a SuperLink (docs/flower.md)")
    import os
    from pathlib import Path
    if cfg is None:   # resume from Python with the saved config
        from python_api.config import load_config
        from python_api.methods import get_method
        if not (resume and out_dir is not None):
            raise ConfigError("run_training(engine='flower-sim'): give a config (or resume=True with out_dir)")
        cfg = load_config(get_method(method_name).config_cls, Path(out_dir) / "config.yaml")
    from python_api.engine.flower.simulation import run_simulation_training
    from python_api.engine.flower.transport import FlowerOptions
    nodes = int(options.pop("num_supernodes", os.environ.get("FCL_FLOWER_NODES", 3)))
    actors = int(options.pop("actors", 1))
    client_app = options.pop("client_app", None)
    # Virtual nodes always come, but on a busy machine starting their processes takes minutes: wait long.
    from python_api.engine.flower.control import SIMULATION_NODE_WAIT_S
    options.setdefault("node_wait_s", SIMULATION_NODE_WAIT_S)
    if options.get("proxy") == "node":   # one more virtual node, the last partition, runs the GLFC proxy
        options.setdefault("proxy_partition", nodes)
        nodes += 1
        options.setdefault("min_nodes", nodes - 1)
    flower_options = FlowerOptions(min_nodes=options.pop("min_nodes", nodes), **options)
    return run_simulation_training(method_name, cfg, out_dir, resume, num_supernodes=nodes, actors=actors,
                                   options=flower_options, client_app=client_app, verbose=verbose)


register_engine(EngineSpec(name="flower", run=run_with_flower, prefix=True,
                           description="Flower runtimes: flower-sim (simulation); deployment via `flwr run`"))
