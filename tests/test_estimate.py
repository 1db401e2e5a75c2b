"""Phase times in metrics.json and `fcl-ext estimate` (python_api/profiling.py) on the tiny GLFC setup."""
import json

import pytest

from python_api import profiling
from python_api.estimate import estimate, extrapolate_round, project_rounds
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


def test_sampled_loops_run_their_first_items_and_record_the_full_count():
    profiling.pop_details()
    with profiling.phase("local_training"):
        with profiling.sampling(2):
            seen = list(profiling.batches("training_steps", iter(range(10)), 10))
            with profiling.loop("steps", 1) as steps:
                assert steps == 1
            cheap = list(profiling.batches("cheap", iter(range(10)), 10))
        with profiling.sampling(2, min_seconds=60):   # cheap items: go on until the loop has run 60 s (or ends)
            more = list(profiling.batches("cheap", iter(range(10)), 10))
        with profiling.sampling(5, max_seconds=0.0):   # slow items: the first one is enough
            first = list(profiling.batches("slow", iter(range(10)), 10))
        everything = list(profiling.batches("training_steps", iter(range(10)), 10))   # not sampling: all
    assert seen == [0, 1] == cheap and everything == list(range(10)) == more and first == [0]
    details = profiling.pop_details()
    assert details["loops"]["local_training/training_steps"][1:3] == [2, 10]
    assert details["loops"]["local_training/cheap"][1:3] == [2 + 10, 20]
    assert details["loops"]["local_training/cheap"][4] == 2 and details["loops"]["local_training/steps"][4] == 0
    assert details["loops"]["local_training/steps"][1:3] == [1, 1] and "local_training" in details["paths"]
    with pytest.raises(ValueError, match="items"):
        with profiling.sampling(0):
            pass


def test_extrapolate_round_scales_every_sampled_loop_into_its_enclosing_phases():
    paths = {"local_training": 10.0, "local_training/entropy": 2.0, "evaluation": 5.0,
             "evaluation/client_setup": 3.0, "client_setup": 2.0}
    loops = {"local_training/training_steps": [4.0, 2, 20],          # 2 of 20 steps took 4 s -> 40 s in full
             "local_training/entropy/batches": [1.0, 1, 4],          # 1 of 4 batches took 1 s -> 4 s
             "evaluation/batches": [0.5, 3, 3]}                       # not cut: stays as measured
    ext = extrapolate_round(paths, loops, other=2.5)
    assert ext["paths"]["local_training"] == pytest.approx(10 + 36 + 3)
    assert ext["paths"]["local_training/entropy"] == pytest.approx(5.0)
    assert ext["loops"] == pytest.approx({"local_training/training_steps": 40.0,
                                          "local_training/entropy/batches": 4.0, "evaluation/batches": 0.5})
    # a participant's construction is paid once, not every round: out of its phase (and out of "other")
    assert ext["one_time"] == pytest.approx(5.0)
    # timed item by item: 2 s over the 2 later items -> 1 s an item, 21 in full; the first item's 2 s beyond
    # that is warm-up, paid once in the run (not every round)
    warm = extrapolate_round({"public_alignment": 6.0}, {"public_alignment/public_batches": [5.0, 3, 21, 3.0, 1]})
    assert warm["paths"]["public_alignment"] == pytest.approx(1.0 + 21 * 1.0)
    assert warm["one_time"] == pytest.approx(2.0) and warm["loops"] == {"public_alignment/public_batches": 21.0}
    assert ext["paths"]["evaluation"] == pytest.approx(2.0) and ext["other"] == pytest.approx(0.5)


def test_project_rounds_scales_per_unit_and_keeps_task_start_phases_to_task_starts():
    ext = extrapolate_round({"local_training": 30.0, "local_training/prototype_encoding": 6.0, "refresh": 4.0,
                             "proxy_reconstruction": 9.0, "proxy_reconstruction/reconstruction": 8.0,
                             "evaluation": 2.0},
                            {"local_training/training_steps": [20.0, 1, 1]}, other=1.0)
    measured = [{"ext": ext, "task_start": True,
                 "units": {"local_training": 2, "local_training/training_steps": 200, "refresh": 4, "evaluation": 10}}]
    plans = [{"task_start": True, "units": {"local_training": 2, "local_training/training_steps": 200, "refresh": 4,
                                            "evaluation": 10}},
             {"task_start": False, "units": {"local_training": 3, "local_training/training_steps": 600, "refresh": 9,
                                             "evaluation": 20}}]
    same, later = project_rounds(measured, plans, ("prototype_encoding", "reconstruction"))
    assert same == pytest.approx({"local_training": 30.0, "refresh": 4.0, "proxy_reconstruction": 9.0,
                                  "evaluation": 2.0, "other": 1.0})
    # per client: 2 s of other work (4 / 2); per image: 0.1 s of steps; no prototypes / reconstruction
    assert later == pytest.approx({"local_training": 3 * 2.0 + 600 * 0.1, "refresh": 9.0,
                                   "proxy_reconstruction": 1.0, "evaluation": 4.0, "other": 1.0})
    # a second measured round: every round's parts come from it (round 0 held first-use costs), the
    # task-start parts from round 0
    steady = extrapolate_round({"local_training": 12.0, "refresh": 2.0, "proxy_reconstruction": 1.0,
                                "evaluation": 2.0}, {"local_training/training_steps": [10.0, 1, 1]}, other=0.5)
    two = measured + [{"ext": steady, "task_start": False, "units": measured[0]["units"]}]
    first, later = project_rounds(two, plans, ("prototype_encoding", "reconstruction"))
    assert first == pytest.approx({"local_training": 2.0 + 6.0 + 10.0, "refresh": 2.0,
                                   "proxy_reconstruction": 1.0 + 8.0, "evaluation": 2.0, "other": 0.5})
    assert later["local_training"] == pytest.approx(3 * 1.0 + 600 * 0.05)


