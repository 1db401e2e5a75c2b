"""InProcessEngine: every client lives in this process (or in its worker processes); `send` calls them.

Deterministic for a given seed. Clients are created on first contact by the method's `make_client` and
kept, so their local state (memory, old models) persists.

run.client_rng=sequential (default): one after another in request order, the global RNG running through
them (the reference's order). run.client_rng=streams: each message is handled with the global RNGs
(torch, numpy, random) seeded from (run.seed, round, client, message kind) and restored afterwards, so a
client's randomness does not depend on which clients ran before it. run.workers=N (needs streams): the
clients live in N forked worker processes (a client stays in the worker that first got it), each with
its share of torch threads; a send's messages run in parallel across workers and the replies come back
in request order, so metrics equal run.workers=1.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import traceback
from typing import Hashable, Sequence

import torch

from python_api import profiling
from python_api.checkpoint import capture_rng_state, restore_rng_state, seed_everything
from python_api.engine.registry import EngineSpec, register_engine
from python_api.messages import Message

__all__ = ["InProcessEngine", "stream_seed", "client_stream"]


def stream_seed(seed: int, round_idx, cid, kind: str) -> int:
    """A 63-bit seed for one client's message, from (run seed, round, client, message kind) alone."""
    digest = hashlib.sha256(repr((int(seed), round_idx, cid, kind)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextlib.contextmanager
def client_stream(seed: int, message: Message):
    """The global RNGs seeded for this message, the caller's RNG state restored afterwards."""
    saved = capture_rng_state()
    seed_everything(stream_seed(seed, message.payload.get("round") if isinstance(message.payload, dict) else None,
                                message.dst, message.kind) % (2 ** 32), deterministic=False)
    try:
        yield
    finally:
        restore_rng_state(saved)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker_loop(conn, engine, threads: int) -> None:
    """A forked worker: handle (cid, message) requests for the clients it holds until told to stop."""
    torch.set_num_threads(max(1, threads))
    engine.workers = 1
    while True:
        try:
            op, arg = _loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            if op == "stop":
                return
            if op == "handle":
                profiling.pop_round()
                profiling.pop_details()
                message, parent_phases = arg
                with profiling.nested_in(parent_phases):
                    out = engine._handle_one(message)
                out = (out, profiling.pop_round(with_counts=True), profiling.pop_details())
            elif op == "state":
                out = {cid: engine.client(cid).state_dict() for cid in arg}
            elif op == "load":
                for cid, state in arg.items():
                    engine.client(cid).load_state_dict(state)
                out = None
            else:
                raise ValueError(f"unknown worker request {op!r}")
            conn.send_bytes(_dumps(("ok", out)))
        except BaseException as exc:   # the parent raises it, naming the worker's traceback
            conn.send_bytes(_dumps(("error", (exc if _picklable(exc) else None, traceback.format_exc()))))


class InProcessEngine:
    name = "inprocess"

    def __init__(self, method, progress: bool = True):
        self.method = method
        self.progress = progress
        self.clients: dict = {}
        self.messages_carried: list = []   # (kind, dst, payload keys) of every request, for audits
        self.audit = False
        run = getattr(getattr(method, "cfg", None), "run", None)
        self.seed = getattr(run, "seed", 0)
        self.streams = getattr(run, "client_rng", "sequential") == "streams"
        self.workers = int(getattr(run, "workers", 1) or 1)
        self._pool = None          # [(process, connection)] once started
        self._owner: dict = {}     # cid -> worker index (a client stays where it was first sent)

    def _rng_context(self, message: Message):
        return client_stream(self.seed, message) if self.streams else contextlib.nullcontext()

    def _handle_one(self, message: Message) -> Message:
        with self._rng_context(message):
            reply = self.client(message.dst).handle(message)
        reply.src = message.dst
        return reply

    # ---- worker processes (run.workers > 1)
    def _start_workers(self) -> None:
        import multiprocessing as mp
        ctx = mp.get_context("fork")   # the children inherit the built method (data, context) as it is now
        threads = max(1, torch.get_num_threads() // self.workers)
        self._pool = []
        for _ in range(self.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_loop, args=(child, self, threads), daemon=True)
            proc.start()
            child.close()
            self._pool.append((proc, parent))

    def _worker_of(self, cid) -> int:
        if cid not in self._owner:
            self._owner[cid] = len(self._owner) % self.workers
        return self._owner[cid]

    def _ask(self, index: int, op: str, arg) -> None:
        self._pool[index][1].send_bytes(_dumps((op, arg)))

    def _answer(self, index: int):
        proc, conn = self._pool[index]
        try:
            status, out = _loads(conn.recv_bytes())
        except EOFError:
            raise RuntimeError(f"in-process worker {index} (pid {proc.pid}) died (exit code {proc.exitcode})") from None
        if status == "error":
            exc, trace = out
            if exc is not None:
                raise exc
            raise RuntimeError(f"in-process worker {index} failed:\n{trace}")
        return out

    def _send_parallel(self, messages: Sequence[Message]) -> list:
        if self._pool is None:
            self._start_workers()
        from collections import deque
        from multiprocessing.connection import wait
        queues = [deque() for _ in range(self.workers)]   # each worker takes its own messages in request order
        for position, m in enumerate(messages):
            queues[self._worker_of(m.dst)].append(position)
        stack = profiling.stack()
        # One request in flight per worker: a request or reply larger than the pipe's buffer would otherwise
        # block the parent writing the next request while that worker blocks writing its reply (deadlock).
        asked = {}
        for w, queue in enumerate(queues):
            if queue:
                asked[w] = queue.popleft()
                self._ask(w, "handle", (messages[asked[w]], stack))
        replies = [None] * len(messages)
        while asked:
            ready = wait([self._pool[w][1] for w in asked])
            for w in [w for w in list(asked) if self._pool[w][1] in ready]:
                reply, (times, counts), details = self._answer(w)
                profiling.add(times, counts, details)
                replies[asked.pop(w)] = reply
                if queues[w]:
                    asked[w] = queues[w].popleft()
                    self._ask(w, "handle", (messages[asked[w]], stack))
        return replies

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        pool, self._pool = self._pool, None
        for index, (proc, conn) in enumerate(pool or []):
            try:
                conn.send_bytes(_dumps(("stop", None)))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            conn.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def client(self, cid: Hashable):
        if cid not in self.clients:
            with profiling.phase("client_setup", f"client {cid}"):   # once per client (FCCL: pretraining)
                self.clients[cid] = self.method.make_client(cid)
        return self.clients[cid]

    def send(self, messages: Sequence[Message], desc: str = "") -> list:
        if self.workers > 1 and messages:
            replies = self._send_parallel(list(messages))
            if self.audit:
                for message, reply in zip(messages, replies):
                    self.messages_carried.append(("request", message.kind, message.dst, message.payload))
                    self.messages_carried.append(("reply", reply.kind, reply.src, reply.payload))
            return replies
        together = getattr(self.method, "handle_together", None)   # e.g. GLFC: refreshes in shared batches
        if together is not None and len(messages) > 1:
            replies = together([self.client(m.dst) for m in messages], list(messages), self._rng_context)
            if replies is not None:
                for message, reply in zip(messages, replies):
                    reply.src = message.dst
                    if self.audit:
                        self.messages_carried.append(("request", message.kind, message.dst, message.payload))
                        self.messages_carried.append(("reply", reply.kind, reply.src, reply.payload))
                return replies
        iterator = messages
        if self.progress and len(messages) > 1:
            from tqdm.auto import tqdm
            iterator = tqdm(messages, desc=desc or "clients", leave=False, unit="client", dynamic_ncols=True)
        replies = []
        for message in iterator:
            if self.audit:
                self.messages_carried.append(("request", message.kind, message.dst, message.payload))
            reply = self._handle_one(message)
            if self.audit:
                self.messages_carried.append(("reply", reply.kind, reply.src, reply.payload))
            replies.append(reply)
        return replies

    # checkpointing: the clients' local state
    def state_dict(self) -> dict:
        if self._pool is None:
            return {"clients": {cid: c.state_dict() for cid, c in self.clients.items()}}
        clients = {}
        for index in range(self.workers):
            self._ask(index, "state", [cid for cid, w in self._owner.items() if w == index])
        for index in range(self.workers):
            clients.update(self._answer(index))
        return {"clients": {cid: clients[cid] for cid in self._owner}}   # first-contact order, as workers=1

    def load_state_dict(self, state: dict) -> None:
        self.clients = {}
        saved = state.get("clients", {})
        if self.workers > 1:
            if self._pool is None:
                self._start_workers()
            parts = [{} for _ in range(self.workers)]
            for cid, client_state in saved.items():
                parts[self._worker_of(cid)][cid] = client_state
            for index, part in enumerate(parts):
                self._ask(index, "load", part)
            for index in range(self.workers):
                self._answer(index)
            return
        for cid, client_state in saved.items():
            self.client(cid).load_state_dict(client_state)


def _picklable(exc) -> bool:
    try:
        _dumps(exc)
        return True
    except Exception:
        return False


register_engine(EngineSpec(name="inprocess", transport=InProcessEngine,
                           description="every client in this process, one after another (default)"))
