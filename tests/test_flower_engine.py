"""The Flower engine (issue 8): payload codec, no flwr import by default, GLFC and FCCL on the
simulation runtime with 3 nodes equal to the in-process engine, a failing node, and one GLFC round on
a loopback deployment (SuperLink + 2 SuperNodes, TLS off on 127.0.0.1 only)."""
import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from python_api.engine.flower.codec import pack, unpack

flwr = pytest.importorskip("flwr", reason="Flower is not installed (pip install '.[flower]')")

pytestmark = pytest.mark.filterwarnings("ignore")

FLOAT_TOL = 1e-6


def _close(a, b, path="record"):
    """Records equal: same keys, numbers within FLOAT_TOL (timings excluded)."""
    if isinstance(a, dict):
        keys = {k for k in a if "time" not in k}
        assert keys == {k for k in b if "time" not in k}, path
        for k in keys:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= FLOAT_TOL * max(1.0, abs(a)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------- codec
def test_codec_round_trip_is_exact():
    from python_api.checkpoint import capture_rng_state
    from python_api.engine.flower.codec import from_record_dict, to_record_dict
    random.seed(3)
    tree = {"state": {"w": torch.randn(3, 4), "n": torch.tensor(7)}, 5: [torch.zeros(0, dtype=torch.long), None],
            "half": torch.randn(4).to(torch.bfloat16), "u8": torch.arange(5, dtype=torch.uint8),
            "flags": torch.tensor([True, False]), "pair": ("a", 2), "nan": float("nan"), "rng": capture_rng_state()}
    back, meta = from_record_dict(to_record_dict(tree, {"kind": "train"}), "fcl")
    assert meta == {"kind": "train"}
    assert torch.equal(back["state"]["w"], tree["state"]["w"]) and back["half"].dtype == torch.bfloat16
    assert torch.equal(back["half"], tree["half"]) and back["u8"].dtype == torch.uint8
    assert back[5][0].shape == (0,) and back[5][1] is None and back["pair"] == ("a", 2) and np.isnan(back["nan"])
    random.setstate(back["rng"]["random"])           # the restored stream continues the original one
    expected = random.Random()
    expected.setstate(tree["rng"]["random"])
    assert random.random() == expected.random()


def test_codec_rejects_objects_that_cannot_travel():
    with pytest.raises(TypeError, match=r"payload\.model"):
        pack({"model": torch.nn.Linear(2, 2)})
    assert unpack(*pack({1: "x"})) == {1: "x"}


def test_in_process_default_never_imports_flwr(tmp_path):
    code = ("import sys; from python_api.engine.runner import run_training; import python_api.cli; "
            "from python_api.methods import available_methods; available_methods(); "
            "import python_api.engine.flower; assert 'flwr' not in sys.modules, 'flwr imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- simulation
def _glfc_cfg(*extra):
    from tests.glfc_tiny import tiny_config
    return tiny_config("run.threads=1", *extra)


def test_glfc_simulation_3_nodes_equals_in_process_with_resume_and_proxy_node(tmp_path):
    """GLFC on 3 simulated nodes: stopped after 2 rounds, resumed (clients' state goes back to the nodes
    from the checkpoint) with the proxy's work moved to a 4th node (proxy=node), the same records as one
    uninterrupted in-process run."""
    from python_api.engine.flower import run_with_flower
    from python_api.engine.runner import run_training
    a = run_training("glfc", _glfc_cfg(), out_dir=tmp_path / "inprocess", verbose=False)
    first = run_training("glfc", _glfc_cfg("run.max_rounds=2"), out_dir=tmp_path / "sim", engine="flower-sim",
                         verbose=False)
    assert not first.completed and len(first.records) == 2
    b = run_with_flower("glfc", _glfc_cfg(), out_dir=tmp_path / "sim", resume=True, engine="flower-sim",
                        verbose=False, proxy="node", num_supernodes=3)
    assert b.completed and len(b.records) == len(a.records) == 4
    assert any(r["num_gradients"] for r in b.records[2:])      # the proxy node reconstructed something
    proxy_node = json.loads((tmp_path / "sim" / "flower.json").read_text())["proxy_node"]
    assert proxy_node is not None and proxy_node["partition_id"] == 3
    _close(a.records, b.records)
    for key in ("accuracy_matrix", "final_accuracy", "average_incremental_accuracy", "forgetting"):
        _close(a.summary[key], b.summary[key], key)
    flower = json.loads((tmp_path / "sim" / "flower.json").read_text())
    assert len(flower["nodes"]) == 3 and flower["misses"] == []     # 3 client nodes (+ the proxy node)
    assert sorted(n["partition_id"] for n in flower["nodes"].values()) == [0, 1, 2]
    assert (tmp_path / "sim" / "metrics.json").exists() and (tmp_path / "sim" / "checkpoints" / "last.pt").exists()


def _fccl_cfg(tmp_path):
    from tests.test_fccl_trainer import tiny_config
    return tiny_config(tmp_path, run={"device": "cpu", "seed": 0, "progress": False, "threads": 1})


def _forget_live_clients(message, context):
    """Act as a fresh ClientApp process for every message, as the deployment runtime starts one per
    message: clients come back from Context.state, FCCL's in-memory public-logits step is replayed."""
    from python_api.engine.flower import client_app
    client_app._RUNTIMES.clear()


def test_fccl_simulation_3_nodes_equals_in_process(tmp_path):
    """FCCL on 3 simulated nodes, every message in a 'fresh process' (state from Context.state only)."""
    from python_api.engine.flower.client_app import build_client_app
    from python_api.engine.runner import run_training
    a = run_training("fccl", _fccl_cfg(tmp_path), out_dir=tmp_path / "inprocess", verbose=False)
    from python_api.engine.flower import run_with_flower
    b = run_with_flower("fccl", _fccl_cfg(tmp_path), out_dir=tmp_path / "sim", engine="flower-sim", verbose=False,
                        client_app=build_client_app(_forget_live_clients))
    assert len(b.records) == len(a.records) == 2
    _close(a.records, b.records)
    _close(a.summary["intra"], b.summary["intra"], "intra")
    _close(a.summary["inter"], b.summary["inter"], "inter")
    _close(a.summary["solo"], b.summary["solo"], "solo")


def _fail_glfc_training_on_partition_1(message, context):
    if message.metadata.message_type == "train.glfc_round" and int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("injected failure on partition 1")


def test_failing_node_round_completes_with_received_replies(tmp_path):
    from python_api.engine.flower.client_app import build_client_app
    from python_api.engine.flower.simulation import run_simulation_training
    result = run_simulation_training("glfc", _glfc_cfg(), tmp_path / "run", num_supernodes=3,
                                     client_app=build_client_app(_fail_glfc_training_on_partition_1), verbose=False)
    assert result.completed and len(result.records) == 4             # the run went on to the end
    flower = json.loads((tmp_path / "run" / "flower.json").read_text())
    misses = flower["misses"]
    assert misses and all(m["kind"] == "train" and "injected failure" in m["reason"] for m in misses)
    # clients hosted on partition 1 (cid % 3 == 1) are exactly the ones that missed
    assert {int(m["cid"]) % 3 for m in misses} == {1}
    selected = [c for r in result.records for c in r["selected"]]
    assert len(misses) == sum(c % 3 == 1 for c in selected)
    for record in result.records:                                      # FedAvg over what came back
        assert 0.0 <= record["accuracy"] <= 100.0 and np.isfinite(record["loss"])
    assert result.summary["flower_misses"] == len(misses)


# ---------------------------------------------------------------------------------------------- deployment
def test_loopback_deployment_one_glfc_round_equals_in_process(tmp_path):
    """flower-superlink + 2 flower-supernode on 127.0.0.1 (insecure: loopback only), `flwr run` of the
    app for one GLFC round; every process is stopped by PID in LocalFederation.__exit__."""
    from python_api.engine.flower.local_deployment import LocalFederation
    from python_api.engine.runner import run_training
    from tests.glfc_tiny import TINY
    overrides = TINY + ["run.threads=1", "run.max_rounds=1"]
    expected = run_training("glfc", _glfc_cfg("run.max_rounds=1"), out_dir=tmp_path / "inprocess", verbose=False)
    fed = LocalFederation(num_supernodes=2, workdir=tmp_path / "fed")
    try:
        fed.start()
        out = fed.run({"method": "glfc", "config": "", "overrides": " ".join(overrides),
                       "out": str(tmp_path / "run"), "min-nodes": 2, "node-wait-s": 60.0}, timeout_s=420)
        metrics = tmp_path / "run" / "metrics.json"
        assert out.returncode == 0 and metrics.exists(), out.stdout[-3000:] + out.stderr[-2000:] + fed.logs()
    finally:
        fed.stop()
    assert all(proc.poll() is not None for _, proc in fed.processes)
    records = json.loads(metrics.read_text())["rounds"]
    assert len(records) == 1
    _close(expected.records[0], records[0])
    flower = json.loads((tmp_path / "run" / "flower.json").read_text())
    assert sorted(n["partition_id"] for n in flower["nodes"].values()) == [0, 1]


# ---------------------------------------------------------------------------------------------- discovery
def _hello(partition, role="client"):
    return {"partition_id": partition, "num_partitions": 4, "role": role, "pid": 1}


class _RegisteringGrid:
    """A grid whose nodes register one by one: get_node_ids() returns `seen(call)` on its n-th call."""

    def __init__(self, seen):
        self.seen, self.calls = seen, 0

    def get_node_ids(self):
        self.calls += 1
        return self.seen(self.calls)


def test_discovery_waits_for_the_proxy_node_then_names_who_answered(monkeypatch):
    """The race of issue 17: 3 client nodes answered before the proxy node had registered. Discovery now
    waits (up to node_wait_s) for every node the run needs, and its failure says which answered."""
    from python_api.engine.flower import control
    from python_api.engine.flower.transport import FlowerOptions
    hellos = {10: _hello(0), 11: _hello(1), 12: _hello(2), 13: _hello(3)}
    failures = {12: 2}                             # node 12's first two hellos fail (a busy node)

    def send_control(grid, node, kind, tree, timeout=None, device=None):
        assert kind == "__hello" and tree["method"] == "glfc"
        if failures.get(node):
            failures[node] -= 1
            raise RuntimeError(f"flower: node {node} failed {kind}: busy")
        return hellos[node]
    monkeypatch.setattr(control, "send_control", send_control)
    monkeypatch.setattr(control, "DISCOVERY_POLL_S", 0.0)
    options = FlowerOptions(min_nodes=3, proxy="node", proxy_partition=3, node_wait_s=60)
    grid = _RegisteringGrid(lambda call: [10, 11, 12] if call < 5 else [10, 11, 12, 13])
    info = control.discover_nodes(grid, "glfc", "cfg", options)
    assert sorted(info) == [10, 11, 12, 13] and grid.calls == 5      # waited for the proxy node to register
    # proxy=server needs no proxy node: 3 client nodes are enough
    failures[12] = 0
    grid = _RegisteringGrid(lambda call: [10, 11, 12])
    assert sorted(control.discover_nodes(grid, "glfc", "cfg", FlowerOptions(min_nodes=3, node_wait_s=60))) == [10, 11, 12]
    # the proxy node never comes: fail after node_wait_s, naming who answered and whose hello failed
    failures[11] = 10 ** 9
    options = FlowerOptions(min_nodes=2, proxy="node", proxy_partition=3, node_wait_s=0.2)
    with pytest.raises(TimeoutError) as info:
        control.discover_nodes(_RegisteringGrid(lambda call: [10, 11, 12]), "glfc", "cfg", options)
    text = str(info.value)
    assert "2 client nodes and a role=proxy node" in text and "2 client node(s) answered" in text, text
    assert "node 10 (partition 0, client)" in text and "node 12 (partition 2, client)" in text, text
    assert "failed hello: node 11" in text and "busy" in text, text


# ---------------------------------------------------------------------------------------------- failures
def _hang_first_glfc_training_on_partition_1(missed_marker, message, context):
    """A client that does not answer in time (reply-timeout-s): its first training message hangs until the
    server has recorded it as missed (the marker file), so the node's next request is served at once."""
    import threading
    from pathlib import Path
    if message.metadata.message_type == "train.glfc_round" and int(context.node_config["partition-id"]) == 1 \
            and not _HUNG:
        _HUNG.append(True)
        deadline = time.monotonic() + 10 * TIMEOUT_S
        while not Path(missed_marker).exists() and time.monotonic() < deadline:
            threading.Event().wait(0.2)


_HUNG: list = []
# Every other request must be answered within TIMEOUT_S, also on a loaded machine (one tiny client's round
# took over 30 s at load 10 with two busy loops): generous, since the hung client costs exactly this long.
TIMEOUT_S = 120.0


@pytest.mark.slow
def test_a_client_that_times_out_is_left_out_and_the_run_goes_on(tmp_path, monkeypatch):
    import functools
    from python_api.engine.flower import run_with_flower
    from python_api.engine.flower.client_app import build_client_app
    from python_api.engine.flower.transport import FlowerTransport
    missed_marker, record_miss = tmp_path / "missed", FlowerTransport._miss

    def record_miss_and_release_the_node(self, *args, **kwargs):
        record_miss(self, *args, **kwargs)
        missed_marker.touch()
    monkeypatch.setattr(FlowerTransport, "_miss", record_miss_and_release_the_node)
    hang = functools.partial(_hang_first_glfc_training_on_partition_1, str(missed_marker))
    result = run_with_flower("glfc", _glfc_cfg("run.max_rounds=2"), out_dir=tmp_path / "run", engine="flower-sim",
                             verbose=False, reply_timeout_s=TIMEOUT_S, client_app=build_client_app(hang))
    assert len(result.records) == 2
    misses = json.loads((tmp_path / "run" / "flower.json").read_text())["misses"]
    assert len(misses) == 1, misses
    assert misses[0]["kind"] == "train" and int(misses[0]["cid"]) % 3 == 1
    assert misses[0]["reason"] == f"no reply within {TIMEOUT_S} s"
    assert all(np.isfinite(r["loss"]) for r in result.records)


def _fail_fccl_local_update_on_partition_1(message, context):
    if message.metadata.message_type == "train.fccl_local" and int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("injected FCCL failure on partition 1")


@pytest.mark.slow
def test_a_failing_fccl_participant_is_left_out_of_its_local_phase(tmp_path):
    from python_api.engine.flower import run_with_flower
    from python_api.engine.flower.client_app import build_client_app
    result = run_with_flower("fccl", _fccl_cfg(tmp_path), out_dir=tmp_path / "run", engine="flower-sim", verbose=False,
                             client_app=build_client_app(_fail_fccl_local_update_on_partition_1))
    assert result.completed and len(result.records) == 2
    misses = json.loads((tmp_path / "run" / "flower.json").read_text())["misses"]
    assert len(misses) == 2 and all(m["kind"] == "local_update" and m["cid"] == "1" for m in misses), misses
    assert all("injected FCCL failure" in m["reason"] for m in misses)
    for record in result.records:      # participant 1's local loss is missing, participant 0's is there
        assert np.isnan(record["p1_inverted_local_loss"]) and np.isfinite(record["p0_plain_local_loss"])
        assert np.isfinite(record["mean_intra_top1"])


_PROXY_CALLS: list = []


def _fail_proxy_work_in_round_1(message, context):
    """The proxy node does round 0's work, then fails (the node's process counts its proxy messages)."""
    if message.metadata.message_type == "train.glfc_proxy":
        _PROXY_CALLS.append(True)
        if len(_PROXY_CALLS) > 1:
            raise RuntimeError("injected proxy-node failure")


@pytest.mark.slow
def test_a_failing_proxy_node_stops_the_run_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    from python_api.checkpoint import load_checkpoint
    from python_api.engine.flower import run_with_flower
    from python_api.engine.flower.client_app import build_client_app
    # (?s): under Ray the node's error carries its traceback, with newlines before the injected message
    with pytest.raises(RuntimeError, match=r"(?s)proxy=node: the GLFC proxy's work failed on the role=proxy node "
                                           r"\d+ .*injected proxy-node failure"):
        run_with_flower("glfc", _glfc_cfg("run.max_rounds=3"), out_dir=tmp_path / "run", engine="flower-sim",
                        verbose=False, proxy="node", client_app=build_client_app(_fail_proxy_work_in_round_1))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["round"] == 0
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]) == 1


