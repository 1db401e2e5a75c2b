"""InProcessEngine: every client lives in this process; `send` calls them one after another.

Deterministic for a given seed (sequential, in request order). Clients are created on first contact
by the method's `make_client` and kept, so their local state (memory, old models) persists.
"""
from __future__ import annotations

from typing import Hashable, Sequence

from python_api.engine.registry import EngineSpec, register_engine
from python_api.messages import Message

__all__ = ["InProcessEngine"]


class InProcessEngine:
    name = "inprocess"

    def __init__(self, method, progress: bool = True):
        self.method = method
        self.progress = progress
        self.clients: dict = {}
        self.messages_carried: list = []   # (kind, dst, payload keys) of every request, for audits
        self.audit = False

    def client(self, cid: Hashable):
        if cid not in self.clients:
            self.clients[cid] = self.method.make_client(cid)
        return self.clients[cid]

    def send(self, messages: Sequence[Message], desc: str = "") -> list:
        iterator = messages
        if self.progress and len(messages) > 1:
            from tqdm.auto import tqdm
            iterator = tqdm(messages, desc=desc or "clients", leave=False, unit="client", dynamic_ncols=True)
        replies = []
        for message in iterator:
            if self.audit:
                self.messages_carried.append(("request", message.kind, message.dst, message.payload))
            reply = self.client(message.dst).handle(message)
            reply.src = message.dst
            if self.audit:
                self.messages_carried.append(("reply", reply.kind, reply.src, reply.payload))
            replies.append(reply)
        return replies

    # checkpointing: the clients' local state
    def state_dict(self) -> dict:
        return {"clients": {cid: c.state_dict() for cid, c in self.clients.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.clients = {}
        for cid, client_state in state.get("clients", {}).items():
            self.client(cid).load_state_dict(client_state)


register_engine(EngineSpec(name="inprocess", transport=InProcessEngine,
                           description="every client in this process, one after another (default)"))
