"""benchmarks/compare_builds.py: two checkouts timed alternately with one harness."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare_builds

ROOT = Path(__file__).resolve().parents[1]


def test_table_gives_the_ratio_of_the_medians_of_the_rounds():
    results = {("softmax_entropy | fwd | cpu | float32 | B=8,C=4", "fcl_ext"): {"old": [2e-6, 4e-6, 100e-6],
                                                                               "new": [3e-6, 3e-6, 3e-6]},
               ("softmax_entropy | fwd | cpu | float32 | B=9,C=4", "fcl_ext"): {"old": [1e-3], "new": []}}
    text = compare_builds.table(results, "old `a`", "new `b`")
    rows = [line for line in text.splitlines() if line.startswith("| softmax")]
    assert len(rows) == 1  # a case measured on one side only has no ratio
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:6] == ["softmax_entropy", "fwd", "cpu", "float32", "B=8,C=4", "fcl_ext"]
    assert cells[6:] == ["4.0 µs", "3.0 µs", "0.75×"]  # medians 4 us and 3 us: an outlier round does not count


def test_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_builds.main(["--old", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--old" in err and "no fcl_ext package" in err
    (tmp_path / "fcl_ext").mkdir()
    with pytest.raises(SystemExit):
        compare_builds.main(["--old", str(tmp_path)])
    assert "no built extension" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_builds.main(["--old", str(ROOT), "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_the_harness_times_the_package_it_is_pointed_at(tmp_path):
    """FCL_EXT_BENCH_PACKAGE makes the benchmark session import fcl_ext from that checkout, or refuse."""
    if not list((ROOT / "fcl_ext").glob("_C*.so")):
        pytest.skip("extension not built in place")
    env = dict(os.environ, FCL_EXT_BENCH_SMOKE="1", FCL_EXT_BENCH_PACKAGE=str(tmp_path))
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "benchmarks/test_bench_softmax_entropy.py",
           "-k", "fcl_ext and fwd and not bwd", "--benchmark-json", str(out)]
    # an empty directory: fcl_ext still resolves to this checkout, which the conftest must refuse
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "FCL_EXT_BENCH_PACKAGE" in proc.stdout + proc.stderr
    env["FCL_EXT_BENCH_PACKAGE"] = str(ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    timed = json.loads(out.read_text())["benchmarks"]
    assert timed and all(b["extra_info"]["impl"] == "fcl_ext" for b in timed)


def test_report_includes_the_side_by_side_table(tmp_path):
    from benchmarks import report
    docs = tmp_path / "docs"
    (docs / "perf").mkdir(parents=True)
    (docs / "perf" / "COMPARE.md").write_text("| op | x |\n|---|---|\n| softmax_entropy | 0.97× |\n")
    report.regenerate(docs)
    text = (docs / "performance.md").read_text()
    assert "side by side" in text and "| softmax_entropy | 0.97× |" in text
