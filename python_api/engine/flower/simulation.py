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
    start_ray(backend_config["init_args"])
    try:
        run_simulation(server_app=server_app, client_app=client_app or build_client_app(),
                       num_supernodes=num_supernodes, backend_config=backend_config, verbose_logging=False)
    except RuntimeError as exc:   # Flower reports a failed ServerApp as its own generic error
        if results and isinstance(results[0], BaseException):
            raise results[0] from exc
        raise
    if not results:
        raise RuntimeError("flower-sim: the ServerApp ended without a result (see the log above)")
    if isinstance(results[0], BaseException):   # e.g. NonFiniteError: the caller sees the run's own error
        raise results[0]
    return results[0]


RAY_START_ATTEMPTS = 3


def start_ray(init_args: dict, attempts: int = RAY_START_ATTEMPTS) -> None:
    """Start Ray as Flower's Ray backend would (same arguments; Flower then uses it and shuts it down),
    but try again when its node does not register in time: Ray waits a fixed 30 s for that, which a
    busy machine can exceed ("The current node timed out during startup")."""
    import ray
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath          # as Flower's backend does: workers import this tree
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            print(f"[flower] Ray did not start ({exc}); trying again ({attempt + 1}/{attempts})")
            ray.shutdown()
