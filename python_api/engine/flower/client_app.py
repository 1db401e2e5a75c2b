"""The ClientApp: a SuperNode hosts some of the method's clients and answers their messages.

Identity: the node's `partition-id` / `num-partitions` (node_config; set by the simulation runtime,
`--node-config "partition-id=0 num-partitions=2"` in deployment). The ServerApp asks every node for
them once (`query.fcl_hello`) and then sends client `cid` to the node with
partition-id == position % number of client nodes, so one node may host several clients (GLFC's
client population grows per task). Optional node_config keys: `role=proxy` (this node runs the GLFC
proxy, no clients), `data-root=PATH` and `device=NAME` (this machine's dataset folder and device).

State: every client's `state_dict()` lives in `Context.state` (records `fcl.client.<cid>.*`), written
after each message, so a fresh ClientApp process (deployment starts one per message) rebuilds the
client from it. A process that already holds the client (simulation actors, repeated messages) keeps
the live object and only checks it is current (message count). The method object itself (data,
shared models) is built once per process from the run's config, which the ServerApp sends in the
hello message and which is kept in `Context.state`.

RNG: in sequential mode a request carries the sender's RNG state (python, numpy, torch) and the reply
carries the state after the client ran, so the run consumes one RNG stream exactly as the in-process
engine does; in independent mode a request carries a seed.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
from typing import Callable, Optional

import numpy as np
import torch

from python_api.checkpoint import capture_rng_state, restore_rng_state
from python_api.engine.flower import codec
from python_api.engine.flower.control import isolate_library_rng
from python_api.engine.flower.protocol import (ENGINE_TYPES, GENERIC_TYPE, IN_MEMORY_KINDS, MESSAGE_TYPES, PAYLOAD,
                                               RUN_RECORD, config_digest, decode_cid, encode_cid)
from python_api.messages import Message as EngineMessage

__all__ = ["build_client_app", "app", "NodeRuntime"]

log = logging.getLogger("fcl_ext.flower")

# (run_id, config digest) -> NodeRuntime; lives as long as this process
_RUNTIMES: dict = {}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def node_overrides(node_config) -> list:
    out = []
    if node_config.get("data-root"):
        out.append(f"data.root={node_config['data-root']}")
    if node_config.get("device"):
        out.append(f"run.device={node_config['device']}")
    return out


class NodeRuntime:
    """The method object of this run in this process, and the live clients it made."""

    def __init__(self, method_name: str, config_yaml: str, node_config):
        import yaml
        from python_api.config import apply_overrides, from_dict
        from python_api.engine.runner import resolve_device
        from python_api.methods import get_method
        spec = get_method(method_name)
        data = yaml.safe_load(config_yaml)
        overrides = [o for o in node_overrides(node_config) if o.split("=")[0].split(".")[0] in data]
        cfg = from_dict(spec.config_cls, apply_overrides(spec.config_cls, data, overrides) if overrides else data)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        self.scratch = tempfile.mkdtemp(prefix="fcl-flower-node-")   # the method's run_dir; nodes write no results
        with torch.random.fork_rng(devices=[]):
            rng = capture_rng_state()
            self.method = spec.build(cfg, self.scratch, self.device)
            restore_rng_state(rng)
        self.clients: dict = {}          # (node_id, cid) -> [client, message count it has seen]

    # ---------------------------------------------------------------- client state in Context.state
    @staticmethod
    def _prefix(cid) -> str:
        return f"fcl.client.{encode_cid(cid)}"

    def client(self, context, cid):
        """The live client, rebuilt from Context.state (and replayed) when this process is behind."""
        prefix = self._prefix(cid)
        count = int(context.state[f"{prefix}.meta"]["count"]) if codec.has_records(context.state, prefix) else 0
        key = (context.node_id, cid)
        entry = self.clients.get(key)
        if entry is not None and entry[1] == count:
            return entry[0]
        client = self.method.make_client(cid)
        if count:
            state, _ = codec.from_record_dict(context.state, prefix, self.device)
            client.load_state_dict(state["state"])
            for step in state["replay"]:          # in-memory steps since the last durable state
                restore_rng_state(step["rng"])
                client.handle(EngineMessage(step["kind"], step["payload"], dst=cid))
        self.clients[key] = [client, count]
        return client

    def ensure_durable(self, context, cid, client) -> None:
        """Write the client's state if Context.state has none yet (before an in-memory step)."""
        prefix = self._prefix(cid)
        if not codec.has_records(context.state, prefix):
            count = self.clients[(context.node_id, cid)][1]
            codec.add_to_record_dict(context.state, {"state": client.state_dict(), "replay": []},
                                     {"count": count}, prefix)

    def persist(self, context, cid, client, kind: str, payload, rng_before) -> None:
        """After a message: the new state, or (in-memory kinds) the step appended to the replay log."""
        prefix = self._prefix(cid)
        entry = self.clients[(context.node_id, cid)]
        entry[1] += 1
        if kind in IN_MEMORY_KINDS:
            state, _ = codec.from_record_dict(context.state, prefix)
            state["replay"].append({"kind": kind, "payload": payload, "rng": rng_before})
        else:
            state = {"state": client.state_dict(), "replay": []}
        codec.add_to_record_dict(context.state, state, {"count": entry[1]}, prefix)


