"""Non-finite losses and updates in a federated run (issue 17): stop, or skip that client's update.

Clients never take an optimiser step on a non-finite loss (the weights keep their last finite values)
and say so in their reply: `payload["nonfinite"] = {"term": ..., "where": ...}`. The server side checks
every reply (that flag, and the update itself: model state, logits, prototype gradients) before it uses
it, and applies `run.on_nonfinite`:

    stop         (default) raise NonFiniteError naming the round, the client and the loss term; the runner
                 saves nothing for that round, so the last good checkpoint stays as it was
    skip_client  leave that client's update out of the round (logged, and listed in the round record
                 under `nonfinite_skipped`); the run goes on
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

__all__ = ["POLICIES", "NonFiniteError", "is_finite", "first_nonfinite", "NonFiniteGuard"]

POLICIES = ("stop", "skip_client")

log = logging.getLogger("fcl_ext.nonfinite")


class NonFiniteError(RuntimeError):
    """A non-finite loss or update stopped the run (run.on_nonfinite=stop)."""

    def __init__(self, round_idx: int, client, term: str, where: str = ""):
        self.round, self.client, self.term, self.where = round_idx, client, term, where
        detail = f" ({where})" if where else ""
        super().__init__(f"non-finite {term} in round {round_idx}, client {client!r}{detail}: the run stopped; "
                         "the last good checkpoint is kept (run.on_nonfinite=skip_client leaves such a "
                         "client's update out instead)")

    def __reduce__(self):   # picklable across processes with its fields
        return (NonFiniteError, (self.round, self.client, self.term, self.where))


def is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def first_nonfinite(tree, path: str = "") -> Optional[str]:
    """The path of the first non-finite float (tensor or number) in a tree of dicts/lists, or None."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = first_nonfinite(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found = first_nonfinite(value, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if is_finite(tree) else (path or "value")


class NonFiniteGuard:
    """The server side's check of one round's replies under a policy (stop | skip_client)."""

    def __init__(self, policy: str, round_idx: int):
        if policy not in POLICIES:
            raise ValueError(f"run.on_nonfinite: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.round = policy, round_idx
        self.skipped: list = []     # {"client", "term", "where"} per left-out update

    def flag(self, client, term: str, where: str = "") -> None:
        """A non-finite `term` from `client`: raise (stop) or record the skip."""
        if self.policy == "stop":
            raise NonFiniteError(self.round, client, term, where)
        self.skipped.append({"client": client, "term": term, "where": where})
        message = f"[nonfinite] round {self.round}: client {client!r}: non-finite {term}" + \
                  (f" ({where})" if where else "") + "; its update is left out (run.on_nonfinite=skip_client)"
        log.warning(message)
        print(message)

    def ok(self, client, payload: dict, checks: dict) -> bool:
        """True when the reply is usable. The client's own flag names the loss term; `checks` maps a term
        name to the part of the payload that must be finite (e.g. {"update (model state)": state})."""
        report = payload.get("nonfinite")
        if report:
            self.flag(client, report.get("term", "loss"), report.get("where", ""))
            return False
        for term, value in checks.items():
            where = first_nonfinite(value)
            if where is not None:
                self.flag(client, term, where if where != "value" else "")
                return False
        return True
