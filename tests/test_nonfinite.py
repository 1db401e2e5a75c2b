"""Issue 17: a non-finite loss or update stops the run naming the round, client and loss term and leaves
the last good checkpoint as it was; run.on_nonfinite=skip_client leaves that client's update out instead.
NaN is injected into one client's loss (GLFC), its uploaded update (GLFC) or its private data (FCCL)."""
import hashlib
import json

import pytest
import torch

from python_api.checkpoint import load_checkpoint
from python_api.config import ConfigError
from python_api.engine.runner import run_training
from python_api.methods.glfc.client import GLFCClient
from python_api.nonfinite import NonFiniteError, NonFiniteGuard, first_nonfinite

from tests.glfc_tiny import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:fcl_ext.ops has no FCCL losses")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def poison_glfc_loss(monkeypatch, at_round: int) -> list:
    """The first client that trains in round `at_round` gets a NaN loss (its loss function returns NaN,
    its inputs stay finite). Returns the list the poisoned client id is appended to."""
    poisoned = []
    train = GLFCClient.train

    def train_with_nan(self, model, round_idx):
        if round_idx != at_round or poisoned:
            return train(self, model, round_idx)
        poisoned.append(self.cid)
        real = self.ctx.loss_fn
        self.ctx.loss_fn = lambda *args, **kwargs: real(*args, **kwargs) * float("nan")
        try:
            return train(self, model, round_idx)
        finally:
            self.ctx.loss_fn = real
    monkeypatch.setattr(GLFCClient, "train", train_with_nan)
    return poisoned


# ------------------------------------------------------------------------------------------ units
def test_guard_names_round_client_and_term_and_skips_under_skip_client():
    stop = NonFiniteGuard("stop", 7)
    assert stop.ok(3, {"loss": 1.0}, {"update": {"w": torch.ones(2)}})
    with pytest.raises(NonFiniteError, match=r"non-finite update in round 7, client 3 \(w\)") as info:
        stop.ok(3, {}, {"update": {"w": torch.tensor([1.0, float("inf")])}})
    assert (info.value.round, info.value.client, info.value.term) == (7, 3, "update")
    with pytest.raises(NonFiniteError, match="non-finite L_RD in round 7, client 'a'"):
        stop.ok("a", {"nonfinite": {"term": "L_RD"}}, {})
    skip = NonFiniteGuard("skip_client", 2)
    assert not skip.ok(1, {"nonfinite": {"term": "L_GC", "where": "step 0"}}, {})
    assert not skip.ok(4, {}, {"logits": torch.tensor([float("nan")])})
    assert skip.skipped == [{"client": 1, "term": "L_GC", "where": "step 0"},
                            {"client": 4, "term": "logits", "where": ""}]
    assert first_nonfinite({"a": [torch.ones(1), {"b": float("nan")}]}) == "a[1].b"
    assert first_nonfinite({"n": torch.tensor([1, 2]), "x": None, "s": "nan"}) is None
    with pytest.raises(ValueError, match="run.on_nonfinite"):
        NonFiniteGuard("ignore", 0)
    import pickle
    err = pickle.loads(pickle.dumps(NonFiniteError(1, 2, "L_GC")))
    assert (err.round, err.client, err.term) == (1, 2, "L_GC")


def test_on_nonfinite_is_validated():
    with pytest.raises(ConfigError, match="run.on_nonfinite"):
        tiny_config("run.on_nonfinite=ignore")


