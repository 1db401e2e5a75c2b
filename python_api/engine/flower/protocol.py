"""What the Flower ServerApp and ClientApp agree on: message types, record names, seeds.

Every method message (python_api/messages.py `Message(kind, payload, dst=cid)`) travels as one
Flower Message whose `message_type` names the method step, so Flower's logs and ClientApp routing
say what runs; the method's own `kind` travels in the meta record, so one handler serves them all.
"""
from __future__ import annotations

import hashlib
import json

__all__ = ["MESSAGE_TYPES", "ENGINE_TYPES", "IN_MEMORY_KINDS", "flower_type", "encode_cid", "decode_cid",
           "config_digest", "PAYLOAD", "RUN_RECORD"]

# method kind -> Flower message type ("<train|evaluate|query>.<action>")
MESSAGE_TYPES = {
    "train": "train.glfc_round",            # GLFC: a selected client's local round (+ prototype gradients)
    "refresh": "train.glfc_refresh",        # GLFC: an unselected client's entropy pass / memory update
    "public_logits": "query.public_logits",  # FCCL: logits on one public batch
    "collaborate": "train.fccl_collab",     # FCCL: one cross-correlation step
    "local_update": "train.fccl_local",     # FCCL: local CE + dual distillation
    "evaluate": "evaluate",                 # FCCL: intra/inter accuracy
}
GENERIC_TYPE = "train.fcl_message"          # any other method kind

# engine control messages
ENGINE_TYPES = {
    "hello": "query.fcl_hello",             # node identity (partition-id, role) + the run's config
    "state": "query.fcl_state",             # clients' state for a checkpoint
    "load_state": "train.fcl_load_state",   # clients' state from a checkpoint (resume)
    "proxy": "train.glfc_proxy",            # GLFC proxy work on a role=proxy SuperNode
}

# Kinds whose effect stays in process memory until the next message to the same client (FCCL keeps
# the autograd graph of its public logits for the `collaborate` step). A ClientApp process that did
# not see such a message replays it from Context.state (same inputs, same RNG -> same tensors).
IN_MEMORY_KINDS = frozenset({"public_logits"})

PAYLOAD = "fcl"            # record prefix of a message's payload
RUN_RECORD = "fcl.run"     # Context.state record holding the run's method name and config


def flower_type(kind: str) -> str:
    return MESSAGE_TYPES.get(kind, GENERIC_TYPE)


def encode_cid(cid) -> str:
    return json.dumps(cid)


def decode_cid(text: str):
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
