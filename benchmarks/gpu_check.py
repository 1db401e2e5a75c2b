"""`make gpu-check OUT=dir`: everything a GPU machine can show, in one command of at most 8 minutes.

Uses the Python that already has torch (no venv, no downloads, no network). Steps, each with its own
time budget inside one global deadline; every failure or timeout is caught and logged, and the summary
is always written:

  env          versions, nvidia-smi                                    -> env.txt
  build        setup.py build_ext --inplace, all cores, the visible GPU's arch only -> build.log
  correctness  per op at its main GPU shape: CUDA vs CPU kernel vs float64 reference (values and
               gradients), plus the measured device-to-device copy bandwidth -> correct.json, copy_bw.json
  trainers     glfc-demo (2 tasks) and fccl-demo (2 rounds), both loss backends, on cuda and on cpu, in
               parallel; metrics compared within TRAINER_TOLERANCE -> trainers.json, trainers/*.log
  tests        the CUDA tests, by explicit file list                   -> tests.log
  bench:<file> the benchmarks at the GPU shapes, one pytest run per file with its own budget; torch.compile
               only at each op's main shape (fwd+bwd); the sequential reconstruction only at K <= 6, 20 steps
               -> bench/<file>.json, bench/<file>.log
  summary      per op: correct?, time vs eager vs compiled, GB/s and % of copy bandwidth, peak memory
               -> summary.md (all ops), ops/<op>.md (one per op), summary.json, performance.md

`python -m benchmarks.gpu_check --plan` prints the plan (steps, commands, budgets) without a GPU.
Copy OUT/perf/*.json into docs/perf/ and run `python -m benchmarks.report` to publish the numbers.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TOTAL_BUDGET_S = 480        # the whole command, start to summary (the 8 minutes)
SUMMARY_RESERVE_S = 15      # kept back from every step for the summary
BUILD_BUDGET_S = 240
CORRECTNESS_BUDGET_S = 35
TRAINERS_BUDGET_S = 95      # in the background, next to correctness and tests (joined after tests)
TESTS_BUDGET_S = 60
BENCH_BUDGET_S = {          # per benchmark file (or part of one)
    "softmax_entropy": 15,
    "glfc_loss": 20,
    "dual_distillation": 20,
    "cross_correlation": 25,
    "reconstruct_ops": 20,
    "reconstruct_runs": 30,
}
BENCH_FILES = {
    "softmax_entropy": ("benchmarks/test_bench_softmax_entropy.py", None),
    "glfc_loss": ("benchmarks/test_bench_glfc_loss.py", None),
    "dual_distillation": ("benchmarks/test_bench_dual_distillation.py", None),
    "cross_correlation": ("benchmarks/test_bench_cross_correlation.py", None),
    "reconstruct_ops": ("benchmarks/test_bench_reconstruct.py", "not test_reconstruct"),
    "reconstruct_runs": ("benchmarks/test_bench_reconstruct.py", "test_reconstruct"),
}
# The CUDA tests: files whose tests take a `device` parameter ("-k cuda" picks their CUDA cases), and the
# files that are CUDA-only. Never tests/test_build.py (a CPU-only rebuild) nor the trainer tests.
CUDA_TEST_FILES = ["tests/test_softmax_entropy.py", "tests/test_glfc_loss.py", "tests/test_cross_correlation.py",
                   "tests/test_dual_distillation.py", "tests/test_gradient_matching.py", "tests/test_reconstruct.py"]
CUDA_ONLY_TEST_FILES = ["tests/test_cuda_paths.py"]
# GPU and CPU training differ in summation order and cuDNN algorithms, so the runs drift apart; after
# 2 tasks / 2 rounds on the bundled digits their accuracies (percent) must agree within this many points.
TRAINER_TOLERANCE = 10.0
TRAINER_RUNS = [  # (name, method, preset, overrides)
    ("glfc", "glfc", "glfc-demo", ["federated.num_tasks=2"]),
    ("fccl", "fccl", "fccl-demo", ["fccl.rounds=2", "pretrain.epochs=2"]),
]
BACKEND_KEY = {"glfc": "client.loss_backend", "fccl": "fccl.loss_backend"}


@dataclass
class Step:
    name: str
    argv: list
    budget_s: float
    log: str
    env: dict = field(default_factory=dict)
    background: bool = False
    outputs: list = field(default_factory=list)


def plan(out: Path, python: str = sys.executable, cpu_count: int = None, arch: str = "9.0",
         bench_time: float = 0.05):
    """The steps gpu-check runs, in order (pure: no GPU, no side effects)."""
    cpu_count = cpu_count or os.cpu_count() or 4
    steps = [Step("build", [python, "setup.py", "build_ext", "--inplace"], BUILD_BUDGET_S, "build.log",
                  env={"FCL_EXT_CUDA": "1", "MAX_JOBS": str(cpu_count), "TORCH_CUDA_ARCH_LIST": arch})]
    steps.append(Step("trainers", [python, "-m", "benchmarks.gpu_check", "--step", "trainers", "--out", str(out)],
                      TRAINERS_BUDGET_S, "trainers.log", background=True, outputs=["trainers.json"]))
    steps.append(Step("correctness", [python, "-m", "benchmarks.gpu_check", "--step", "correctness", "--out",
                                      str(out)], CORRECTNESS_BUDGET_S, "correctness.log",
                      outputs=["correct.json", "copy_bw.json"]))
    steps.append(Step("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                                "-k", "cuda", *CUDA_TEST_FILES, *CUDA_ONLY_TEST_FILES,
                                "--junitxml", str(out / "tests.xml")], TESTS_BUDGET_S, "tests.log"))
    for key, (path, selector) in BENCH_FILES.items():
        json_out = out / "bench" / f"{key}.json"
        argv = [python, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-k",
                f"cuda and ({selector})" if selector else "cuda",
                f"--benchmark-max-time={bench_time}", "--benchmark-min-rounds=5", "--benchmark-warmup=off",
                f"--benchmark-json={json_out}", "--benchmark-group-by=group", "--benchmark-columns=median,iqr,rounds"]
        steps.append(Step(f"bench:{key}", argv, BENCH_BUDGET_S[key], f"bench/{key}.log",
                          env={"FCL_EXT_BENCH_COMPILE": "main", "FCL_EXT_BENCH_GPU_CHECK": "1"},
                          outputs=[f"bench/{key}.json"]))
    return steps


JOIN_AFTER = {"trainers": "tests"}  # a background step is waited for right after this step


def plan_budget(steps) -> float:
    """Seconds the plan may take: foreground steps one after another; a background step adds only what it
    may run past the foreground steps it overlaps (up to its join); plus the summary's reserve."""
    total = sum(s.budget_s for s in steps if not s.background)
    names = [s.name for s in steps]
    for s in steps:
        if not s.background:
            continue
        i, j = names.index(s.name), names.index(JOIN_AFTER[s.name])
        overlap = sum(t.budget_s for t in steps[i + 1:j + 1] if not t.background)
        total += max(0.0, s.budget_s - overlap)
    return total + SUMMARY_RESERVE_S


