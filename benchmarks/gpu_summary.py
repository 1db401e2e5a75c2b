"""gpu-check's summary: one file for everything (summary.md) and one per op (ops/<op>.md), from whatever
the steps left in OUT (every input is optional: a step that failed or timed out shows as such).

Per op: correct? (CUDA vs CPU kernel vs float64 reference, from correct.json), time of fcl_ext vs eager vs
torch.compile per benchmark case, achieved GB/s and its share of the measured device-to-device copy
bandwidth (copy_bw.json), peak memory. Also the trainer smoke runs (trainers.json) and the reconstruction
ratio at K=60 x 250 steps, extrapolated from the measured K=6 x 20-step sequential run (labelled so).
"""
import json
import re
import time
from collections import defaultdict
from pathlib import Path

OP_ORDER = ["softmax_entropy", "glfc_loss", "dual_distillation", "cross_correlation", "gradient_matching_loss",
            "lbfgs_direction", "reconstruct"]


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def op_key(name: str) -> str:
    return name.split(" (")[0]


def bench_rows(out: Path):
    """Benchmark groups -> {impl: (median_s, extra)} from every bench/*.json."""
    groups = defaultdict(dict)
    runs = []
    for path in sorted((out / "bench").glob("*.json")):
        data = _load(path)
        if not data:
            continue
        runs.append(data)
        for b in data.get("benchmarks", []):
            extra = b.get("extra_info", {})
            groups[b.get("group") or b["name"]][extra.get("impl", b["name"])] = (b["stats"]["median"], extra)
    return groups, runs


def _fmt_time(s):
    if s is None:
        return "—"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "—"


def _dims(shape):
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", shape)}


def reconstruct_extrapolation(groups):
    """Sequential time at K=60 x 250 steps, scaled linearly in K and steps from the largest measured run."""
    seq = {}
    batched = {}
    for group, impls in groups.items():
        for impl, (median, extra) in impls.items():
            if extra.get("op") != "reconstruct":
                continue
            d = _dims(extra.get("shape", ""))
            if "K" in d and "steps" in d:
                (seq if impl == "sequential" else batched)[(d["K"], d["steps"])] = median
    if not seq or (60, 250) not in batched:
        return None
    (k, steps), t = max(seq.items(), key=lambda kv: kv[0][0] * kv[0][1])
    est = t * (60 / k) * (250 / steps)
    return {"measured_sequential": {"K": k, "steps": steps, "seconds": t},
            "extrapolated_sequential_K60_250_s": est, "batched_K60_250_s": batched[(60, 250)],
            "speedup_extrapolated": est / batched[(60, 250)]}


