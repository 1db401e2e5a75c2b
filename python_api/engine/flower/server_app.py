"""The ServerApp: Flower's `main(grid, context)` runs the shared training loop
(python_api/engine/runner.py: run directory, rounds, metrics, checkpoints, plots) with a
FlowerTransport in place of the in-process engine, so the method's server side (GLFCServer with its
proxy, FCCLServer) runs here unchanged and its clients run on the SuperNodes.

Deployment (`flwr run`): the run is described by the app's run config
(python_api/engine/flower/app/pyproject.toml, `--run-config "key=value ..."`):
    method       glfc | fccl
    config       preset name or YAML path (as `fcl-ext train --config`)
    overrides    dotted overrides, space separated ("federated.num_tasks=2 run.seed=1")
    out          run directory on the SuperLink machine ("" = runs/<method>-<timestamp>)
    resume       continue the run in `out`
    rng, min-nodes, node-wait-s, reply-timeout-s, proxy    FlowerOptions (transport.py)
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

from python_api.engine.flower.transport import FlowerOptions, FlowerTransport

__all__ = ["build_server_app", "options_from_run_config", "app"]


def options_from_run_config(run_config) -> FlowerOptions:
    get = run_config.get
    return FlowerOptions(rng=str(get("rng", "sequential")), min_nodes=int(get("min-nodes", 1)),
                         node_wait_s=float(get("node-wait-s", 120.0)),
                         reply_timeout_s=float(get("reply-timeout-s", 3600.0)) or None,
                         proxy=str(get("proxy", "server")))


def train_on_grid(grid, method_name: str, cfg, out_dir=None, resume: bool = False,
                  options: Optional[FlowerOptions] = None, verbose: bool = True):
    """run_training with this grid as the transport; the transport's misses go to flower_misses.json."""
    from python_api.engine.flower.control import config_text, discover_nodes
    from python_api.engine.runner import run_training
    options = options or FlowerOptions()
    if resume:   # the nodes must get the config the runner will use: the saved one (runner.run_training)
        from python_api.config import load_config
        from python_api.methods import get_method
        if out_dir is None:
            raise ValueError("resume needs the run directory (out)")
        saved = load_config(get_method(method_name).config_cls, Path(out_dir) / "config.yaml")
        if cfg is not None:
            saved.run.max_rounds, saved.run.progress = cfg.run.max_rounds, cfg.run.progress
        cfg = saved
    # Meet the nodes before the run seeds its RNGs: the runtime's own start-up (Ray, gRPC) may still
    # draw from Python's global `random` until the first reply came back.
    discovered = discover_nodes(grid, method_name, config_text(cfg), options)
    made: list = []

    def engine_factory(method, progress=True):
        transport = FlowerTransport(grid, method, method_name, cfg, progress=progress, options=options)
        transport.connect(discovered)
        made.append(transport)
        return transport

    result = run_training(method_name, cfg, out_dir=out_dir, resume=resume, engine=engine_factory, verbose=verbose)
    if made:
        transport = made[0]
        (Path(result.run_dir) / "flower.json").write_text(json.dumps(
            {"options": transport.options.as_dict(), "messages_sent": transport.messages_sent,
             "nodes": {str(n): transport.node_info[n] for n in (transport.nodes or [])},
             "proxy_node": None if transport.proxy_node is None else transport.node_info[transport.proxy_node],
             "misses": [{**m, "cid": repr(m["cid"])} for m in transport.misses]}, indent=1))
        result.summary["flower_misses"] = len(transport.misses)
    return result


def build_server_app(method_name: Optional[str] = None, cfg=None, out_dir=None, resume: bool = False,
                     options: Optional[FlowerOptions] = None, results: Optional[list] = None, verbose: bool = True):
    """A ServerApp. With `cfg` given (simulation from Python) it trains that config; without, it reads
    method/config/overrides/out/resume from the run config (deployment via `flwr run`)."""
    from flwr.serverapp import ServerApp
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            run(grid, context)
        except Exception as exc:   # the caller (simulation) re-raises it: the runtime would only log it
            if results is not None:
                results.append(exc)
            raise

    def run(grid, context) -> None:
        if cfg is not None:
            result = train_on_grid(grid, method_name, cfg, out_dir, resume, options, verbose)
        else:
            from python_api.config import load_config
            from python_api.methods import get_method
            rc = context.run_config
            name = str(rc.get("method", "glfc"))
            spec = get_method(name)
            run_cfg = load_config(spec.config_cls, str(rc.get("config", "")) or None,
                                  shlex.split(str(rc.get("overrides", ""))))
            result = train_on_grid(grid, name, run_cfg, str(rc.get("out", "")) or None, bool(rc.get("resume", False)),
                                   options_from_run_config(rc), verbose)
            print(f"[flower] run directory: {result.run_dir}")
            if result.summary.get("report"):
                print(result.summary["report"])
        if results is not None:
            results.append(result)

    return server_app


def __getattr__(name):
    if name == "app":
        globals()["app"] = build_server_app()
        return globals()["app"]
    raise AttributeError(name)