# ---- running ---------------------------------------------------------------------------------------

class Runner:
    def __init__(self, out: Path, total_s: float = TOTAL_BUDGET_S):
        self.out = out
        self.deadline = time.monotonic() + total_s - SUMMARY_RESERVE_S
        self.results = {}
        self.background = {}

    def remaining(self):
        return self.deadline - time.monotonic()

    def _start(self, step: Step):
        log = self.out / step.log
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("w")
        fh.write("$ " + " ".join(step.argv) + "\n")
        fh.flush()
        env = dict(os.environ, **step.env)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return proc, fh, time.monotonic()

    def _finish(self, step, proc, fh, start, timeout):
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            status = "ok" if rc == 0 else f"failed (rc={rc})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, f"timed out after {time.monotonic() - start:.0f} s (budget {step.budget_s:.0f} s)"
        fh.close()
        took = time.monotonic() - start
        self.results[step.name] = {"status": status, "rc": rc, "seconds": round(took, 1), "log": step.log,
                                   "budget_s": step.budget_s}
        print(f"gpu-check: {step.name:<24} {status} in {took:.0f} s ({step.log})", flush=True)
        return rc

    def run(self, step: Step, later_budget_s: float = 0.0):
        """Run a step; it may use the time earlier steps left unused (never the later steps' budgets)."""
        left = self.remaining()
        if left < 5:
            self.results[step.name] = {"status": "skipped (no time left)", "rc": None, "seconds": 0,
                                       "log": step.log, "budget_s": step.budget_s}
            print(f"gpu-check: {step.name:<24} skipped: the 8-minute deadline is reached", flush=True)
            return None
        try:
            proc, fh, start = self._start(step)
        except OSError as exc:
            self.results[step.name] = {"status": f"could not start: {exc}", "rc": None, "seconds": 0,
                                       "log": step.log, "budget_s": step.budget_s}
            return None
        if step.background:
            self.background[step.name] = (step, proc, fh, start)
            return None
        return self._finish(step, proc, fh, start, min(max(step.budget_s, left - later_budget_s), left))

    def join(self, name):
        if name not in self.background:
            return None
        step, proc, fh, start = self.background.pop(name)
        left = min(step.budget_s - (time.monotonic() - start), self.remaining())
        return self._finish(step, proc, fh, start, left)


