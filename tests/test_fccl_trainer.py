"""The FCCL trainer: target construction, frozen teachers, what crosses the engine, end-to-end runs,
resume equality, the reference's optimiser quirk and the baselines."""
import json

import pytest
import torch

from python_api.config import ConfigError, apply_overrides, from_dict
from python_api.engine import InProcessEngine, Message
from python_api.engine.runner import run_training
from python_api.methods.fccl import FCCLConfig, FCCLServer, collaborative_target, intra_inter

pytestmark = pytest.mark.filterwarnings("ignore:fcl_ext.ops has no FCCL losses")


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models: one intra-op thread is fastest, and far faster on a shared CPU (conftest restores it)."""

TINY_PARTICIPANTS = [{"domain": "plain", "backbone": "resnet10", "width": 0.0625, "local_epochs": 1},
                     {"domain": "inverted", "backbone": "mobilenetv2", "width": 0.1, "local_epochs": 1}]


def tiny_config(tmp_path, **sections):
    data = {
        "run": {"device": "cpu", "seed": 0, "progress": False, "threads": 1},
        "data": {"scenario": "bundled", "public": "bundled", "image_size": 8, "bundled_train_per_domain": 24,
                 "bundled_public_size": 64, "public_batch_size": 32, "private_batch_size": 16},
        "participants": TINY_PARTICIPANTS,
        "pretrain": {"epochs": 1, "batch_size": 16, "cache_dir": str(tmp_path / "pretrained")},
        "fccl": {"rounds": 2, "loss_backend": "reference"},
    }
    for section, values in sections.items():
        data.setdefault(section, {})
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    cfg = from_dict(FCCLConfig, data)
    cfg.validate()
    return cfg


def test_target_is_mean_of_others_current_and_own_previous():
    # Three participants, batch of 2, 2 classes; hand-computed target for participant 1:
    # others' current logits Z0, Z2 and its own previous-round logits P1, averaged over N = 3.
    z0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z2 = torch.tensor([[-1.0, 0.0], [2.0, 2.0]])
    p1 = torch.tensor([[3.0, 1.0], [1.0, 0.0]])
    target = collaborative_target(z0 + z2, 3, p1)
    assert torch.allclose(target, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


class _Recorder:
    """A participant stand-in: fixed logits, records the `collaborate` payload it receives."""

    def __init__(self, logits):
        self.logits, self.received = logits, None

    def handle(self, message):
        if message.kind == "public_logits":
            return Message("public_logits", {"logits": self.logits})
        self.received = message.payload
        return Message("collaborate", {"loss": 0.0})


def test_server_sends_each_participant_the_sum_of_the_others(tmp_path):
    cfg = tiny_config(tmp_path, fccl={"rounds": 1, "public_epochs": 1})
    server = FCCLServer(cfg)
    logits = [torch.full((32, 10), float(v)) for v in (1.0, 10.0)]
    engine = InProcessEngine(server, progress=False)
    engine.clients = {i: _Recorder(logits[i]) for i in server.ids}
    server._collaborate(engine)
    assert torch.equal(engine.clients[0].received["others_sum"], logits[1])
    assert torch.equal(engine.clients[1].received["others_sum"], logits[0])
    assert engine.clients[0].received["count"] == 2 and engine.clients[0].received["mode"] == "reference"


def test_participant_target_uses_previous_model_not_current(tmp_path):
    cfg = tiny_config(tmp_path)
    server = FCCLServer(cfg)
    engine = InProcessEngine(server, progress=False)
    participant = engine.client(0)
    # Make prev differ from net so the two candidate targets differ.
    with torch.no_grad():
        for p in participant.prev.parameters():
            p.add_(0.5)
    images = torch.randn(32, 3, 8, 8)
    captured = {}
    participant.cross_correlation_loss = lambda a, b, **kw: captured.setdefault("target", b) is not None and \
        (a * 0).sum() + a.sum() * 0
    participant.handle(Message("public_logits", {"images": images}))
    others = torch.randn(32, 10)
    participant.handle(Message("collaborate", {"others_sum": others, "count": 2, "mode": "reference",
                                               "loss": "cross_correlation"}))
    with torch.no_grad():
        expected = (others + participant.prev(images)) / 2
    assert torch.allclose(captured["target"], expected, atol=1e-6)


def test_teachers_frozen_and_prev_refreshed(tmp_path):
    cfg = tiny_config(tmp_path, fccl={"rounds": 1})
    server = FCCLServer(cfg)
    engine = InProcessEngine(server, progress=False)
    for cid in server.ids:
        engine.client(cid)
    frozen_before = [{k: v.clone() for k, v in engine.clients[c].frozen.state_dict().items()} for c in server.ids]
    net_before = [{k: v.clone() for k, v in engine.clients[c].net.state_dict().items()} for c in server.ids]
    server.run_round(0, engine)
    for cid in server.ids:
        p = engine.clients[cid]
        assert all(not q.requires_grad for q in p.frozen.parameters())
        assert all(not q.requires_grad for q in p.prev.parameters())
        assert not p.frozen.training and not p.prev.training
        for k, v in p.frozen.state_dict().items():
            assert torch.equal(v, frozen_before[cid][k]), k
        assert any(not torch.equal(v, net_before[cid][k]) for k, v in p.net.state_dict().items())
        for k, v in p.prev.state_dict().items():   # prev <- net after the local update
            assert torch.equal(v, p.net.state_dict()[k]), k


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_only_logits_leave_a_participant(tmp_path):
    cfg = tiny_config(tmp_path, fccl={"rounds": 1})
    server = FCCLServer(cfg)
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    server.run_round(0, engine)
    replies = [entry for entry in engine.messages_carried if entry[0] == "reply"]
    kinds = {entry[1] for entry in replies}
    assert kinds == {"evaluate", "public_logits", "collaborate", "local_update"}
    batch, classes = cfg.data.public_batch_size, 10
    allowed = {"evaluate": {"top1", "topk"}, "public_logits": {"logits"}, "collaborate": {"loss"},
               "local_update": {"loss", "steps"}}
    for _, kind, _, payload in replies:
        assert set(payload) == allowed[kind], (kind, set(payload))
        for tensor in _tensors(payload):
            assert kind == "public_logits" and tensor.shape == (batch, classes) and not tensor.requires_grad
        if kind != "public_logits":       # numbers (and domain names) only: no tensors, no lists of weights
            def scalars(value):
                if isinstance(value, dict):
                    return all(isinstance(k, str) and scalars(v) for k, v in value.items())
                return isinstance(value, (int, float)) and not isinstance(value, bool)
            assert scalars(payload), (kind, payload)
            json.dumps(payload)
    # requests carry public images down and logit sums back, never a model
    for _, kind, _, payload in (e for e in engine.messages_carried if e[0] == "request"):
        for tensor in _tensors(payload):
            assert tensor.shape in ((batch, 3, 8, 8), (batch, classes))


def test_fresh_adam_step_is_sign_sgd(tmp_path):
    cfg = tiny_config(tmp_path)
    server = FCCLServer(cfg)
    participant = InProcessEngine(server, progress=False).client(0)
    before = [p.detach().clone() for p in participant.net.parameters()]
    participant.handle(Message("public_logits", {"images": torch.randn(32, 3, 8, 8)}))
    participant.handle(Message("collaborate", {"others_sum": torch.randn(32, 10), "count": 2}))
    # A fresh Adam's first step: m_hat = g, v_hat = g^2, so delta = -lr * g / (|g| + 1e-8) (sign-SGD).
    for p, b in zip(participant.net.parameters(), before):
        expected = -1e-3 * p.grad / (p.grad.abs() + 1e-8)
        assert torch.allclose(p.detach() - b, expected, atol=3e-7, rtol=1e-3)
    moved = sum(int((p.grad.abs() > 1e-6).sum()) for p in participant.net.parameters())
    assert moved > 0


def test_teacher_logits_once_per_round(tmp_path):
    cfg = tiny_config(tmp_path, participants=[dict(TINY_PARTICIPANTS[0], local_epochs=4), TINY_PARTICIPANTS[1]])
    server = FCCLServer(cfg)
    participant = InProcessEngine(server, progress=False).client(0)
    calls = []
    participant.frozen.register_forward_hook(lambda *a: calls.append(1))
    participant.prev.register_forward_hook(lambda *a: calls.append(1))
    reply = participant.handle(Message("local_update", {"round": 0, "batch_size": 8}))
    assert reply.payload["steps"] == 4 * 3
    assert len(calls) == 2      # one pass of each teacher over the 24 private images, not one per step


def test_end_to_end_two_architectures_and_resume(tmp_path):
    cfg = tiny_config(tmp_path, fccl={"rounds": 2})
    full = run_training("fccl", cfg, out_dir=tmp_path / "full", verbose=False)
    summary = json.loads((tmp_path / "full" / "metrics.json").read_text())["summary"]
    for key in ("intra", "inter"):
        assert len(summary[key]["per_participant"]) == 2 and 0 <= summary[key]["mean"] <= 100
        assert 0 <= summary["solo"][key]["mean"] <= 100
    assert summary["participants"] == ["plain/resnet10", "inverted/mobilenetv2"]
    assert (tmp_path / "full" / "metrics.csv").read_text().startswith("round,")
    plots = {p.name for p in (tmp_path / "full" / "plots").rglob("*.png")}
    assert {"accuracy_mean.png", "accuracy_matrix.png", "round_000.png", "round_001.png"} <= plots

    cfg_part = tiny_config(tmp_path, fccl={"rounds": 2})
    cfg_part.run.max_rounds = 1
    first = run_training("fccl", cfg_part, out_dir=tmp_path / "resumed", verbose=False)
    assert not first.completed and len(first.records) == 1
    cfg_rest = tiny_config(tmp_path, fccl={"rounds": 2})
    resumed = run_training("fccl", cfg_rest, out_dir=tmp_path / "resumed", resume=True, verbose=False)
    assert resumed.completed
    for a, b in zip(full.records, resumed.records):
        for key, value in a.items():
            if not key.endswith(("time_s", "times_s")) and key != "runtime_peak_rss_mb":   # measurements, not results
                assert value == b[key], key


@pytest.mark.parametrize("algorithm", ["fedmd", "solo"])
def test_baselines_run(tmp_path, algorithm, monkeypatch):
    """Each algorithm runs its own phases and losses: FCCL cross-correlation + dual distillation, FedMD L1
    to the consensus + CE, SOLO CE only; every phase moves the weights it should."""
    import torch.nn.functional as F

    from python_api.methods.fccl import participant as participant_module
    calls = {"cross_correlation": 0, "dual_distillation": 0, "l1": 0, "cross_entropy": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    real_losses = participant_module.loss_functions
    monkeypatch.setattr(participant_module, "loss_functions", lambda backend: tuple(
        counting(n, f) for n, f in zip(("cross_correlation", "dual_distillation"), real_losses(backend))))
    monkeypatch.setattr(participant_module.F, "l1_loss", counting("l1", F.l1_loss))
    monkeypatch.setattr(participant_module.F, "cross_entropy", counting("cross_entropy", F.cross_entropy))
    cfg = tiny_config(tmp_path, fccl={"rounds": 1, "algorithm": algorithm})
    server = FCCLServer(cfg)
    engine = InProcessEngine(server, progress=False)
    nets = {i: {k: v.clone() for k, v in engine.client(i).net.state_dict().items()} for i in server.ids}
    calls.update({k: 0 for k in calls})          # pretraining's CE does not count
    record = server.run_round(0, engine)
    summary = server.summary([record])
    assert summary["algorithm"] == algorithm
    collaborates = algorithm in ("fccl", "fedmd")
    assert any(k.endswith("collab_loss") for k in record) == collaborates
    # 2 public batches of 32 x 2 participants; 24 private images in batches of 16 -> 2 local steps each
    expected = {"fccl": {"cross_correlation": 4, "dual_distillation": 4, "l1": 0, "cross_entropy": 0},
                "fedmd": {"cross_correlation": 0, "dual_distillation": 0, "l1": 4, "cross_entropy": 4},
                "solo": {"cross_correlation": 0, "dual_distillation": 0, "l1": 0, "cross_entropy": 4}}[algorithm]
    assert calls == expected, calls
    for i in server.ids:
        p = engine.clients[i]
        assert any(not torch.equal(v, nets[i][k]) for k, v in p.net.state_dict().items() if v.is_floating_point())
        # the network evaluated after the round is the trained one, not the frozen pretrained teacher
        assert any(not torch.equal(a, b) for a, b in zip(p.net.parameters(), p.frozen.parameters()))
        assert all(0 <= v <= 100 for v in summary["intra"]["per_participant"] + summary["inter"]["per_participant"])


def test_backends_agree(tmp_path):
    import fcl_ext
    if not hasattr(fcl_ext.ops, "cross_correlation_loss"):
        pytest.skip("fcl_ext.ops has no FCCL losses in this build")
    records = {}
    for backend in ("fcl_ext", "reference"):
        cfg = tiny_config(tmp_path, fccl={"rounds": 1, "loss_backend": backend})
        records[backend] = run_training("fccl", cfg, out_dir=tmp_path / backend, verbose=False).records[0]
    # The collaborative loss is the first thing a round computes: the backends agree to float32 rounding there
    # (measured 4e-7 to 7e-7 relative). The local losses are means over steps taken after the collaborative updates,
    # where that rounding has been amplified by training: 1e-5 to 3e-4 relative between the backends, at every
    # commit checked (e76ad19 included), so they get a tolerance above that spread, not the collaborative one.
    for key in ("p0_plain_collab_loss", "p1_inverted_collab_loss"):
        assert records["fcl_ext"][key] == pytest.approx(records["reference"][key], rel=1e-5, abs=1e-6), key
    for key in ("p0_plain_local_loss", "p1_inverted_local_loss"):
        assert records["fcl_ext"][key] == pytest.approx(records["reference"][key], rel=2e-3), key


def test_pretraining_is_cached(tmp_path):
    cfg = tiny_config(tmp_path)
    server = FCCLServer(cfg)
    first = InProcessEngine(server, progress=False).client(0)
    second = InProcessEngine(server, progress=False).client(0)
    assert first.pretrain_info["cached"] is False and second.pretrain_info["cached"] is True
    for a, b in zip(first.net.parameters(), second.net.parameters()):
        assert torch.equal(a, b)


def test_intra_inter_definition():
    accuracies = [{"top1": {"a": 90.0, "b": 30.0, "c": 60.0}}, {"top1": {"a": 10.0, "b": 80.0, "c": 20.0}},
                  {"top1": {"a": 50.0, "b": 40.0, "c": 70.0}}]
    result = intra_inter(accuracies, "top1")
    assert result["intra"] == [90.0, 80.0, 70.0]
    assert result["inter"] == [45.0, 15.0, 45.0]
    assert result["mean_inter"] == pytest.approx(35.0)


def test_bad_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="fccl.algorithm"):
        tiny_config(tmp_path, fccl={"algorithm": "fedavg"})
    with pytest.raises(ConfigError, match="unknown config key 'fccl.round'"):
        from_dict(FCCLConfig, apply_overrides(FCCLConfig, {}, ["fccl.round=3"]))


def test_variants_all_current_target_and_persistent_adam(tmp_path):
    cfg = tiny_config(tmp_path, fccl={"rounds": 1, "target": "all_current", "fresh_public_optimizer": False,
                                      "off_diag_target": 0.0, "unbiased_std": False, "std_eps": 1e-5})
    server = FCCLServer(cfg)
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    record = server.run_round(0, engine)
    modes = {e[3]["mode"] for e in engine.messages_carried if e[0] == "request" and e[1] == "collaborate"}
    assert modes == {"all_current"}
    assert all(torch.isfinite(torch.tensor(record[f"p{i}_{d}_collab_loss"]))
               for i, d in enumerate(["plain", "inverted"]))


class _DroppingTransport:
    """Wraps an engine and loses every reply from one participant (a node that failed or timed out)."""

    def __init__(self, engine, lost):
        self.engine, self.lost = engine, lost

    def send(self, messages, desc=""):
        return [r for r in self.engine.send(messages, desc=desc) if r.src != self.lost]


def test_round_completes_without_one_participants_replies(tmp_path):
    cfg = tiny_config(tmp_path, participants=TINY_PARTICIPANTS + [
        {"domain": "rotated", "backbone": "resnet10", "width": 0.0625, "local_epochs": 1}], fccl={"rounds": 1})
    server = FCCLServer(cfg)
    engine = InProcessEngine(server, progress=False)
    record = server.run_round(0, _DroppingTransport(engine, lost=2))
    assert record["p2_rotated_intra_top1"] != record["p2_rotated_intra_top1"]  # NaN: no reply
    assert record["p2_rotated_local_loss"] != record["p2_rotated_local_loss"]
    for tag in ("p0_plain", "p1_inverted"):
        assert 0.0 <= record[f"{tag}_intra_top1"] <= 100.0
        assert record[f"{tag}_local_loss"] == record[f"{tag}_local_loss"]
    assert record["mean_intra_top1"] == pytest.approx(
        (record["p0_plain_intra_top1"] + record["p1_inverted_intra_top1"]) / 2)
