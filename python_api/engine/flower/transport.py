"""FlowerTransport: the engine Transport (`send(messages) -> replies`) over a Flower Grid.

The method's server side runs unchanged in the ServerApp process (the runner calls
`method.run_round(r, transport)`); this object turns each engine Message into a Flower Message for the
SuperNode hosting its client and the replies back.

rng="sequential" (default): requests go one at a time; each carries this process's RNG state and the
reply's state becomes this process's state, so the run consumes a single RNG stream exactly as the
in-process engine does (same seed -> same metrics). rng="independent": all requests of a `send` go at
once (clients run in parallel on their nodes), each with its own seed; results are reproducible for a
fixed node layout but differ from the in-process engine.

A request whose reply is an error (the ClientApp raised) or missing (reply_timeout_s passed) is logged,
recorded in `misses`, and left out: the method sees the replies that came back (reply.src says whose).
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Hashable, Optional, Sequence

import torch

from python_api.checkpoint import capture_rng_state, restore_rng_state
from python_api.engine.flower import codec
from python_api.engine.flower.control import config_text, discover_nodes, isolate_library_rng, send_control
from python_api.engine.flower.protocol import PAYLOAD, encode_cid, flower_type
from python_api.messages import Message as EngineMessage

__all__ = ["FlowerTransport", "FlowerOptions", "isolate_library_rng", "discover_nodes", "send_control", "config_text"]

log = logging.getLogger("fcl_ext.flower")


class FlowerOptions:
    """Engine settings (not part of the method config: they do not change results in sequential mode).

    rng               "sequential" | "independent" (see the module docstring)
    min_nodes         client nodes to wait for before the first round
    node_wait_s       how long to wait for them
    reply_timeout_s   per request (sequential) or per send (independent); None = no limit
    proxy             "server": the GLFC proxy runs in the ServerApp process, so whoever runs the
                      ServerApp sees the clients' prototype gradients (as the paper's proxy server does);
                      "node": its work runs on the SuperNode with node_config role=proxy (proxy.py; the
                      gradients still pass through the ServerApp: Flower's topology is a star)
    proxy_partition   also treat the node with this partition-id as the proxy node (simulation)
    """

    def __init__(self, rng: str = "sequential", min_nodes: int = 1, node_wait_s: float = 120.0,
                 reply_timeout_s: Optional[float] = 3600.0, proxy: str = "server",
                 proxy_partition: Optional[int] = None):
        if rng not in ("sequential", "independent"):
            raise ValueError(f"flower rng: {rng!r} is not 'sequential' or 'independent'")
        if proxy not in ("server", "node"):
            raise ValueError(f"flower proxy: {proxy!r} is not 'server' or 'node'")
        self.rng, self.min_nodes, self.node_wait_s = rng, int(min_nodes), float(node_wait_s)
        self.reply_timeout_s = None if reply_timeout_s in (None, 0, "") else float(reply_timeout_s)
        self.proxy = proxy
        self.proxy_partition = None if proxy_partition is None else int(proxy_partition)

    def is_proxy(self, info: dict) -> bool:
        return info["role"] == "proxy" or (self.proxy_partition is not None
                                           and info["partition_id"] == self.proxy_partition)

    def as_dict(self) -> dict:
        return dict(rng=self.rng, min_nodes=self.min_nodes, node_wait_s=self.node_wait_s,
                    reply_timeout_s=self.reply_timeout_s, proxy=self.proxy, proxy_partition=self.proxy_partition)


class FlowerTransport:
    name = "flower"

    def __init__(self, grid, method, method_name: str, cfg, progress: bool = True,
                 options: Optional[FlowerOptions] = None):
        self.grid, self.method, self.method_name, self.cfg = grid, method, method_name, cfg
        self.progress = progress
        self.options = options or FlowerOptions()
        self.config_yaml = config_text(cfg)
        self.device = getattr(method, "device", None)
        self.nodes: Optional[list] = None          # client node ids, ordered by partition-id
        self.node_info: dict = {}                  # node id -> hello reply
        self.proxy_node: Optional[int] = None      # the role=proxy node when options.proxy == "node"
        self.known_cids: list = []
        self.misses: list = []                     # {"kind", "cid", "node", "reason"} per lost reply
        self.messages_sent = 0
        self.audit = False
        self.messages_carried: list = []
        isolate_library_rng()

    # ---------------------------------------------------------------- nodes
    def _send_control(self, node_id: int, kind: str, tree, timeout=None):
        return send_control(self.grid, node_id, kind, tree, timeout, self.device)

    def connect(self, discovered: Optional[dict] = None) -> None:
        """Wait for min_nodes client nodes, say hello (the run's config) and learn their partition ids.
        The RNG state is put back afterwards: nothing here may shift the method's stream."""
        if self.nodes is not None:
            return
        isolate_library_rng()
        rng = capture_rng_state()
        self.node_info = discovered if discovered is not None else discover_nodes(
            self.grid, self.method_name, self.config_yaml, self.options)
        restore_rng_state(rng)
        self.nodes = sorted([n for n, i in self.node_info.items() if not self.options.is_proxy(i)],
                            key=lambda n: (self.node_info[n]["partition_id"], n))
        proxies = [n for n, i in self.node_info.items() if self.options.is_proxy(i)]
        if self.options.proxy == "node":
            if not proxies:
                raise RuntimeError("flower proxy=node: no SuperNode with node_config role=proxy answered; "
                                   f"nodes that answered: {sorted(self.node_info)}")
            self.proxy_node = proxies[0]
            from python_api.engine.flower.proxy import attach_remote_proxy
            attach_remote_proxy(self.method, self)
        log.info("flower: %d client nodes %s", len(self.nodes),
                 [(self.node_info[n]["partition_id"], n) for n in self.nodes])

    def node_for(self, cid: Hashable) -> int:
        self.connect()
        if isinstance(cid, int):
            index = cid
        else:
            index = int(hashlib.sha256(encode_cid(cid).encode()).hexdigest(), 16)
        return self.nodes[index % len(self.nodes)]

    # ---------------------------------------------------------------- messages
    def _request(self, message: EngineMessage, rng=None, seed=None):
        tree = {"payload": message.payload, "rng": rng}
        meta = {"kind": message.kind, "cid": encode_cid(message.dst)}
        if seed is not None:
            meta["seed"] = int(seed)
        node = self.node_for(message.dst)
        self.messages_sent += 1
        content = codec.to_record_dict(tree, meta, PAYLOAD)
        return self.grid.create_message(content, flower_type(message.kind), node, str(self.messages_sent)), node

    def _miss(self, message: EngineMessage, node: int, reason: str) -> None:
        miss = {"kind": message.kind, "cid": message.dst, "node": node, "reason": reason}
        self.misses.append(miss)
        log.warning("flower: no reply from client %r (node %s) for %r: %s; going on without it",
                    message.dst, node, message.kind, reason)
        print(f"[flower] missed reply: client {message.dst!r} (node {node}), {message.kind!r}: {reason}")

    def _decode_reply(self, request: EngineMessage, reply) -> tuple:
        tree, meta = codec.from_record_dict(reply.content, PAYLOAD, self.device)
        out = EngineMessage(meta["kind"], tree["payload"], src=request.dst)
        if self.audit:
            self.messages_carried.append(("request", request.kind, request.dst, request.payload))
            self.messages_carried.append(("reply", out.kind, out.src, out.payload))
        return out, tree.get("rng")

    def send(self, messages: Sequence[EngineMessage], desc: str = "") -> list:
        isolate_library_rng()   # Flower imports some modules lazily
        self.connect()
        for m in messages:
            if m.dst not in self.known_cids:
                self.known_cids.append(m.dst)
        if self.options.rng == "independent" or self._streams():
            return self._send_parallel(messages)
        iterator = messages
        if self.progress and len(messages) > 1:
            from tqdm.auto import tqdm
            iterator = tqdm(messages, desc=desc or "clients", leave=False, unit="client", dynamic_ncols=True)
        replies = []
        for message in iterator:
            request, node = self._request(message, rng=capture_rng_state())
            answer = list(self.grid.send_and_receive([request], timeout=self.options.reply_timeout_s))
            if not answer:
                self._miss(message, node, f"no reply within {self.options.reply_timeout_s} s")
                continue
            if answer[0].has_error():
                self._miss(message, node, answer[0].error.reason)
                continue
            reply, rng = self._decode_reply(message, answer[0])
            restore_rng_state(rng)
            replies.append(reply)
        return replies

    def _streams(self) -> bool:
        return getattr(getattr(self.cfg, "run", None), "client_rng", "sequential") == "streams"

    def _send_parallel(self, messages: Sequence[EngineMessage]) -> list:
        if self._streams():   # run.client_rng=streams: the in-process engine's (seed, round, client, kind) seeds
            from python_api.engine.inprocess import stream_seed
            seeds = [stream_seed(self.cfg.run.seed, m.payload.get("round") if isinstance(m.payload, dict) else None,
                                 m.dst, m.kind) % 2**32 for m in messages]
        else:   # one seed per request from this process's stream: reproducible, independent per client
            seeds = torch.randint(0, 2**62, (len(messages),)).tolist()
        requests = [self._request(m, seed=s) for m, s in zip(messages, seeds)]
        ids = list(self.grid.push_messages([r for r, _ in requests]))
        deadline = None if self.options.reply_timeout_s is None else time.monotonic() + self.options.reply_timeout_s
        got: dict = {}
        while len(got) < len(ids) and (deadline is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages([i for i in ids if i not in got]):
                got[reply.metadata.reply_to_message_id] = reply
            if len(got) < len(ids):
                time.sleep(0.1)
        replies = []
        for message, (_, node), message_id in zip(messages, requests, ids):
            answer = got.get(message_id)
            if answer is None:
                self._miss(message, node, f"no reply within {self.options.reply_timeout_s} s")
            elif answer.has_error():
                self._miss(message, node, answer.error.reason)
            else:
                replies.append(self._decode_reply(message, answer)[0])
        return replies

    # ---------------------------------------------------------------- checkpointing: clients live on the nodes
    def _by_node(self, cids) -> dict:
        groups: dict = {}
        for cid in cids:
            groups.setdefault(self.node_for(cid), []).append(cid)
        return groups

    def state_dict(self) -> dict:
        """Every client's state, fetched from its node: the same layout as InProcessEngine's, so a
        checkpoint resumes on either engine."""
        self.connect()
        clients: dict = {}
        for node, cids in self._by_node(self.known_cids).items():
            clients.update(self._send_control(node, "__state", {"cids": cids},
                                              timeout=self.options.reply_timeout_s)["clients"])
        return {"clients": {cid: clients[cid] for cid in self.known_cids}}

    def load_state_dict(self, state: dict) -> None:
        self.connect()
        clients = state.get("clients", {})
        self.known_cids = list(clients)
        for node, cids in self._by_node(self.known_cids).items():
            self._send_control(node, "__load_state", {"clients": {cid: clients[cid] for cid in cids}},
                               timeout=self.options.reply_timeout_s)