def write(out: Path, steps: dict, started: float):
    out = Path(out)
    correct = _load(out / "correct.json") or {}
    copy_bw = _load(out / "copy_bw.json") or {}
    trainers = _load(out / "trainers.json") or {}
    groups, runs = bench_rows(out)
    copy_gbps = copy_bw.get("gb_per_s")
    lines = ["# gpu-check summary", "",
             f"Wall time {time.monotonic() - started:.0f} s. Device-to-device copy bandwidth (1 GiB, read + write): "
             + (f"**{copy_gbps:.0f} GB/s** on {copy_bw.get('device')}" if copy_gbps else "not measured"), "",
             "## Steps", "", "| step | status | seconds | budget | log |", "|---|---|---|---|---|"]
    for name, r in steps.items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {r['budget_s']:.0f} | {r['log']} |")
    per_op = defaultdict(list)
    for case in correct.get("cases", []):
        per_op[case["op"]].append(("correct", case))
    for group, impls in groups.items():
        ours = impls.get("fcl_ext") or impls.get("batched")
        extra = (ours or next(iter(impls.values())))[1]
        per_op[op_key(extra.get("op", group))].append(("bench", (group, impls)))
    summary = {"steps": steps, "copy_bw": copy_bw, "ops": {}, "trainers": trainers.get("comparisons")}
    op_files = {}
    for op in sorted(per_op, key=lambda o: OP_ORDER.index(o) if o in OP_ORDER else len(OP_ORDER)):
        body = [f"## {op}", ""]
        checks = [c for kind, c in per_op[op] if kind == "correct"]
        if checks:
            body += [f"Correctness (max |x - ref| / max |ref|, float32 kernels vs the float64 reference; "
                     f"tolerance {correct.get('tolerance')}):", "",
                     "| shape | CUDA path | value cuda/ref | value cpu/ref | value cuda/cpu | grad cuda/ref | "
                     "grad cpu/ref | grad cuda/cpu | ok |", "|---|---|---|---|---|---|---|---|---|"]
            for c in checks:
                v, g = c.get("value_err", {}), c.get("grad_err", {})
                cells = [f"{d.get(k, float('nan')):.1e}" if d else "—" for d in (v,) for k in
                         ("cuda_vs_ref", "cpu_vs_ref", "cuda_vs_cpu")]
                cells += [f"{g[k]:.1e}" if g else "—" for k in ("cuda_vs_ref", "cpu_vs_ref", "cuda_vs_cpu")]
                status = "yes" if c.get("ok") else ("ERROR: " + c["error"].strip().splitlines()[-1] if c.get("error")
                                                    else "NO")
                body.append(f"| {c['shape']} {c.get('kw') or ''} | {c['path']} | " + " | ".join(cells) + f" | {status} |")
            body.append("")
        else:
            body += ["Correctness: not run (see correctness.log).", ""]
        benches = [b for kind, b in per_op[op] if kind == "bench"]
        if benches:
            body += ["| case | fcl_ext | eager | compiled | ×eager | ×compiled | GB/s | % of copy | peak MiB |",
                     "|---|---|---|---|---|---|---|---|---|"]
            for group, impls in sorted(benches):
                ours_name = "fcl_ext" if "fcl_ext" in impls else "batched"
                ours = impls.get(ours_name, (None, {}))
                eager = impls.get("eager", impls.get("sequential", (None, {})))[0]
                compiled = impls.get("compiled", (None, {}))[0]
                bytes_moved = ours[1].get("bytes_moved")
                gbps = bytes_moved / ours[0] / 1e9 if bytes_moved and ours[0] else None
                peak = ours[1].get("peak_mem_bytes")
                body.append(f"| {group.split(' | ', 1)[-1]} | {_fmt_time(ours[0])} | {_fmt_time(eager)} | "
                            f"{_fmt_time(compiled)} | {_ratio(ours[0], eager)} | {_ratio(ours[0], compiled)} | "
                            f"{f'{gbps:.0f}' if gbps else '—'} | "
                            f"{f'{100 * gbps / copy_gbps:.0f}%' if gbps and copy_gbps else '—'} | "
                            f"{f'{peak / 2**20:.1f}' if peak is not None else '—'} |")
                summary["ops"].setdefault(op, []).append({"case": group, "fcl_ext_s": ours[0], "eager_s": eager,
                                                          "compiled_s": compiled, "gb_per_s": gbps, "peak_bytes": peak})
            body.append("")
            body.append("×eager / ×compiled: fcl_ext time over the other's (below 1 = fcl_ext faster). "
                        "compiled is measured only at each op's main shape, fwd+bwd (— elsewhere).")
            body.append("")
        else:
            body += ["Benchmarks: none recorded (see bench/*.log).", ""]
        if op == "reconstruct":
            ext = reconstruct_extrapolation(groups)
            if ext:
                m = ext["measured_sequential"]
                body += [f"**Extrapolated, not measured:** the sequential torch.optim.LBFGS loop at K=60 x 250 steps "
                         f"would take ~{ext['extrapolated_sequential_K60_250_s']:.1f} s (the measured K={m['K']} x "
                         f"{m['steps']}-step run, {m['seconds']:.2f} s, scaled linearly in K and steps); the batched "
                         f"reconstruction measured {ext['batched_K60_250_s']:.2f} s: ~{ext['speedup_extrapolated']:.0f}× "
                         "faster.", ""]
                summary["reconstruct_extrapolation"] = ext
        op_files[op] = body
        lines += [""] + body
    lines += ["", "## Trainers on the GPU vs the CPU", ""]
    comps = trainers.get("comparisons")
    if comps:
        lines += [f"Accuracies (percent) of the same run on cuda and on cpu; tolerance "
                  f"{trainers.get('tolerance_percentage_points')} points.", "",
                  "| run | loss backend | cuda | cpu | max diff | ok |", "|---|---|---|---|---|---|"]
        for c in comps:
            fmt = lambda d: ", ".join(f"{k}={v:.1f}" for k, v in d.items()) or "—"  # noqa: E731
            diff = max(c["abs_diff"].values()) if c["abs_diff"] else None
            lines.append(f"| {c['run']} | {c['backend']} | {fmt(c['cuda'])} | {fmt(c['cpu'])} | "
                         f"{f'{diff:.1f}' if diff is not None else '—'} | {'yes' if c['ok'] else 'NO'} |")
    else:
        runs_done = trainers.get("runs", {})
        lines.append("No comparison written (trainers step failed or timed out); runs finished: "
                     + (", ".join(f"{k} rc={v['rc']}" for k, v in runs_done.items()) or "none") + ".")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "ops").mkdir(exist_ok=True)
    for op, body in op_files.items():
        header = [f"# gpu-check: {op}", "",
                  f"Copy bandwidth: {copy_gbps:.0f} GB/s" if copy_gbps else "Copy bandwidth: not measured", ""]
        (out / "ops" / f"{op}.md").write_text("\n".join(header + body) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if runs:  # the repository's report format too (docs/perf/<machine>.json + performance.md)
        merged = dict(runs[0])
        merged["benchmarks"] = [b for r in runs for b in r.get("benchmarks", [])]
        (out / "bench.json").write_text(json.dumps(merged))
        import shutil
        from benchmarks import report
        docs = out / "docs"
        repo_perf = Path(__file__).resolve().parents[1] / "docs" / "perf"
        if repo_perf.exists():  # the other machines' runs, the notes and the bandwidth model
            shutil.copytree(repo_perf, docs / "perf", dirs_exist_ok=True)
        report.main([str(out / "bench.json"), "--docs", str(docs)])
        (out / "performance.md").write_text((docs / "performance.md").read_text())
    print(text)
