"""Engine control messages to one SuperNode, apart from the method's messages: hello (discovery),
clients' state for checkpoints, and the GLFC proxy's work (proxy.py). transport.py and proxy.py both
build on this module, so neither imports the other's callers."""
from __future__ import annotations

import logging
import time

from python_api.engine.flower import codec
from python_api.engine.flower.protocol import ENGINE_TYPES, PAYLOAD

__all__ = ["isolate_library_rng", "send_control", "discover_nodes", "config_text"]

log = logging.getLogger("fcl_ext.flower")

# how often discovery asks the grid for newly registered nodes while it waits
DISCOVERY_POLL_S = 0.2
# one hello's wait: the first message to a node may wait for its process to start (Ray actor, imports,
# the method's data); a hello that is not answered in this time is sent again until node_wait_s is spent
HELLO_TIMEOUT_S = 60.0
# discovery's bound in simulation, where the virtual nodes always come (deployment: FlowerOptions' 120 s)
SIMULATION_NODE_WAIT_S = 900.0


def isolate_library_rng() -> None:
    """Give Flower's and Ray's modules their own `random.Random`: their heartbeats and retry back-offs
    would otherwise draw from the global stream the method's client sampling uses (and break equality
    with the in-process engine at random moments)."""
    import random
    import sys
    private = random.Random(0x5EED)
    # dict.copy() is one C call under the GIL; iterating sys.modules itself races with imports in
    # Flower's and Ray's threads ("dictionary changed size during iteration")
    for name, module in sys.modules.copy().items():
        if name.split(".")[0] in ("flwr", "ray", "grpc") and getattr(module, "random", None) is random:
            module.random = private


def send_control(grid, node_id: int, kind: str, tree, timeout=None, device=None):
    """One engine control message (hello, state, load_state, proxy) to one node; raises on failure."""
    content = codec.to_record_dict(tree, {"kind": kind}, PAYLOAD)
    message = grid.create_message(content, ENGINE_TYPES[kind.strip("_")], node_id, "control")
    replies = list(grid.send_and_receive([message], timeout=timeout))
    if not replies or replies[0].has_error():
        reason = replies[0].error.reason if replies else "no reply"
        raise RuntimeError(f"flower: node {node_id} failed {kind}: {reason}")
    return codec.from_record_dict(replies[0].content, PAYLOAD, device)[0]


def _describe(info: dict, failed: dict, options) -> str:
    answered = [f"node {n} (partition {i['partition_id']}, {'proxy' if options.is_proxy(i) else 'client'})"
                for n, i in sorted(info.items())]
    text = "answered: " + (", ".join(answered) or "none")
    if failed:
        text += "; failed hello: " + ", ".join(f"node {n} ({reason})" for n, reason in sorted(failed.items()))
    return text


def discover_nodes(grid, method_name: str, config_yaml: str, options) -> dict:
    """node id -> hello reply (partition_id, num_partitions, role, pid) for every node, once the nodes the
    run needs answered: options.min_nodes client nodes and, with options.proxy == "node", the proxy node.
    Nodes register with the SuperLink one by one (on a busy machine, seconds apart), so this waits for
    them up to options.node_wait_s and then fails saying which answered. A node whose hello failed is
    asked again on the next pass. The hello hands each node the run's method name and resolved config,
    which it keeps in Context.state."""
    isolate_library_rng()
    deadline = time.monotonic() + options.node_wait_s
    hello = {"method": method_name, "config": config_yaml}
    need_proxy = options.proxy == "node"
    info: dict = {}
    failed: dict = {}
    while True:
        for node_id in sorted(grid.get_node_ids()):
            if node_id in info:
                continue
            try:
                info[node_id] = send_control(grid, node_id, "__hello", hello,
                                             timeout=max(1.0, min(HELLO_TIMEOUT_S, deadline - time.monotonic())))
                failed.pop(node_id, None)
            except RuntimeError as exc:
                failed[node_id] = str(exc)
        clients = [n for n, i in info.items() if not options.is_proxy(i)]
        has_proxy = any(options.is_proxy(i) for i in info.values())
        if len(clients) >= options.min_nodes and (has_proxy or not need_proxy):
            return info
        if time.monotonic() > deadline:
            wanted = f"{options.min_nodes} client nodes" + (" and a role=proxy node" if need_proxy else "")
            raise TimeoutError(f"flower: waited {options.node_wait_s:.0f} s for {wanted}; {len(clients)} client "
                               f"node(s){' and the proxy node' if has_proxy else ''} answered. "
                               + _describe(info, failed, options))
        time.sleep(DISCOVERY_POLL_S)


def config_text(cfg) -> str:
    import yaml
    from python_api.config import to_dict
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
