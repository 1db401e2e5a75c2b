"""Turn pytest-benchmark JSON into docs/performance.md.

    python -m benchmarks.report .benchmarks/latest.json [--docs docs]

Each run is stored as docs/perf/<machine>.json (a later run on the same machine replaces
it; other machines' results are kept), then docs/performance.md is regenerated from all
stored runs: per case the medians, the ratios fcl_ext/eager and fcl_ext/compiled, peak
memory, and on a GPU the achieved bandwidth next to the card's peak.
"""
import argparse
import datetime as _dt
import json
import re
from collections import defaultdict
from pathlib import Path

# HBM peak bandwidth (GB/s) by card name fragment, for the "% of peak" column.
GPU_PEAK_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
                 "L40S": 864, "L4": 300, "RTX 4090": 1008, "A10G": 600, "T4": 320, "V100": 900}

# Which implementation is "ours" in a group, and the baselines it is compared against.
OURS = ("fcl_ext", "batched")
BASELINES = ("eager", "compiled", "reference", "sequential")


def gpu_peak(name):
    for frag, peak in GPU_PEAK_GBPS.items():
        if frag in (name or ""):
            return peak
    return None


def machine_key(data):
    info = data.get("machine_info", {})
    gpu = info.get("fcl_ext_gpu")
    base = gpu or info.get("cpu", {}).get("brand_raw") or info.get("processor") or info.get("node", "machine")
    return re.sub(r"[^A-Za-z0-9]+", "-", base).strip("-").lower()


def summarise(data):
    """One stored record per run: machine, software, and per-benchmark medians."""
    info = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    rows = []
    for b in data.get("benchmarks", []):
        extra = dict(b.get("extra_info", {}))
        rows.append({
            "group": b.get("group") or b["name"],
            "impl": extra.get("impl", b["name"]),
            "median_s": b["stats"]["median"],
            "iqr_s": b["stats"].get("iqr"),
            "rounds": b["stats"].get("rounds"),
            "extra": extra,
        })
    return {
        "machine": machine_key(data),
        "cpu": info.get("cpu", {}).get("brand_raw", info.get("processor", "")),
        "cores": info.get("cpu", {}).get("count"),
        "gpu": info.get("fcl_ext_gpu"),
        "torch": info.get("fcl_ext_torch"),
        "threads": info.get("fcl_ext_threads"),
        "python": info.get("python_version"),
        "commit": (commit.get("id") or "")[:10] + (" (dirty)" if commit.get("dirty") else ""),
        "date": data.get("datetime", _dt.datetime.now(_dt.timezone.utc).isoformat())[:19],
        "rows": rows,
    }


def fmt_time(seconds):
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_mem(nbytes):
    if nbytes is None:
        return "—"
    return f"{nbytes / 2**20:.1f} MiB"


def render_run(run):
    out = [f"### {run['gpu'] or run['cpu']}", "",
           f"- machine: {run['cpu']} ({run['cores']} cores, torch using {run.get('threads') or '?'} threads)"
           + (f", GPU {run['gpu']}" if run["gpu"] else ""),
           f"- torch {run['torch']}, Python {run['python']}, commit `{run['commit']}`, {run['date']} UTC", ""]
    groups = defaultdict(dict)
    for row in run["rows"]:
        groups[row["group"]][row["impl"]] = row
    by_op = defaultdict(list)
    for group, impls in groups.items():
        any_row = next(iter(impls.values()))
        by_op[any_row["extra"].get("op", group.split(" | ")[0])].append((group, impls))
    for op in sorted(by_op):
        out += [f"#### {op}", ""]
        has_gpu = any(next(iter(i.values()))["extra"].get("device") == "cuda" for _, i in by_op[op])
        head = ("| shape | mode | device | dtype | ours | eager/ref | compiled | ours÷eager | ours÷compiled "
                "| peak mem ours / eager / compiled |")
        sep = "|---|---|---|---|---|---|---|---|---|---|"
        if has_gpu:
            head += " bandwidth (ours) |"
            sep += "---|"
        out += [head, sep]
        for group, impls in sorted(by_op[op], key=lambda gi: gi[0]):
            e = next(iter(impls.values()))["extra"]
            ours = next((impls[k] for k in OURS if k in impls), None)
            base = next((impls[k] for k in ("eager", "reference", "sequential") if k in impls), None)
            comp = impls.get("compiled")
            t = lambda r: r["median_s"] if r else None  # noqa: E731
            ratio = lambda a, b: f"{t(a) / t(b):.2f}×" if a and b else "—"  # noqa: E731
            mem = " / ".join(fmt_mem(r["extra"].get("peak_mem_bytes")) if r else "—" for r in (ours, base, comp))
            line = (f"| {e.get('shape', '')} | {e.get('mode', '')} | {e.get('device', '')} | {e.get('dtype', '')} "
                    f"| {fmt_time(t(ours))} | {fmt_time(t(base))} | {fmt_time(t(comp))} | {ratio(ours, base)} "
                    f"| {ratio(ours, comp)} | {mem} |")
            if has_gpu:
                bw = "—"
                if ours and e.get("device") == "cuda" and e.get("bytes_moved"):
                    gbps = e["bytes_moved"] / t(ours) / 1e9
                    peak = gpu_peak(run["gpu"])
                    bw = f"{gbps:.0f} GB/s" + (f" ({100 * gbps / peak:.0f}% of {peak})" if peak else "")
                line += f" {bw} |"
            out.append(line)
        out.append("")
    return out


