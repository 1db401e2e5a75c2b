"""`make gpu-check OUT=dir`: everything a GPU machine can show, in one command.

Uses the Python that already has torch (no venv, no downloads): builds fcl_ext in place with
CUDA required, runs the CUDA tests, runs the benchmarks at the GPU shapes, and writes into OUT:
env.txt, build.log, tests.log, bench.log, bench.json, perf/<machine>.json and performance.md.
Copy OUT/perf/*.json into docs/perf/ and run `python -m benchmarks.report` to publish them.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, log: Path, env=None, timeout=None):
    start = time.time()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    print(f"gpu-check: {' '.join(cmd[:4])} ... -> rc={proc.returncode} in {time.time() - start:.0f} s ({log.name})",
          flush=True)
    return proc.returncode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the report and logs")
    ap.add_argument("--bench-time", type=float, default=0.5, help="pytest-benchmark --benchmark-max-time")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    try:
        import torch
    except ImportError:
        sys.exit("gpu-check: torch is not installed in this Python; use PYTHON=/path/to/python with torch >= 2.4")
    if not torch.cuda.is_available() or torch.version.cuda is None:
        sys.exit(f"gpu-check: no usable CUDA GPU here (torch {torch.__version__}, cuda "
                 f"{torch.version.cuda}, cuda available: {torch.cuda.is_available()}); run it on a GPU machine")
    missing = [m for m in ("numpy", "pytest", "pytest_benchmark", "hypothesis") if not _importable(m)]
    if missing:
        sys.exit(f"gpu-check: missing Python packages: {', '.join(missing)}")

    env_txt = [f"python {sys.version}", f"torch {torch.__version__} cuda {torch.version.cuda}",
               f"gpu {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"]
    if shutil.which("nvidia-smi"):
        env_txt.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    (out / "env.txt").write_text("\n".join(env_txt))

    env = dict(os.environ, FCL_EXT_CUDA="1")
    env.setdefault("MAX_JOBS", str(min(16, os.cpu_count() or 4)))
    rc = run([sys.executable, "setup.py", "build_ext", "--inplace"], out / "build.log", env=env, timeout=900)
    if rc != 0:
        sys.exit(f"gpu-check: the CUDA build failed; see {out / 'build.log'}")

    rc_tests = run([sys.executable, "-m", "pytest", "tests", "-q", "-m", "not slow", "-k", "cuda or build",
                    "-p", "no:cacheprovider"], out / "tests.log", timeout=900)
    rc_bench = run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-k", "cuda", "-p", "no:cacheprovider",
                    f"--benchmark-max-time={args.bench_time}", "--benchmark-min-rounds=5",
                    f"--benchmark-json={out / 'bench.json'}", "--benchmark-group-by=group",
                    "--benchmark-columns=median,iqr,rounds"], out / "bench.log", timeout=1200)
    if (out / "bench.json").exists():
        docs = out / "docs"
        if (ROOT / "docs" / "perf").exists():
            shutil.copytree(ROOT / "docs" / "perf", docs / "perf", dirs_exist_ok=True)
        run([sys.executable, "-m", "benchmarks.report", str(out / "bench.json"), "--docs", str(docs)],
            out / "report.log")
        shutil.copy2(docs / "performance.md", out / "performance.md")
    print(f"gpu-check: tests rc={rc_tests}, benchmarks rc={rc_bench}; report in {out}")
    sys.exit(1 if (rc_tests or rc_bench) else 0)


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
