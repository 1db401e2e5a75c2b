"""Side-by-side speed of two checkouts of fcl_ext, case by case, with this harness.

    python -m benchmarks.compare_builds --old ../old-checkout [--new .] [--rounds 3] [--out table.md] \\
        [-k "fcl_ext and not compiled"] [benchmark files ...]

Each checkout must have its extension built in place (`make build`). The two are timed alternately
(old, new, old, new, ...) in separate processes with the same benchmark files (this checkout's), so a
drifting machine load hits both alike; per case the table gives the median of the per-round medians of
each and their ratio new/old. This is the check behind "speed unchanged or better": medians of two runs
made days apart (docs/performance.md) mix code changes with changes of the machine and of the harness.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_FILES = ["test_bench_cross_correlation.py", "test_bench_dual_distillation.py", "test_bench_glfc_loss.py",
                 "test_bench_reconstruct.py", "test_bench_softmax_entropy.py"]


def run_once(package_dir: Path, files, kexpr, json_path: Path, threads) -> None:
    env = dict(os.environ, FCL_EXT_BENCH_PACKAGE=str(package_dir))
    if threads:
        env["FCL_EXT_BENCH_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *[str(HERE / f) for f in files],
           "--benchmark-json", str(json_path), "--benchmark-columns=median,rounds"]
    if kexpr:
        cmd += ["-k", kexpr]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks failed for {package_dir} (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-2000:]}")


def medians(json_path: Path):
    data = json.loads(json_path.read_text())
    return {(b["group"], b["extra_info"].get("impl", b["name"])): b["stats"]["median"] for b in data["benchmarks"]}


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.2f} {unit}" if unit != "µs" else f"{seconds / scale:.1f} µs"
    return f"{seconds * 1e9:.0f} ns"


def table(results, old_label: str, new_label: str) -> str:
    lines = [f"| op | mode | device | dtype | shape | impl | {old_label} | {new_label} | new÷old |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (group, impl), per in sorted(results.items()):
        if not per["old"] or not per["new"]:
            continue
        parts = (group.split(" | ") + [""] * 5)[:5]  # op | mode | device | dtype | shape
        old, new = statistics.median(per["old"]), statistics.median(per["new"])
        lines.append(f"| {' | '.join(parts)} | {impl} | {fmt_time(old)} | {fmt_time(new)} | {new / old:.2f}× |")
    return "\n".join(lines)


def git_label(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        # only the timed code counts (a baseline checkout may carry this harness's benchmarks/)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--",
                                "fcl_ext", "csrc", "python_api"], capture_output=True, text=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return path.name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, type=Path, help="checkout with the baseline build")
    parser.add_argument("--new", default=HERE.parent, type=Path, help="checkout with the build to judge")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("-k", dest="kexpr", default="not compiled",
                        help='pytest -k expression (default "not compiled": the compiled reference is the same '
                             'code in both)')
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("files", nargs="*", default=DEFAULT_FILES, help="benchmark files in benchmarks/")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    for name in ("old", "new"):
        path = getattr(args, name).resolve()
        if not (path / "fcl_ext").is_dir():
            parser.error(f"--{name} {path} has no fcl_ext package")
        if not list((path / "fcl_ext").glob("_C*.so")):
            parser.error(f"--{name} {path} has no built extension (run `make build` there)")
        setattr(args, name, path)
    results = defaultdict(lambda: {"old": [], "new": []})
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for which in ("old", "new"):
                print(f"round {r + 1}/{args.rounds}: {which} ({getattr(args, which)})", file=sys.stderr, flush=True)
                path = Path(tmp) / f"{which}{r}.json"
                run_once(getattr(args, which), args.files, args.kexpr, path, args.threads)
                for key, value in medians(path).items():
                    results[key][which].append(value)
    text = table(results, f"old `{git_label(args.old)}`", f"new `{git_label(args.new)}`")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