HEADER = """# Performance

Generated by `make bench` (`python -m benchmarks.report`) from pytest-benchmark JSON; do not edit by
hand. Each group times `fcl_ext` (ours; `batched` for the reconstruction) against the eager pure-PyTorch
reference (`fcl_ext.reference`, or `sequential` for the per-problem L-BFGS loop) and against
`torch.compile` of the same reference, side by side in one run. Times are medians; ratios below 1 mean
fcl_ext is faster. Peak memory is the CUDA allocator's peak over one call (not tracked on the CPU).
Bandwidth is bytes moved (the op's compulsory reads and writes) over the median time.

Reproduce: `make bench` (CPU, and CUDA where a GPU exists) or `make gpu-check OUT=dir` on a GPU machine.
Results are kept per machine under `docs/perf/`; a new run on the same machine replaces its own.
"""


def regenerate(docs: Path):
    runs = [json.loads(p.read_text()) for p in sorted((docs / "perf").glob("*.json"))]
    lines = [HEADER]
    notes = docs / "perf" / "NOTES.md"
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    model = docs / "perf" / "GPU_MODEL.md"
    if model.exists():
        lines += ["## Expected GPU bandwidth (model, H200)", "", model.read_text().strip(), ""]
    lines += ["## Results", ""]
    for run in sorted(runs, key=lambda r: (r["gpu"] is None, r["machine"])):
        lines += render_run(run)
    compare = docs / "perf" / "COMPARE.md"  # written by benchmarks.compare_builds --out
    if compare.exists():
        lines += ["## This commit against an earlier one, side by side", "",
                  "`python -m benchmarks.compare_builds --old <checkout> --out docs/perf/COMPARE.md`: both builds "
                  "timed alternately in one session with the same harness (median of the per-round medians).", "",
                  compare.read_text().strip(), ""]
    profiles = sorted((docs / "perf").glob("profile_*.md"))
    if profiles:
        lines += ["## Where a round's time goes", "",
                  "Written by `python -m benchmarks.profile_round glfc|fccl` (torch.profiler, top 10 ops by self CPU).",
                  ""]
        for path in profiles:  # demote the profile's own headings under this section
            lines += [("##" + l) if l.startswith("#") else l for l in path.read_text().strip().splitlines()] + [""]
    phases = docs / "perf" / "PHASES.md"   # hand-written: phase times of whole runs (fcl-ext estimate)
    if phases.exists():
        lines += [phases.read_text().strip(), ""]
    (docs / "performance.md").write_text("\n".join(lines).rstrip() + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", help="pytest-benchmark JSON of a new run (omit to only regenerate)")
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args(argv)
    docs = Path(args.docs)
    (docs / "perf").mkdir(parents=True, exist_ok=True)
    if args.json:
        run = summarise(json.loads(Path(args.json).read_text()))
        if not run["rows"]:
            raise SystemExit(f"{args.json} holds no benchmarks")
        (docs / "perf" / f"{run['machine']}.json").write_text(json.dumps(run, indent=1))
        print(f"stored {len(run['rows'])} results for machine {run['machine']}")
    regenerate(docs)
    print(f"wrote {docs / 'performance.md'}")


if __name__ == "__main__":
    main()