def _kill_group(proc):
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def gpu_arch(torch):
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check-out", help="folder for the report and logs")
    ap.add_argument("--bench-time", type=float, default=0.05, help="pytest-benchmark --benchmark-max-time")
    ap.add_argument("--plan", action="store_true", help="print the plan (JSON) and exit; needs no GPU")
    ap.add_argument("--step", choices=["correctness", "trainers"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()

    if args.plan:
        steps = plan(out, bench_time=args.bench_time)
        print(json.dumps({"total_budget_s": TOTAL_BUDGET_S, "plan_budget_s": plan_budget(steps),
                          "steps": [asdict(s) for s in steps]}, indent=1))
        return
    if args.step == "correctness":
        from benchmarks import gpu_correctness
        gpu_correctness.main(out)
        return
    if args.step == "trainers":
        from benchmarks import gpu_correctness
        gpu_correctness.trainers(out, TRAINER_RUNS, BACKEND_KEY, TRAINER_TOLERANCE, TRAINERS_BUDGET_S - 10)
        return

    try:
        import torch
    except ImportError:
        sys.exit("gpu-check: torch is not installed in this Python; use PYTHON=/path/to/python with torch >= 2.4")
    if not torch.cuda.is_available() or torch.version.cuda is None:
        sys.exit(f"gpu-check: no usable CUDA GPU here (torch {torch.__version__}, cuda "
                 f"{torch.version.cuda}, cuda available: {torch.cuda.is_available()}); run it on a GPU machine")
    missing = [m for m in ("numpy", "pytest", "pytest_benchmark") if not _importable(m)]
    if missing:
        sys.exit(f"gpu-check: missing Python packages: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runner = Runner(out)
    env_txt = [f"python {sys.version}", f"torch {torch.__version__} cuda {torch.version.cuda}",
               f"gpu {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} (arch {gpu_arch(torch)})",
               f"cpus {os.cpu_count()}", f"optional modules: " + ", ".join(
                   f"{m}={'yes' if _importable(m) else 'MISSING'}" for m in ("yaml", "matplotlib", "hypothesis"))]
    if shutil.which("nvidia-smi"):
        try:
            env_txt.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except (subprocess.TimeoutExpired, OSError) as exc:
            env_txt.append(f"nvidia-smi: {exc}")
    (out / "env.txt").write_text("\n".join(env_txt))

    steps = plan(out, cpu_count=os.cpu_count(), arch=gpu_arch(torch), bench_time=args.bench_time)
    built = False
    try:
        for i, step in enumerate(steps):
            later = sum(s.budget_s for s in steps[i + 1:] if not s.background)
            if step.name == "build":
                built = runner.run(step, later) == 0
                if not built:
                    print(f"gpu-check: the CUDA build failed; see {out / step.log}", flush=True)
                    break
                continue
            runner.run(step, later)
            for bg, after in JOIN_AFTER.items():
                if after == step.name:
                    runner.join(bg)  # the trainers share the GPU: done before the timed benchmarks
    except KeyboardInterrupt:
        print("gpu-check: interrupted; writing what there is", flush=True)
    finally:
        for name in list(runner.background):
            runner.join(name)
        try:
            from benchmarks import gpu_summary
            gpu_summary.write(out, runner.results, started)
        except Exception as exc:  # the logs are still there
            (out / "summary.md").write_text(f"# gpu-check summary failed\n\n{exc!r}\n\nsteps: "
                                            f"{json.dumps(runner.results, indent=1)}\n")
            print(f"gpu-check: writing the summary failed: {exc!r}", flush=True)
    bad = [n for n, r in runner.results.items() if r["status"] != "ok"]
    print(f"gpu-check: done in {time.monotonic() - started:.0f} s; "
          f"{'all steps ok' if not bad else 'not ok: ' + ', '.join(bad)}; summary in {out / 'summary.md'}")
    sys.exit(0 if built and not bad else 1)


if __name__ == "__main__":
    main()
