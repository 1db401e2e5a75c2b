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


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL a CLI run once its first checkpoint exists, resume it, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.glfc_tiny import TINY
    out = tmp_path / "killed"
    # the child must import exactly the modules this process uses (same fcl_ext build)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd()), *[p for p in sys.path if p]]))
    proc = subprocess.Popen([sys.executable, "-m", "python_api", "train", "glfc", "--out", str(out), *TINY],
                            cwd=Path.cwd(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "checkpoints" / "last.pt").exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = load_checkpoint(out / "checkpoints" / "last.pt")["round"]
    resumed = run_training("glfc", tiny_config(), out_dir=out, resume=True)
    full = run_training("glfc", tiny_config(), out_dir=tmp_path / "full")
    assert resumed.completed and len(resumed.records) == len(full.records) == 4
    if proc.returncode != 0:                      # killed (-9) before the end, as intended
        assert done < 3
    for a, b in zip(full.records, resumed.records):
        for key in COMPARED:
            assert a[key] == b[key], (a["round"], key)
