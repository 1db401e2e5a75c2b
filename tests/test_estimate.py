"""Phase times in metrics.json and `fcl-ext estimate` (python_api/profiling.py) on the tiny GLFC setup."""
import json

import pytest

from python_api import profiling
from python_api.estimate import estimate
from python_api.cli import main
from python_api.engine.runner import run_training

from tests.glfc_tiny import TINY, tiny_config


def test_phase_timer_nests_logs_long_phases_and_resets(capsys, monkeypatch):
    monkeypatch.setattr(profiling, "LOG_AFTER_S", 0.0)
    profiling.pop_round()
    with profiling.phase("refresh", "client 3"):
        with profiling.phase("entropy"):
            pass
    with profiling.phase("refresh"):
        pass
    times, counts = profiling.pop_round(with_counts=True)
    assert set(times) == {"refresh", "entropy"} and counts == {"refresh": 2, "entropy": 1}
    assert times["refresh"] >= times["entropy"] >= 0
    assert "[phase] refresh client 3:" in capsys.readouterr().err
    assert profiling.pop_round() == {}


def test_metrics_json_records_each_rounds_phase_times(tmp_path):
    result = run_training("glfc", tiny_config("run.max_rounds=2"), out_dir=tmp_path / "run")
    rounds = json.loads((result.run_dir / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 2 and result.summary["rounds_total"] == 4
    for record in rounds:
        phases = record["phase_times_s"]
        for name in ("local_training", "refresh", "entropy", "proxy_reconstruction", "aggregation", "evaluation",
                     "other"):
            assert name in phases, name
        top = sum(v for k, v in phases.items() if k in profiling.TOP_LEVEL)
        assert top == pytest.approx(record["round_time_s"], rel=0.01, abs=0.01)
        assert phases["entropy"] <= phases["local_training"] + phases["refresh"]
        assert record["runtime_peak_rss_mb"] > 0


def test_estimate_scales_sampled_clients_and_epochs(tmp_path, capsys):
    """One client per send instead of 2 train + 2 refresh: local training and refresh are scaled x2, the
    epoch part of local training by the configured epochs; the table and the projection are printed."""
    argv = ["estimate", "glfc", "--rounds", "1", "--sample-clients", "1", "--out", str(tmp_path / "est")]
    assert main(argv + TINY + ["client.local_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "phase (per round)" in out and "projected full run: 4 rounds" in out
    rounds = json.loads((tmp_path / "est" / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 1 and len(rounds[0]["selected"]) == 2
    report = estimate("glfc", tiny_config("client.local_epochs=3"), rounds=1, sample_clients=1,
                                out_dir=tmp_path / "est2", echo=lambda *_: None)
    assert report["messages"] == {"train": [2, 1], "refresh": [2, 1]}
    m, p = report["phase_times_s"], report["projected_round_s"]
    fixed = 2 * sum(m.get(k, 0.0) for k in ("entropy", "herding", "prototype_encoding"))
    assert p["local_training"] == pytest.approx(fixed + (2 * m["local_training"] - fixed) * 3)
    assert p["refresh"] == pytest.approx(2 * m["refresh"])
    assert report["projected_total_s"] > report["setup_s"] + 4 * (p["local_training"] + p["refresh"])


@pytest.mark.slow   # two ResNet-18 processes, minutes on a busy 2-core machine
def test_keep_freed_memory_stops_the_page_fault_storm_with_the_same_values():
    """benchmarks/page_faults.py in fresh processes: ResNet-18 SGD steps fault far less with keep_freed_memory,
    and the loss is the same bit for bit."""
    import os
    import re
    import subprocess
    import sys
    out = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-m", "benchmarks.page_faults", mode], capture_output=True, text=True,
                             timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        faults = int(re.search(r"(\d+) minor faults/step", run.stdout).group(1))
        loss = re.search(r"last loss (\S+)", run.stdout).group(1)
        out[mode] = (faults, loss)
    assert out["default"][1] == out["keep"][1]
    assert out["keep"][0] < out["default"][0] / 5
