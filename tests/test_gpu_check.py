"""`make gpu-check` fails clearly where there is no GPU; the report generator renders runs."""
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
