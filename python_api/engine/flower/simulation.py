"""`--engine flower-sim`: the same run on Flower's simulation runtime (virtual SuperNodes, Ray actors).

    result = run_simulation_training("glfc", cfg, out_dir, num_supernodes=3)

The ServerApp thread runs the shared training loop; virtual SuperNodes (node_config partition-id
0..N-1) host the clients. One Ray actor by default: in sequential RNG mode only one client runs at a
time anyway, and one actor keeps the clients live between messages.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from python_api.engine.flower.control import SIMULATION_NODE_WAIT_S
from python_api.engine.flower.transport import FlowerOptions

__all__ = ["run_simulation_training"]


def run_simulation_training(method_name: str, cfg, out_dir=None, resume: bool = False, *,
                            num_supernodes: int = 3, actors: int = 1, options: Optional[FlowerOptions] = None,
                            client_app=None, verbose: bool = True):
    from flwr.simulation import run_simulation
    from python_api.engine.flower.client_app import build_client_app
    from python_api.engine.flower.server_app import build_server_app
    options = options or FlowerOptions(min_nodes=num_supernodes, node_wait_s=SIMULATION_NODE_WAIT_S)
    results: list = []
    server_app = build_server_app(method_name, cfg, out_dir, resume, options, results, verbose)
    # Ray workers import python_api from the same tree as this process.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if root not in sys.path:
        sys.path.insert(0, root)
    threads = max(1, int(getattr(cfg.run, "threads", 0)) or 1)
    backend_config = {"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
                      "init_args": {"num_cpus": threads * max(1, actors), "num_gpus": 0,
                                    "include_dashboard": False, "log_to_driver": verbose}}
    run_simulation(server_app=server_app, client_app=client_app or build_client_app(),
                   num_supernodes=num_supernodes, backend_config=backend_config, verbose_logging=False)
    if not results:
        raise RuntimeError("flower-sim: the ServerApp ended without a result (see the log above)")
    if isinstance(results[0], BaseException):   # e.g. NonFiniteError: the caller sees the run's own error
        raise results[0]
    return results[0]
