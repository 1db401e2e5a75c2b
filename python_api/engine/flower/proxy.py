"""Optional: the GLFC proxy server's work on a dedicated SuperNode (FlowerOptions.proxy = "node").

The node is the one started with node_config `role=proxy` (in simulation: the extra virtual node the
engine adds). `RemoteProxy` takes the place of `GLFCServer.proxy` in the ServerApp: each round it sends
the aggregated model, the prototype-gradient pool and the proxy's state to that node, whose own
`ProxyServer` does label recovery, reconstruction and the monitor-set selection, and sends back the
new state and the round's metrics. The node keeps nothing between rounds (every message carries the
state), so it works with one ClientApp process per message.

What this changes: the reconstruction runs on that machine (e.g. the one with a GPU). What it does not
change: Flower's topology is a star, so the prototype gradients still pass through the SuperLink and
the ServerApp on their way (docs/flower.md).

Snapshots of old models travel as stubs ({"id", "num_classes", "state": {}}): the node only shifts them
and makes the new one from the aggregated model it received; the ServerApp keeps the real weights.
"""
from __future__ import annotations

from python_api.checkpoint import capture_rng_state, restore_rng_state
from python_api.engine.flower.control import send_control

__all__ = ["RemoteProxy", "attach_remote_proxy", "handle_proxy"]


def _stub(snapshot):
    return None if snapshot is None else {"id": snapshot["id"], "num_classes": snapshot["num_classes"], "state": {}}


class RemoteProxy:
    """Stands in for ProxyServer in the ServerApp process; the same state_dict format (checkpoints and
    resume work either way)."""

    def __init__(self, local, transport):
        self.transport = transport
        self.state = local.state_dict()          # ProxyServer format, real snapshots
        self.snapshots = {s["id"]: s for s in (self.state["best_model_1"], self.state["best_model_2"]) if s}

    @property
    def gallery(self):
        return self.state.get("gallery")

    def model_back(self) -> list:
        return [self.state["best_model_1"], self.state["best_model_2"]]

    def process(self, global_state: dict, num_classes: int, pool, audit=None) -> dict:
        stubbed = {**self.state, "best_model_1": _stub(self.state["best_model_1"]),
                   "best_model_2": _stub(self.state["best_model_2"])}
        sequential = self.transport.options.rng == "sequential"
        tree = {"global_state": global_state, "num_classes": num_classes, "pool": pool, "audit": audit,
                "state": stubbed, "rng": capture_rng_state() if sequential else None,
                "seed": None if sequential else int(self.transport.messages_sent) + 1}
        self.transport.messages_sent += 1
        try:
            reply = send_control(self.transport.grid, self.transport.proxy_node, "__proxy", tree,
                                 self.transport.options.reply_timeout_s, self.transport.device)
        except RuntimeError as exc:   # no proxy output: this round cannot finish as the method defines it
            raise RuntimeError(f"flower proxy=node: the GLFC proxy's work failed on the role=proxy node "
                               f"{self.transport.proxy_node} ({exc}); the run stops here, its last checkpoint "
                               "is kept (resume, e.g. with proxy=server)") from exc
        if reply["rng"] is not None:
            restore_rng_state(reply["rng"])
        new = reply["state"]
        for key in ("best_model_1", "best_model_2"):
            stub = new[key]
            if stub is None:
                continue
            if stub["id"] not in self.snapshots:   # made this round from the model we sent
                self.snapshots[stub["id"]] = {"id": stub["id"], "num_classes": stub["num_classes"],
                                              "state": {k: v.detach().clone() for k, v in global_state.items()}}
            new[key] = self.snapshots[stub["id"]]
        live = {s["id"] for s in (new["best_model_1"], new["best_model_2"]) if s}
        self.snapshots = {i: s for i, s in self.snapshots.items() if i in live}
        self.state = new
        return reply["info"]

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)
        self.snapshots = {s["id"]: s for s in (state["best_model_1"], state["best_model_2"]) if s}


def attach_remote_proxy(method, transport) -> None:
    if not hasattr(method, "proxy"):
        raise RuntimeError("flower proxy=node: this method has no proxy server (GLFC only)")
    method.proxy = RemoteProxy(method.proxy, transport)


def handle_proxy(runtime, tree) -> dict:
    """On the proxy node: one round of ProxyServer.process with the state the ServerApp sent."""
    import random

    import numpy as np
    import torch
    from python_api.methods.glfc.proxy import ProxyServer
    proxy = ProxyServer(runtime.method.ctx)
    proxy.load_state_dict(tree["state"])
    if tree["rng"] is not None:
        restore_rng_state(tree["rng"])
    else:
        random.seed(tree["seed"]), np.random.seed(tree["seed"] % 2**32), torch.manual_seed(tree["seed"])
    info = proxy.process(tree["global_state"], tree["num_classes"], tree["pool"], tree["audit"])
    state = proxy.state_dict()
    state["best_model_1"], state["best_model_2"] = _stub(state["best_model_1"]), _stub(state["best_model_2"])
    return {"info": info, "state": state, "rng": capture_rng_state() if tree["rng"] is not None else None}
