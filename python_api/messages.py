"""The vocabulary methods and engines share: messages, the transport, the method/client interfaces.

Methods and engines both import this module and nothing of each other (the engines find a method
through python_api.methods, the runner finds an engine through python_api.engine.registry).

A method is a server-side object (`FederatedMethod`) plus client objects (`FederatedClient`). The
method's `run_round` talks to clients only through a `Transport` the engine hands it:

    replies = transport.send([Message("train", payload, dst=cid) for cid in selected])

`InProcessEngine` calls `client.handle(message)` directly; a Flower engine would ship the same
messages over the network. Payloads hold tensors, numbers, strings, lists/dicts of those, and
nothing else (no modules, no callables), so any engine can serialise them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol, Sequence, runtime_checkable

__all__ = ["Message", "Transport", "FederatedClient", "FederatedMethod"]


@dataclass
class Message:
    """One payload between the server side and one client.

    kind:    what the receiver should do ("train", "refresh", ...), or the reply's kind.
    payload: tensors / numbers / strings / lists / dicts.
    dst:     the client id a request goes to (None on replies).
    src:     the client id a reply came from (set by the engine).
    """
    kind: str
    payload: dict = field(default_factory=dict)
    dst: Hashable = None
    src: Hashable = None


@runtime_checkable
class Transport(Protocol):
    def send(self, messages: Sequence[Message], desc: str = "") -> list[Message]:
        """Deliver requests, return the replies in the same order (reply.src = request.dst)."""


@runtime_checkable
class FederatedClient(Protocol):
    def handle(self, message: Message) -> Message: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class FederatedMethod(Protocol):
    """What the runner needs from a method's server side.

    num_rounds                       total global rounds of a full run
    make_client(cid)                 a fresh client object for id `cid` (the engine owns it)
    run_round(r, transport) -> dict  one global round; returns that round's metrics record
    state_dict()/load_state_dict()   everything server-side a resume needs (not RNG: the runner does it)
    summary(records) -> dict         the `summary` block of metrics.json
    write_plots(plot_dir, records, summary) -> list of written paths
    round_postfix(record) -> dict    short numbers for the progress bar
    Optional:
    round_plan(r) -> dict            {"task_start": bool, "units": {phase or "phase/loop": units}, "per_client":
                                     {key: message kind}}: what round r asks of each phase (`fcl-ext estimate`)
    TASK_START_PHASES                sub-phases that run only in task-start rounds (`fcl-ext estimate`)
    handle_together(clients, messages, rng_context) -> replies | None
                                     one send handled in one go by the in-process engine (same values as one
                                     by one; GLFC packs the refreshes' entropy passes); None: one by one
    """
    num_rounds: int

    def make_client(self, cid: Hashable) -> FederatedClient: ...
    def run_round(self, round_idx: int, transport: Transport) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def summary(self, records: list) -> dict: ...
    def write_plots(self, plot_dir, records: list, summary: dict) -> list: ...
