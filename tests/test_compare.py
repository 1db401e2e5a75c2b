"""`fcl-ext compare`: plans, skip / resume, --jobs 2 == --jobs 1, the table and plots."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from python_api import compare
from python_api.config import ConfigError
from python_api.engine.runner import run_training

from tests.glfc_tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
# GLFC's tiny stream with one round per task: each run takes a few seconds
OVERRIDES = [o for o in TINY if not o.startswith(("run.progress", "run.threads"))] + ["federated.rounds_per_task=1"]
NUMBERS = ("final_accuracy", "average_incremental_accuracy", "forgetting", "nme_final_accuracy", "task_end_accuracy")


def _specs():
    return compare.plan_from_names(["finetune", "icarl"], [0, 1], OVERRIDES)


def _numbers(result):
    return [(r["label"], r["seed"], [r[k] for k in NUMBERS]) for r in result["runs"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = compare.run_compare(_specs(), out, jobs=1, log=lambda *_: None)
    return out, result


def test_outputs_and_table(reference):
    out, result = reference
    for name in ("compare.json", "compare.csv", "compare.md", "accuracy_vs_classes.png"):
        assert (out / name).is_file(), name
    assert [r["action"] for r in result["runs"]] == ["ran"] * 4 and not result["failures"]
    agg = {a["label"]: a for a in result["aggregates"]}
    fin = [r["final_accuracy"] for r in result["runs"] if r["label"] == "finetune"]
    assert agg["finetune"]["seeds"] == 2
    assert agg["finetune"]["final_accuracy_mean"] == pytest.approx(sum(fin) / 2)
    assert agg["finetune"]["final_accuracy_std"] == pytest.approx(abs(fin[0] - fin[1]) / 2 ** 0.5)
    assert agg["icarl"]["nme_final_accuracy_mean"] is not None
    md = (out / "compare.md").read_text()
    assert "| finetune | 2 |" in md and "NME final acc" in md and "±" in md
    assert len((out / "compare.csv").read_text().splitlines()) == 5
    assert json.loads((out / "compare.json").read_text())["aggregates"][0]["label"] == "finetune"


def test_second_call_skips_complete_runs(reference):
    out, result = reference
    logs = []
    again = compare.run_compare(_specs(), out, jobs=1, log=logs.append)
    assert [r["action"] for r in again["runs"]] == ["skipped"] * 4
    assert any("run 4 of 4" in line and "skipped" in line for line in logs)
    assert _numbers(again) == _numbers(result)


@pytest.mark.slow      # spawns two worker processes that each import torch: ~20 s idle, minutes on a busy machine
def test_jobs_2_gives_the_numbers_of_jobs_1(reference, tmp_path):
    _, result = reference
    parallel = compare.run_compare(_specs(), tmp_path / "jobs2", jobs=2, log=lambda *_: None)
    assert _numbers(parallel) == _numbers(result)
    assert (tmp_path / "jobs2" / "compare.md").read_text() == (reference[0] / "compare.md").read_text()


def test_interrupted_run_is_resumed(reference, tmp_path):
    _, result = reference
    out = tmp_path / "partial"
    spec = _specs()[1]                                   # finetune seed 1 stopped after its first round
    cfg = compare.resolve(spec, threads=1)
    cfg.run.max_rounds = 1
    run_training(spec.method, cfg, out_dir=spec.run_dir(out), verbose=False)
    again = compare.run_compare(_specs(), out, jobs=1, log=lambda *_: None)
    assert [r["action"] for r in again["runs"]] == ["ran", "resumed", "ran", "ran"]
    assert _numbers(again) == _numbers(result)


@pytest.mark.slow      # a compare subprocess killed mid-way, then resumed: ~20 s idle
def test_killed_compare_resumes_to_the_same_table(reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "python_api.cli", "compare", "finetune", "icarl", *OVERRIDES,
           "--seeds", "0", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "finetune" / "seed0" / "metrics.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:     # kill once the first run is complete, mid-way through the plan
            if first.exists() and (json.loads(first.read_text()).get("summary") or {}).get("completed"):
                break
            assert proc.poll() is None, "compare finished before it could be interrupted"
            time.sleep(0.05)
        else:
            pytest.fail("the first run did not complete within the deadline")
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "compare.md").exists()
    again = compare.run_compare(_specs(), out, jobs=1, log=lambda *_: None)
    assert again["runs"][0]["action"] == "skipped"
    assert (out / "compare.md").read_text() == (reference[0] / "compare.md").read_text()
    assert _numbers(again) == _numbers(reference[1])


def test_plan_file_and_errors(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("seeds: [3, 4]\noverrides: [run.device=cpu]\nruns:\n"
                    "  - preset: lwf-demo\n  - method: lwf\n    config: lwf-demo\n    label: lwf-T1\n"
                    "    overrides: [lwf.temperature=1]\n")
    specs = compare.plan_from_yaml(plan)
    assert [(s.label, s.method, s.seed) for s in specs] == [("lwf-demo", "lwf", 3), ("lwf-demo", "lwf", 4),
                                                            ("lwf-T1", "lwf", 3), ("lwf-T1", "lwf", 4)]
    assert specs[2].overrides == ["run.device=cpu", "lwf.temperature=1"]
    assert compare.resolve(specs[2], threads=1).lwf.temperature == 1.0
    with pytest.raises(ConfigError, match="appears twice"):
        compare.plan_from_names(["lwf", "lwf"], [0])
    with pytest.raises(ConfigError, match="neither a preset"):
        compare.plan_from_names(["no-such-thing"], [0])
    plan.write_text("runs:\n  - preset: lwf-demo\n    seed: 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        compare.plan_from_yaml(plan)


def test_a_directory_with_another_config_is_an_error(reference, tmp_path):
    out = reference[0]
    specs = compare.plan_from_names(["finetune"], [0], OVERRIDES + ["client.lr=0.1"])
    with pytest.raises(ConfigError, match="different config"):
        compare.run_compare(specs, out, jobs=1, log=lambda *_: None)


def test_heterogeneous_table_and_bars(tmp_path):
    runs = [{"label": "fml", "method": "fccl", "seed": s, "completed": True, "final_accuracy": None,
             "average_incremental_accuracy": None, "forgetting": None, "nme_final_accuracy": None,
             "intra": intra, "inter": inter, "classes_seen": None, "task_end_accuracy": None}
            for s, (intra, inter) in enumerate([(60.0, 30.0), (70.0, 40.0)])]
    agg = compare.aggregate(runs)
    assert agg[0]["kind"] == "heterogeneous" and agg[0]["intra_mean"] == 65.0
    assert agg[0]["inter_std"] == pytest.approx(50 ** 0.5)
    md = compare.markdown_table(agg)
    assert "| fml | 2 | 65.00 ± 7.07 | 35.00 ± 7.07 |" in md
    assert compare.write_plots(agg, tmp_path) == [str(tmp_path / "intra_inter.png")]