# ------------------------------------------------------------------------------------------ GLFC
def test_glfc_nan_loss_stops_naming_round_client_term_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_training("glfc", tiny_config("run.max_rounds=2"), out_dir=out, verbose=False)
    ckpt = out / "checkpoints" / "last.pt"
    good = _sha(ckpt)
    poisoned = poison_glfc_loss(monkeypatch, at_round=2)
    with pytest.raises(NonFiniteError) as info:
        run_training("glfc", tiny_config(), out_dir=out, resume=True, verbose=False)
    assert poisoned and (info.value.round, info.value.client) == (2, poisoned[0])
    # the loss backend is named: its inputs and the twins' L_GC / L_RD are finite
    assert "glfc_loss" in info.value.term and "round 2" in str(info.value) and f"client {poisoned[0]}" in str(info.value)
    assert _sha(ckpt) == good and load_checkpoint(ckpt)["round"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and "round 2" in metrics["summary"]["stopped"]
    monkeypatch.undo()                     # the fault gone, the kept checkpoint resumes to the end
    resumed = run_training("glfc", tiny_config(), out_dir=out, resume=True, verbose=False)
    assert resumed.completed and len(resumed.records) == 4


def test_glfc_nan_loss_skip_client_leaves_that_update_out(tmp_path, monkeypatch):
    import python_api.methods.glfc.server as glfc_server
    averaged = []
    fedavg = glfc_server.fedavg
    monkeypatch.setattr(glfc_server, "fedavg", lambda states, w=None: averaged.append(len(states)) or fedavg(states, w))
    poisoned = poison_glfc_loss(monkeypatch, at_round=1)
    result = run_training("glfc", tiny_config("run.on_nonfinite=skip_client", "run.max_rounds=3"),
                          out_dir=tmp_path / "run", verbose=False)
    assert len(result.records) == 3 and poisoned
    r1 = result.records[1]
    assert [s["client"] for s in r1["nonfinite_skipped"]] == poisoned and "glfc_loss" in r1["nonfinite_skipped"][0]["term"]
    assert averaged == [2, 1, 2]           # round 1 averaged the one update that was finite
    assert all("nonfinite_skipped" not in r for r in (result.records[0], result.records[2]))
    for record in result.records:
        assert record["loss"] == record["loss"] and 0 <= record["accuracy"] <= 100   # no NaN reached the model
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["method_state"]["model"]
    assert first_nonfinite(state) is None


def test_glfc_client_takes_no_step_on_a_nan_loss_and_names_the_term(tmp_path):
    """The client itself: NaN old-model logits -> no optimiser step, term names the L_RD teacher."""
    from python_api.engine import InProcessEngine
    from python_api.methods.glfc import GLFCServer
    server = GLFCServer(tiny_config(), tmp_path, torch.device("cpu"))
    InProcessEngine(server, progress=False)
    client = server.make_client(0)
    model = server.ctx.load_working_model({k: v.detach() for k, v in server.model.state_dict().items()}, 2)
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    mask = torch.tensor([True, False])
    assert client.nonfinite_term(logits, labels, mask, torch.full((4, 2), float("nan"))) == \
        "old-model logits (L_RD teacher)"
    assert client.nonfinite_term(logits * float("inf"), labels, mask, None) == "logits (model output)"
    assert "glfc_loss" in client.nonfinite_term(logits, labels, mask, logits)
    client.before_train(0, 1)
    before = server.ctx.clone_state(model)
    real = server.ctx.loss_fn
    server.ctx.loss_fn = lambda *a, **k: real(*a, **k) * float("nan")
    try:
        loss, _ = client.train(model, 0)
    finally:
        server.ctx.loss_fn = real
    assert loss != loss and client.nonfinite["where"] == "local epoch 0, step 0"
    after = server.ctx.clone_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
               and "running" not in k)    # parameters untouched (BN running stats move in the forward)


def test_glfc_nan_in_an_uploaded_update_stops_naming_the_tensor(tmp_path, monkeypatch):
    handle = GLFCClient.handle

    def handle_with_nan_state(self, message):
        reply = handle(self, message)
        if message.kind == "train" and message.payload["round"] == 1:
            key = next(k for k, v in reply.payload["state"].items() if v.is_floating_point())
            reply.payload["state"][key] = reply.payload["state"][key].clone().fill_(float("nan"))
        return reply
    monkeypatch.setattr(GLFCClient, "handle", handle_with_nan_state)
    with pytest.raises(NonFiniteError, match=r"non-finite update \(model state\) in round 1, client \d+ \(\S+\)") as info:
        run_training("glfc", tiny_config("run.max_rounds=2"), out_dir=tmp_path / "run", verbose=False)
    assert info.value.where and load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["round"] == 0


def test_cli_reports_a_nonfinite_stop_with_exit_code_3(tmp_path, monkeypatch, capsys):
    from python_api.cli import main
    from tests.glfc_tiny import TINY
    poison_glfc_loss(monkeypatch, at_round=0)
    code = main(["train", "glfc", "--out", str(tmp_path / "run"), *TINY, "run.max_rounds=1"])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite" in err and "round 0" in err and not (tmp_path / "run/checkpoints/last.pt").exists()


