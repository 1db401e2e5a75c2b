"""`make gpu-check` fails clearly where there is no GPU; its plan (what it would run, in what time) is
checked here without one; the summary and the report generator render runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would really run")
def test_gpu_check_without_gpu_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no usable CUDA GPU" in proc.stderr


def test_report_renders_ratios_and_keeps_other_machines(tmp_path):
    from benchmarks import report

    def bench(group, impl, median, device="cuda"):
        return {"name": f"t[{impl}]", "group": group, "stats": {"median": median, "iqr": 0.0, "rounds": 5},
                "extra_info": {"op": "softmax_entropy", "mode": "fwd", "device": device, "dtype": "float32",
                               "shape": "B=2,C=3", "impl": impl, "bytes_moved": 2e9, "peak_mem_bytes": 2**20}}
    g = "softmax_entropy | fwd | cuda | float32 | B=2,C=3"
    run = {"machine_info": {"fcl_ext_gpu": "NVIDIA H100 80GB HBM3", "fcl_ext_torch": "2.x",
                            "cpu": {"brand_raw": "X", "count": 16}},
           "commit_info": {"id": "abcdef1234567"}, "datetime": "2026-01-01T00:00:00",
           "benchmarks": [bench(g, "fcl_ext", 1e-3), bench(g, "eager", 4e-3), bench(g, "compiled", 2e-3)]}
    docs = tmp_path / "docs"
    (docs / "perf").mkdir(parents=True)
    (docs / "perf" / "other-machine.json").write_text(json.dumps(
        {"machine": "other-machine", "cpu": "Old CPU", "cores": 2, "gpu": None, "torch": "2.x", "python": "3",
         "commit": "0", "date": "2025", "rows": []}))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    report.main([str(path), "--docs", str(docs)])
    text = (docs / "performance.md").read_text()
    assert "0.25×" in text and "0.50×" in text  # ours/eager, ours/compiled
    assert "2000 GB/s (60% of 3350)" in text
    assert "Old CPU" in text  # the other machine's section is kept
    assert (docs / "perf" / "nvidia-h100-80gb-hbm3.json").exists()


def _plan(tmp_path, **kw):
    from benchmarks import gpu_check
    return gpu_check, gpu_check.plan(tmp_path, python="python3", cpu_count=16, arch="9.0", **kw)


def test_gpu_check_plan_fits_in_eight_minutes(tmp_path):
    gpu_check, steps = _plan(tmp_path)
    assert gpu_check.TOTAL_BUDGET_S <= 480
    assert gpu_check.plan_budget(steps) <= gpu_check.TOTAL_BUDGET_S
    assert all(s.budget_s > 0 for s in steps)
    names = [s.name for s in steps]
    assert names[0] == "build" and "tests" in names and "correctness" in names and "trainers" in names
    assert sum(n.startswith("bench:") for n in names) == len(gpu_check.BENCH_FILES)
    # the trainers run in the background and are joined before the timed benchmarks
    assert next(s for s in steps if s.name == "trainers").background
    assert names.index(gpu_check.JOIN_AFTER["trainers"]) < min(i for i, n in enumerate(names) if n.startswith("bench:"))


def test_gpu_check_plan_builds_with_all_cores_for_the_visible_arch_only(tmp_path):
    _, steps = _plan(tmp_path)
    build = steps[0]
    assert build.env["MAX_JOBS"] == "16" and build.env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert build.env["FCL_EXT_CUDA"] == "1"


def test_gpu_check_plan_runs_cuda_tests_by_explicit_file_list(tmp_path):
    gpu_check, steps = _plan(tmp_path)
    tests = next(s for s in steps if s.name == "tests")
    files = [a for a in tests.argv if a.startswith("tests/")]
    assert files == gpu_check.CUDA_TEST_FILES + gpu_check.CUDA_ONLY_TEST_FILES
    assert "tests/test_build.py" not in files and "tests/test_cuda_paths.py" in files
    assert all((ROOT / f).exists() for f in files)
    # none of them needs the optional trainer dependencies (yaml, matplotlib) to be collected
    for f in files:
        text = (ROOT / f).read_text()
        assert "import yaml" not in text and "matplotlib" not in text and "python_api" not in text


def test_gpu_check_plan_benchmarks_compile_only_the_main_shape(tmp_path):
    gpu_check, steps = _plan(tmp_path)
    for s in steps:
        if s.name.startswith("bench:"):
            assert s.env["FCL_EXT_BENCH_COMPILE"] == "main"
            assert any(a.startswith("--benchmark-json=") for a in s.argv)
            assert s.argv[s.argv.index("-k") + 1].startswith("cuda")


def test_gpu_check_plan_reconstruction_reference_is_small_on_the_gpu():
    from benchmarks.shapes import SHAPES
    from benchmarks.test_bench_reconstruct import SEQUENTIAL_CUDA_MAX
    assert SEQUENTIAL_CUDA_MAX["K"] <= 6 and SEQUENTIAL_CUDA_MAX["steps"] <= 20
    cuda = dict(SHAPES["reconstruct"]["cuda"])
    assert any(d["K"] <= 6 and d["steps"] <= 20 for d in cuda.values())  # the sequential run that is measured
    assert any(d["K"] == 60 and d["steps"] == 250 for d in cuda.values())  # the batched run it is extrapolated to


def test_gpu_check_plan_cli_needs_no_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--plan", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["plan_budget_s"] <= plan["total_budget_s"] <= 480
    assert [s["name"] for s in plan["steps"]][0] == "build"


def test_gpu_check_runner_catches_failures_and_timeouts(tmp_path):
    from benchmarks import gpu_check
    runner = gpu_check.Runner(tmp_path, total_s=60)
    ok = gpu_check.Step("ok", [sys.executable, "-c", "print('hi')"], 20, "ok.log")
    bad = gpu_check.Step("bad", [sys.executable, "-c", "raise SystemExit(3)"], 20, "bad.log")
    slow = gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1, "slow.log")
    assert runner.run(ok) == 0 and runner.run(bad) == 3
    # a step may use time earlier steps left, never the later steps' budgets: here none is left over
    assert runner.run(slow, later_budget_s=runner.remaining()) is None
    assert runner.results["ok"]["status"] == "ok"
    assert runner.results["bad"]["status"] == "failed (rc=3)"
    assert runner.results["slow"]["status"].startswith("timed out")
    assert "hi" in (tmp_path / "ok.log").read_text()


def test_gpu_summary_writes_one_file_per_op_from_partial_results(tmp_path):
    from benchmarks import gpu_summary
    (tmp_path / "bench").mkdir()
    (tmp_path / "copy_bw.json").write_text(json.dumps({"gb_per_s": 4000.0, "device": "NVIDIA H200"}))
    (tmp_path / "correct.json").write_text(json.dumps({"tolerance": 2e-4, "cases": [
        {"op": "softmax_entropy", "shape": "B=2,C=3", "path": "warp per row", "ok": True,
         "value_err": {"cuda_vs_ref": 1e-7, "cpu_vs_ref": 1e-7, "cuda_vs_cpu": 0.0},
         "grad_err": {"cuda_vs_ref": 1e-7, "cpu_vs_ref": 1e-7, "cuda_vs_cpu": 0.0}},
        {"op": "glfc_loss", "shape": "N=2,C=3", "path": "warp per row", "ok": False, "error": "Traceback\nBoom"}]}))

    def bench(impl, median, op="softmax_entropy (eps=0)", shape="B=2,C=3"):
        return {"name": f"t[{impl}]", "group": f"{op} | fwd | cuda | float32 | {shape}",
                "stats": {"median": median, "iqr": 0.0, "rounds": 5},
                "extra_info": {"op": op, "mode": "fwd", "device": "cuda", "dtype": "float32", "shape": shape,
                               "impl": impl, "bytes_moved": 2e9, "peak_mem_bytes": 2**20}}
    rec = [bench("batched", 2.0, "reconstruct", "K=60,steps=250"), bench("sequential", 1.0, "reconstruct", "K=6,steps=20")]
    (tmp_path / "bench" / "a.json").write_text(json.dumps({
        "machine_info": {"fcl_ext_gpu": "NVIDIA H200", "cpu": {"brand_raw": "X", "count": 16}},
        "commit_info": {"id": "abc"}, "datetime": "2026",
        "benchmarks": [bench("fcl_ext", 1e-3), bench("eager", 4e-3), bench("compiled", 2e-3)] + rec}))
    steps = {"build": {"status": "ok", "rc": 0, "seconds": 100, "log": "build.log", "budget_s": 180},
             "tests": {"status": "timed out after 75 s (budget 75 s)", "rc": None, "seconds": 75, "log": "tests.log",
                       "budget_s": 75}}
    gpu_summary.write(tmp_path, steps, started=0.0)
    text = (tmp_path / "summary.md").read_text()
    assert "4000 GB/s" in text and "timed out" in text
    assert "0.25×" in text and "0.50×" in text and "| 2000 | 50% |" in text
    assert "ERROR: Boom" in text
    assert "Extrapolated, not measured" in text and "~125.0 s" in text  # 1 s x 10 (K) x 12.5 (steps)
    assert (tmp_path / "ops" / "softmax_entropy.md").exists() and (tmp_path / "ops" / "glfc_loss.md").exists()
    assert "No comparison written" in text  # the trainers step left nothing
    assert json.loads((tmp_path / "summary.json").read_text())["ops"]["softmax_entropy"]


def test_gpu_check_trainer_comparison():
    from benchmarks.gpu_correctness import _accuracies, compare_runs
    summary = {"final_accuracy": 80.0, "mean_intra_top1": 55.0, "forgetting": 3.0, "report": "text", "flag": True}
    assert _accuracies(summary) == {"final_accuracy": 80.0, "mean_intra_top1": 55.0}
    runs = {"glfc-fcl_ext-cuda": {"summary": {"final_accuracy": 80.0}},
            "glfc-fcl_ext-cpu": {"summary": {"final_accuracy": 75.0}},
            "glfc-reference-cuda": {"summary": {"final_accuracy": 80.0}},
            "glfc-reference-cpu": {"summary": {"final_accuracy": 60.0}}}
    got = {c["backend"]: c["ok"] for c in compare_runs(runs, ["glfc", "fccl"], 10.0) if c["run"] == "glfc"}
    assert got == {"fcl_ext": True, "reference": False}
    assert not any(c["ok"] for c in compare_runs(runs, ["fccl"], 10.0))  # a run that never finished fails
    runs["glfc-fcl_ext-cpu"]["summary"]["final_accuracy"] = float("nan")
    assert not compare_runs(runs, ["glfc"], 10.0)[0]["ok"]  # NaN accuracy fails