def _runtime(context, role: str = "clients") -> NodeRuntime:
    """This run's method object in this process; the proxy gets its own (its snapshot stubs must not
    meet the clients' snapshot cache when one simulation actor serves both)."""
    if RUN_RECORD not in context.state:
        raise RuntimeError("this node has not received the run's hello message (query.fcl_hello)")
    run = context.state[RUN_RECORD]
    key = (context.run_id, run["digest"], role)
    if key not in _RUNTIMES:
        for old in [k for k in _RUNTIMES if k[0] != context.run_id]:   # a finished run's objects
            del _RUNTIMES[old]
        _RUNTIMES[key] = NodeRuntime(run["method"], run["config"], context.node_config)
    return _RUNTIMES[key]


def _reply(message, tree, meta):
    from flwr.app import Message
    return Message(codec.to_record_dict(tree, meta, PAYLOAD), reply_to=message)


def handle_message(message, context):
    """One Flower message -> one reply. Shared by every registered message type."""
    from flwr.app import ConfigRecord
    meta = dict(message.content[f"{PAYLOAD}.meta"])
    kind = meta["kind"]
    if kind == "__hello":
        tree, _ = codec.from_record_dict(message.content, PAYLOAD)
        context.state[RUN_RECORD] = ConfigRecord({"method": tree["method"], "config": tree["config"],
                                                   "digest": config_digest(tree["config"])})
        nc = context.node_config
        return _reply(message, {"partition_id": int(nc.get("partition-id", -1)),
                                "num_partitions": int(nc.get("num-partitions", 0)),
                                "role": str(nc.get("role", "client")), "pid": os.getpid()}, {"kind": "__hello"})
    runtime = _runtime(context, role="proxy" if kind == "__proxy" else "clients")
    tree, meta = codec.from_record_dict(message.content, PAYLOAD, runtime.device)
    if kind == "__proxy":
        from python_api.engine.flower.proxy import handle_proxy
        isolate_library_rng()
        return _reply(message, handle_proxy(runtime, tree), {"kind": "__proxy"})
    if kind == "__state":
        return _reply(message, {"clients": {cid: runtime.client(context, cid).state_dict() for cid in tree["cids"]}},
                      {"kind": "__state"})
    if kind == "__load_state":
        for cid, state in tree["clients"].items():
            client = runtime.client(context, cid)
            client.load_state_dict(state)
            runtime.persist(context, cid, client, "__load_state", None, None)
        return _reply(message, {"loaded": len(tree["clients"])}, {"kind": "__load_state"})
    cid = decode_cid(meta["cid"])
    isolate_library_rng()
    client = runtime.client(context, cid)
    if tree.get("rng") is not None:
        restore_rng_state(tree["rng"])
    else:
        _seed_all(int(meta["seed"]))
    rng_before = None
    if kind in IN_MEMORY_KINDS:
        runtime.ensure_durable(context, cid, client)
        rng_before = capture_rng_state()
    try:
        reply = client.handle(EngineMessage(kind, tree["payload"], dst=cid))
    except BaseException:
        # Flower keeps the node's Context.state as it was; the live object may be half-updated, so the
        # next message rebuilds the client from Context.state.
        runtime.clients.pop((context.node_id, cid), None)
        raise
    rng_after = capture_rng_state() if tree.get("rng") is not None else None
    runtime.persist(context, cid, client, kind, tree["payload"], rng_before)
    return _reply(message, {"payload": reply.payload, "rng": rng_after}, {"kind": reply.kind})


def build_client_app(before_handle: Optional[Callable] = None):
    """A ClientApp routing every fcl message type to `handle_message`.

    before_handle(message, context) runs first (tests use it to make one node fail)."""
    from flwr.clientapp import ClientApp
    client_app = ClientApp()

    def entry(message, context):
        if before_handle is not None:
            before_handle(message, context)
        return handle_message(message, context)

    for flower_type in list(MESSAGE_TYPES.values()) + [GENERIC_TYPE] + list(ENGINE_TYPES.values()):
        category, _, action = flower_type.partition(".")
        register = getattr(client_app, category)
        register(action)(entry) if action else register()(entry)
    return client_app


def __getattr__(name):
    # `app` for Flower's "module:attribute" loading; built on first access so importing this module
    # (e.g. for NodeRuntime) does not need flwr.
    if name == "app":
        globals()["app"] = build_client_app()
        return globals()["app"]
    raise AttributeError(name)