def test_estimate_samples_loops_and_clients_and_marks_what_it_extrapolated(tmp_path, capsys):
    """One client per send instead of 2 train + 2 refresh and the first batch of every loop: the table says
    which rows were measured and which extrapolated (from how many items / clients), and projects the run."""
    argv = ["estimate", "glfc", "--rounds", "1", "--sample-clients", "1", "--sample-batches", "1",
            "--sample-seconds", "0", "--out", str(tmp_path / "est")]
    assert main(argv + TINY + ["client.local_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "phase (round 0)" in out and "projected full run: 4 rounds" in out
    rounds = json.loads((tmp_path / "est" / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 1 and len(rounds[0]["selected"]) == 2
    samples = rounds[0]["phase_samples"]
    steps = samples["local_training/training_steps"]
    assert steps[1:3] == [1, 3 * 3]   # 1 of 3 epochs x 3 batches (48 images, batch 16)
    report = estimate("glfc", tiny_config("client.local_epochs=3"), rounds=1, sample_clients=1, sample_batches=1,
                      sample_seconds=0, out_dir=tmp_path / "est2", echo=lambda *_: None)
    assert report["messages"] == [{"train": [2, 1], "refresh": [2, 1]}]
    rows = {r[0].strip(): r for r in report["table_rows"]}
    assert "extrapolated: " in rows["local_training"][3] and "x2/1 clients" in rows["local_training"][3]
    assert rows["aggregation"][3] == "measured" and "extrapolated" in rows["reconstruction"][3]
    assert float(rows["local_training"][2]) > 2 * float(rows["local_training"][1])
    assert report["not_measured"] == ["herding"]   # task 0 has no earlier classes to herd
    rounds_s = [sum(r.values()) for r in report["projected_rounds_s"]]
    assert len(rounds_s) == 4 and rounds_s[1] < rounds_s[0]   # round 1: no prototypes, no reconstruction
    assert report["projected_total_s"] > report["setup_s"] + sum(rounds_s) - 1e-9


def test_fccl_rounds_record_phase_times(tmp_path):
    from tests.test_fccl_trainer import tiny_config as fccl_tiny
    result = run_training("fccl", fccl_tiny(tmp_path, fccl={"rounds": 2}), out_dir=tmp_path / "run", verbose=False)
    rounds = json.loads((result.run_dir / "metrics.json").read_text())["rounds"]
    for record in rounds:
        phases = record["phase_times_s"]
        for name in ("public_alignment", "local_training", "distillation", "evaluation", "other"):
            assert phases.get(name, 0) > 0 or name == "other", name
        top = sum(v for k, v in phases.items() if k in profiling.TOP_LEVEL)
        assert top == pytest.approx(record["round_time_s"], rel=0.01, abs=0.01)
    assert rounds[0]["phase_times_s"]["client_setup"] > 0 and "client_setup" not in rounds[1]["phase_times_s"]


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


@pytest.mark.slow   # ~4 min on the shared 2-core machine: full-size CIFAR-100 data, ResNet-18 at 32x32
def test_estimate_of_the_cifar100_preset_prints_within_five_minutes(tmp_path):
    """Issue 14: `fcl-ext estimate glfc --config glfc-cifar100-t10` on the same-size synthetic CIFAR-100 prints its
    phase table and projection within 5 minutes (writing the data set is not part of it)."""
    import os
    import subprocess
    import sys
    import time
    from python_api.data.synthetic import make_synthetic
    make_synthetic("cifar100", tmp_path / "data", progress=lambda *_: None)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "python_api.cli", "estimate", "glfc", "--config", "glfc-cifar100-t10",
                          "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "est")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    assert "phase (round 0)" in run.stdout and "projected full run: 100 rounds" in run.stdout
    assert "extrapolated: " in run.stdout and "x10/1 clients" in run.stdout and "x20/1 clients" in run.stdout
    assert took < 300, f"estimate took {took:.0f} s"


@pytest.mark.parametrize("arg, value", [("rounds", 0), ("sample_clients", -1), ("sample_batches", -2),
                                        ("sample_seconds", -1.0), ("sample_max_seconds", float("nan"))])
def test_estimate_refuses_a_bad_sampling_argument_naming_it(arg, value):
    from python_api.estimate import estimate
    with pytest.raises(ValueError, match=rf"estimate: {arg} must be >="):
        estimate("glfc", None, **{arg: value})   # refused before the config is read
