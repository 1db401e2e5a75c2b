"""Privacy by default (issue 16, item 2): in a default GLFC run nothing leaves a client but what the
method sends (model state, counts, the signal, the loss, [K, P] LeNet gradients). Every message of a
whole default run is audited, in-process and over Flower: no image-shaped or uint8 tensor anywhere,
no payload key outside the documented lists. With proxy.psnr=true the run says that raw prototypes
left the clients."""
import json

import pytest
import torch

from python_api.config import load_config
from python_api.engine import InProcessEngine
from python_api.engine.runner import run_training
from python_api.methods.glfc import GLFCConfig, GLFCServer
from python_api.methods.glfc.client import AUDIT_KEYS, REFRESHED_KEYS, UPDATE_KEYS
from python_api.methods.glfc.server import PSNR_PRIVACY_NOTICE, REFRESH_KEYS, TRAIN_KEYS

from tests.glfc_tiny import tiny_config

REPLY_KEYS = {"update": UPDATE_KEYS, "refreshed": REFRESHED_KEYS}
REQUEST_KEYS = {"train": TRAIN_KEYS, "refresh": REFRESH_KEYS}


def _tensors(tree, path="payload"):
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{path}[{i}]")


def audit(messages, image_shape):
    """Fail on an unknown message kind, a payload key outside the documented lists, a uint8 tensor or
    a tensor whose trailing dims are an image (C, H, W). Returns how many replies carried gradients."""
    with_grads = 0
    for direction, kind, cid, payload in messages:
        allowed = (REPLY_KEYS if direction == "reply" else REQUEST_KEYS).get(kind)
        assert allowed is not None, f"{direction} of unknown kind {kind!r} (client {cid})"
        assert set(payload) <= allowed, f"{direction} {kind!r} of client {cid} carries {set(payload) - allowed}"
        for path, t in _tensors(payload):
            assert t.dtype != torch.uint8, f"{kind} {path}: uint8 tensor {tuple(t.shape)}"
            assert tuple(t.shape[-3:]) != tuple(image_shape), f"{kind} {path}: image-shaped {tuple(t.shape)}"
        if direction == "reply" and kind == "update" and payload["proto_grads"] is not None:
            assert payload["proto_grads"].dim() == 2
            with_grads += 1
    return with_grads


def test_default_is_private_everywhere():
    assert GLFCConfig().proxy.psnr is False
    from python_api.config import list_presets
    for preset in [p for p in list_presets() if p.startswith("glfc-")]:
        assert load_config(GLFCConfig, preset).proxy.psnr is False, preset


def test_every_message_of_a_default_run_in_process(tmp_path, monkeypatch):
    made = []

    class AuditedEngine(InProcessEngine):
        def __init__(self, method, progress=True):
            super().__init__(method, progress)
            self.audit = True
            made.append(self)

    result = run_training("glfc", tiny_config(), out_dir=tmp_path / "run", engine=AuditedEngine, verbose=False)
    assert result.completed and len(made) == 1
    messages = made[0].messages_carried
    assert len(messages) == 2 * (4 + 4 + 5 + 5)   # every client, every round (4 then 5 clients), both ways
    assert audit(messages, (3, 16, 16)) >= 2    # the audit saw prototype gradients travel
    assert result.summary["raw_prototypes_left_clients"] is False and "privacy_notice" not in result.summary


def test_the_audit_catches_raw_prototypes(tmp_path, capsys):
    """With proxy.psnr=true the same audit fails, and the run log and metrics.json say why."""
    server = GLFCServer(tiny_config("proxy.psnr=true"), tmp_path, torch.device("cpu"))
    assert PSNR_PRIVACY_NOTICE in capsys.readouterr().err
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    server.run_round(0, engine)
    with pytest.raises(AssertionError, match="audit_"):
        audit(engine.messages_carried, (3, 16, 16))
    sent = [p for d, k, _, p in engine.messages_carried if d == "reply" and k == "update" and "audit_prototypes" in p]
    assert sent and set(sent[0]) - UPDATE_KEYS == AUDIT_KEYS
    result = run_training("glfc", tiny_config("proxy.psnr=true", "run.max_rounds=1"), out_dir=tmp_path / "run",
                          verbose=False)
    summary = json.loads((result.run_dir / "metrics.json").read_text())["summary"]
    assert summary["raw_prototypes_left_clients"] is True and summary["privacy_notice"] == PSNR_PRIVACY_NOTICE
    assert "PRIVACY" in summary["report"]


def test_every_message_of_a_default_run_over_flower(tmp_path, monkeypatch):
    pytest.importorskip("flwr", reason="Flower is not installed (pip install '.[flower]')")
    from python_api.engine.flower import transport as flower_transport
    made = []
    original = flower_transport.FlowerTransport.__init__

    def audited(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.audit = True
        made.append(self)
    monkeypatch.setattr(flower_transport.FlowerTransport, "__init__", audited)
    result = run_training("glfc", tiny_config(), out_dir=tmp_path / "sim", engine="flower-sim", verbose=False)
    assert result.completed and len(made) == 1
    messages = made[0].messages_carried        # decoded from what crossed the wire
    assert len(messages) == 2 * (4 + 4 + 5 + 5)
    assert audit(messages, (3, 16, 16)) >= 2