# ------------------------------------------------------------------------------------------ FCCL
def _poison_fccl_private_data(monkeypatch, index: int, at_round: int):
    from python_api.methods.fccl.participant import FCCLParticipant
    local_update = FCCLParticipant._on_local_update

    def poisoned(self, round=0, **kwargs):
        if self.index == index and round == at_round:
            self.train_x = self.train_x.clone()
            self.train_x[:] = float("nan")
        return local_update(self, round=round, **kwargs)
    monkeypatch.setattr(FCCLParticipant, "_on_local_update", poisoned)


def test_fccl_nan_private_data_stops_naming_participant_and_term(tmp_path, monkeypatch):
    from tests.test_fccl_trainer import tiny_config as fccl_config
    _poison_fccl_private_data(monkeypatch, index=1, at_round=1)
    with pytest.raises(NonFiniteError) as info:
        run_training("fccl", fccl_config(tmp_path), out_dir=tmp_path / "run", verbose=False)
    assert (info.value.round, info.value.client, info.value.term) == (1, 1, "logits (model output)")
    assert "local update" in info.value.where
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["round"] == 0


def test_fccl_skip_client_undoes_that_local_update(tmp_path, monkeypatch):
    from python_api.methods.fccl.participant import FCCLParticipant
    from tests.test_fccl_trainer import tiny_config as fccl_config
    nets = {}
    local_update = FCCLParticipant._on_local_update

    def record_net(self, round=0, **kwargs):
        before = {k: v.clone() for k, v in self.net.state_dict().items()}
        reply = local_update(self, round=round, **kwargs)
        nets[(self.index, round)] = (before, {k: v.clone() for k, v in self.net.state_dict().items()})
        return reply
    monkeypatch.setattr(FCCLParticipant, "_on_local_update", record_net)
    _poison_fccl_private_data(monkeypatch, index=1, at_round=1)
    result = run_training("fccl", fccl_config(tmp_path, run={"device": "cpu", "seed": 0, "progress": False,
                                                               "threads": 1, "on_nonfinite": "skip_client"}),
                          out_dir=tmp_path / "run", verbose=False)
    assert result.completed and len(result.records) == 2
    skipped = result.records[1]["nonfinite_skipped"]
    assert [(s["client"], s["term"]) for s in skipped] == [(1, "logits (model output)")]
    before, after = nets[(1, 1)]
    assert all(torch.equal(before[k], after[k]) for k in before)             # undone
    before, after = nets[(0, 1)]
    assert not all(torch.equal(before[k], after[k]) for k in before)         # the other one trained
    assert result.records[1]["mean_intra_top1"] == result.records[1]["mean_intra_top1"]


def test_a_recorded_device_input_error_stops_the_round_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """CUDA kernels record invalid inputs on the device (fcl_ext.check_device_errors); the runner reads them
    once per round and stops like a non-finite loss: nothing of that round is saved. Simulated here (no GPU)
    by a recorded error that the runner's check raises at round 2."""
    from fcl_ext.device_errors import DeviceInputError
    import python_api.engine.runner as runner
    out = tmp_path / "run"
    run_training("glfc", tiny_config("run.max_rounds=2"), out_dir=out, verbose=False)
    ckpt = out / "checkpoints" / "last.pt"
    good = _sha(ckpt)
    checks = []

    def recorded_error_at_round_2():
        checks.append(len(checks))
        if len(checks) == 1:  # the first round of the resumed run is round 2
            raise DeviceInputError("glfc_loss on cuda:0: labels[3] = 12 is outside [0, 10)", {"code": 1})
    monkeypatch.setattr(runner, "check_device_errors", recorded_error_at_round_2)
    with pytest.raises(DeviceInputError):
        run_training("glfc", tiny_config(), out_dir=out, resume=True, verbose=False)
    assert checks == [0] and _sha(ckpt) == good and load_checkpoint(ckpt)["round"] == 1
    stopped = json.loads((out / "metrics.json").read_text())["summary"]["stopped"]
    assert stopped.startswith("round 2: ") and "labels[3] = 12" in stopped