def _nan_loss_in_round_1(message, context):
    """In the ClientApp's process: the first client training in round 1 gets a NaN loss."""
    if message.metadata.message_type == "train.glfc_round":
        from python_api.methods.glfc.client import GLFCClient
        if not getattr(GLFCClient.train, "nan_injected", False):
            train, poisoned = GLFCClient.train, []

            def train_with_nan(self, model, round_idx):
                if round_idx != 1 or poisoned:
                    return train(self, model, round_idx)
                poisoned.append(self.cid)
                real = self.ctx.loss_fn
                self.ctx.loss_fn = lambda *a, **k: real(*a, **k) * float("nan")
                try:
                    return train(self, model, round_idx)
                finally:
                    self.ctx.loss_fn = real
            train_with_nan.nan_injected = True
            GLFCClient.train = train_with_nan


def test_flower_nan_loss_stops_the_run_naming_round_client_and_term(tmp_path):
    from python_api.checkpoint import load_checkpoint
    from python_api.engine.flower.client_app import build_client_app
    from python_api.engine.flower.simulation import run_simulation_training
    from python_api.nonfinite import NonFiniteError
    with pytest.raises(NonFiniteError) as info:
        run_simulation_training("glfc", _glfc_cfg(), tmp_path / "run", num_supernodes=3,
                                client_app=build_client_app(_nan_loss_in_round_1), verbose=False)
    assert info.value.round == 1 and isinstance(info.value.client, int) and "glfc_loss" in info.value.term
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["round"] == 0
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]) == 1
