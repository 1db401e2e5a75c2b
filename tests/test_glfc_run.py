"""GLFC end to end on tiny synthetic data: run directory contract, resume equality, loss backends."""
import json

import pytest
import torch

import fcl_ext
from python_api.checkpoint import load_checkpoint
from python_api.engine.runner import run_training

from tests.glfc_tiny import tiny_config

COMPARED = ("accuracy", "per_task_accuracy", "loss", "signals_total", "num_gradients", "monitor_accuracy",
            "best_model_1_id", "best_model_2_id", "selected", "old_model_ids")


def test_tiny_run_end_to_end(tmp_path):
    result = run_training("glfc", tiny_config("proxy.psnr=true"), out_dir=tmp_path / "run")
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "metrics.csv", "checkpoints/last.pt", "plots/accuracy_vs_classes.png",
                 "plots/accuracy_matrix.png", "plots/accuracy_per_round.png", "plots/reconstructions.png"):
        assert (run / name).is_file(), name
    data = json.loads((run / "metrics.json").read_text())
    assert len(data["rounds"]) == 4
    s = data["summary"]
    for key in ("accuracy_matrix", "final_accuracy", "average_incremental_accuracy", "forgetting", "pycil"):
        assert key in s
    assert len(s["accuracy_matrix"]) == 2 and s["accuracy_matrix"][0][1] is None
    assert s["final_accuracy"] == data["rounds"][-1]["accuracy"] and s["completed"]
    r0, r2 = data["rounds"][0], data["rounds"][2]
    assert r0["classes_seen"] == 2 and r2["classes_seen"] == 4 and r2["task"] == 1
    assert r0["num_clients"] == 4 and r2["num_clients"] == 5      # one client joins at task 1
    assert r0["signals_total"] == 4                                # every fresh client fires (H = ln 2 > 0.3)
    assert r0["num_gradients"] == 2 * 2                            # 2 selected clients x 2 prototypes
    assert r0["label_recovery_accuracy"] == 100.0 and r0["psnr_mean"] is not None
    assert r2["distilling_clients"] >= 1                           # an old model reached the clients
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "accuracy" in header and "round_time_s" in header


def test_resume_reaches_the_same_metrics(tmp_path):
    full = run_training("glfc", tiny_config(), out_dir=tmp_path / "full")
    part = run_training("glfc", tiny_config("run.max_rounds=1"), out_dir=tmp_path / "part")
    assert not part.completed and len(part.records) == 1
    part = run_training("glfc", tiny_config("run.max_rounds=2"), out_dir=tmp_path / "part", resume=True)
    assert len(part.records) == 3                  # stopped again mid-task-1, after the task change
    resumed = run_training("glfc", tiny_config(), out_dir=tmp_path / "part", resume=True)
    assert resumed.completed and len(resumed.records) == len(full.records)
    for a, b in zip(full.records, resumed.records):
        for key in COMPARED:
            assert a[key] == b[key], (a["round"], key)
    sa = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["method_state"]["model"]
    sb = load_checkpoint(tmp_path / "part/checkpoints/last.pt")["method_state"]["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_training("glfc", tiny_config(), out_dir=tmp_path / "none", resume=True)


@pytest.mark.skipif(not hasattr(fcl_ext.ops, "glfc_loss"), reason="fcl_ext.ops.glfc_loss not in this build")
def test_loss_backends_agree(tmp_path):
    extra = ("run.max_rounds=3", "proxy.enabled=true")
    a = run_training("glfc", tiny_config("client.loss_backend=fcl_ext", *extra), out_dir=tmp_path / "fx")
    b = run_training("glfc", tiny_config("client.loss_backend=reference", *extra), out_dir=tmp_path / "ref")
    assert a.summary["loss_backend"] == "fcl_ext" and b.summary["loss_backend"] == "reference"
    for ra, rb in zip(a.records, b.records):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)
    sa = load_checkpoint(tmp_path / "fx/checkpoints/last.pt")["method_state"]["model"]
    sb = load_checkpoint(tmp_path / "ref/checkpoints/last.pt")["method_state"]["model"]
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4)


def test_clients_send_only_weights_and_prototype_gradients(tmp_path):
    """Without the PSNR audit, an update carries the model, counts, the signal and [K, P] gradients:
    no images, no labels of the prototypes (the proxy recovers them from the gradients)."""
    from python_api.engine import InProcessEngine
    from python_api.methods.glfc import GLFCServer
    server = GLFCServer(tiny_config(), tmp_path, torch.device("cpu"))      # default: proxy.psnr=false
    engine = InProcessEngine(server, progress=False)
    engine.audit = True
    record = server.run_round(0, engine)
    replies = [m for m in engine.messages_carried if m[0] == "reply"]
    assert {kind for _, kind, _, _ in replies} == {"update", "refreshed"}
    for _, kind, _, payload in replies:
        allowed = {"state", "num_samples", "signal", "loss", "proto_grads", "old_model_id"} if kind == "update" \
            else {"signal"}
        assert set(payload) <= allowed, set(payload) - allowed
        if kind == "update" and payload["proto_grads"] is not None:
            assert payload["proto_grads"].dim() == 2 and payload["proto_grads"].shape[0] == 2
    assert record["num_gradients"] == 4 and record["psnr_mean"] is None


# The CLI child of the kill test: it blocks inside round KILL_ROUND's local training (after round
# KILL_ROUND - 1's checkpoint) and says so in a marker file, so the parent kills it at a known point.
KILL_ROUND = 2
_BLOCKING_CHILD = """
import sys, threading
from pathlib import Path
from python_api.methods.glfc.client import GLFCClient
train = GLFCClient.train
def train_until_killed(self, model, round_idx):
    if round_idx == {round}:
        Path({marker!r}).write_text("in round {round}")
        threading.Event().wait()                 # until SIGKILL
    return train(self, model, round_idx)
GLFCClient.train = train_until_killed
from python_api.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL a CLI run in the middle of round 2 (rounds 0-1 checkpointed, the task change of round 2
    half done), resume it, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.glfc_tiny import TINY
    out, marker = tmp_path / "killed", tmp_path / "in-round"
    # the child must import exactly the modules this process uses (same fcl_ext build)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd()), *[p for p in sys.path if p]]))
    code = _BLOCKING_CHILD.format(round=KILL_ROUND, marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code, "train", "glfc", "--out", str(out), *TINY],
                            cwd=Path.cwd(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the child never reached round {KILL_ROUND} (exit {proc.poll()}): " + \
            (proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "still running")
        assert proc.poll() is None, "the child finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL                 # really killed, not finished
    assert load_checkpoint(out / "checkpoints" / "last.pt")["round"] == KILL_ROUND - 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == KILL_ROUND and not metrics["summary"].get("completed")
    resumed = run_training("glfc", tiny_config(), out_dir=out, resume=True)
    full = run_training("glfc", tiny_config(), out_dir=tmp_path / "full")
    assert resumed.completed and len(resumed.records) == len(full.records) == 4
    for a, b in zip(full.records, resumed.records):
        for key in COMPARED:
            assert a[key] == b[key], (a["round"], key)
