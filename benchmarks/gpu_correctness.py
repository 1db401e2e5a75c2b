"""gpu-check's correctness and trainer steps (run as subprocesses by benchmarks/gpu_check.py).

correctness: every op at its main GPU shape (and the shapes that take its other CUDA paths): the CUDA
kernel, the CPU kernel and the float64 reference on the CPU, values and gradients; each case is caught on
its own and correct.json is rewritten after every case, so a crash leaves the cases before it. Also the
device-to-device copy bandwidth that the summary measures the kernels against (copy_bw.json).

trainers: the demo presets for a short run on cuda and on cpu with both loss backends, in parallel;
their accuracies compared within a tolerance (trainers.json).
"""
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Largest allowed max|x - ref| / max|ref| per compared output (float32 kernels against float64).
TOLERANCE = 2e-4


def _inputs(case, device, dtype):
    """Inputs of one case, made on the CPU in float64 from a fixed seed, then moved (same values everywhere)."""
    import torch
    g = torch.Generator().manual_seed(0)
    op, dims = case["op"], case["dims"]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    def labels(n, c):
        return torch.randint(0, c, (n,), generator=g).to(device)

    if op == "softmax_entropy":
        return {"logits": randn(dims["B"], dims["C"], scale=3.0)}
    if op == "glfc_loss":
        n, c = dims["N"], dims["C"]
        mask = torch.zeros(c, dtype=torch.bool)
        mask[: c // 2] = True
        return {"logits": randn(n, c, scale=3.0), "labels": labels(n, c), "old_class_mask": mask.to(device),
                "old_logits": randn(n, c // 2, scale=3.0)}
    if op == "cross_correlation":
        a = randn(dims["B"], dims["K"])
        return {"a": a, "b": a + randn(dims["B"], dims["K"])}
    if op == "dual_distillation":
        n, c = dims["N"], dims["C"]
        return {"logits": randn(n, c, scale=3.0), "labels": labels(n, c), "intra": randn(n, c, scale=3.0),
                "inter": randn(n, c, scale=3.0)}
    if op == "gradient_matching_loss":
        return {"grads": randn(dims["K"], dims["P"]), "target": randn(dims["K"], dims["P"])}
    if op == "lbfgs_direction":
        k, m, d = dims["K"], dims["M"], dims["D"]
        s = randn(k, m, d)
        y = s + 0.3 * randn(k, m, d)
        return {"grad": randn(k, d), "s": s, "y": y, "rho": 1.0 / (y * s).sum(2),
                "hist_len": torch.full((k,), m, dtype=torch.int64).to(device),
                "start": torch.randint(0, m, (k,), generator=g).to(device), "h": torch.ones(k, dtype=dtype).to(device)}
    raise ValueError(op)


def _run(case, impl, device, dtype):
    """(outputs, gradients) of one implementation: impl is fcl_ext.ops or fcl_ext.reference."""
    import torch
    x = _inputs(case, device, dtype)
    op, kw = case["op"], case.get("kw", {})
    if op == "softmax_entropy":
        leaf = x["logits"].requires_grad_()
        out = impl.softmax_entropy(leaf, reduction="none", **kw)
    elif op == "glfc_loss":
        leaf = x["logits"].requires_grad_()
        out = impl.glfc_loss(leaf, x["labels"], x["old_class_mask"], x["old_logits"])
    elif op == "cross_correlation":
        leaf = x["a"].requires_grad_()
        out = impl.cross_correlation_loss(leaf, x["b"], **kw)
    elif op == "dual_distillation":
        leaf = x["logits"].requires_grad_()
        out = impl.dual_distillation_loss(leaf, x["labels"], x["intra"], x["inter"], **kw)
    elif op == "gradient_matching_loss":
        leaf = x["grads"].requires_grad_()
        out = impl.gradient_matching_loss(leaf, x["target"], **kw)
    elif op == "lbfgs_direction":
        out = impl.lbfgs_direction(x["grad"], x["s"], x["y"], x["rho"], x["hist_len"], x["h"], hist_start=x["start"])
        return out.detach(), None
    else:
        raise ValueError(op)
    (grad,) = torch.autograd.grad(out.sum(), [leaf])
    return out.detach(), grad


def _error(actual, expected):
    import torch
    a, e = actual.double().cpu(), expected.double().cpu()
    if a.shape != e.shape:
        return float("inf")
    if e.numel() == 0:
        return 0.0
    if torch.isnan(a).ne(torch.isnan(e)).any():
        return float("inf")
    finite = ~torch.isnan(e)
    scale = e[finite].abs().max().clamp_min(1e-30) if finite.any() else torch.tensor(1.0)
    return float(((a - e)[finite]).abs().max() / scale) if finite.any() else 0.0


def cases():
    """One case per CUDA path worth checking at GPU shapes (the first per op is its main benchmark shape)."""
    fccl = dict(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0)
    barlow = dict(off_diag_weight=0.0051, off_diag_target=0.0, unbiased=False, eps=1e-5)
    return [
        {"op": "softmax_entropy", "shape": "B=1024,C=1000", "path": "block per row", "dims": dict(B=1024, C=1000)},
        {"op": "softmax_entropy", "shape": "B=16384,C=100", "path": "warp per row", "dims": dict(B=16384, C=100),
         "kw": dict(eps=1e-5)},
        {"op": "glfc_loss", "shape": "N=128,C=100", "path": "warp per row", "dims": dict(N=128, C=100)},
        {"op": "glfc_loss", "shape": "N=1024,C=1000", "path": "block per row", "dims": dict(N=1024, C=1000)},
        {"op": "cross_correlation", "shape": "fccl B=512,K=10", "path": "fused one block",
         "dims": dict(B=512, K=10), "kw": fccl},
        {"op": "cross_correlation", "shape": "fccl B=512,K=65", "path": "split-B stats + cuBLAS",
         "dims": dict(B=512, K=65), "kw": fccl},
        {"op": "cross_correlation", "shape": "barlow B=256,D=2048", "path": "cuBLAS", "dims": dict(B=256, K=2048),
         "kw": barlow},
        {"op": "dual_distillation", "shape": "N=512,C=10", "path": "warp per row", "dims": dict(N=512, C=10)},
        {"op": "dual_distillation", "shape": "N=4096,C=1000", "path": "block per row", "dims": dict(N=4096, C=1000),
         "kw": dict(temperature=2.0)},
        {"op": "gradient_matching_loss", "shape": "K=60,P=85036", "path": "split-P (l2)",
         "dims": dict(K=60, P=85036), "kw": dict(metric="l2")},
        {"op": "gradient_matching_loss", "shape": "K=60,P=85036", "path": "split-P (cosine)",
         "dims": dict(K=60, P=85036), "kw": dict(metric="cosine")},
        {"op": "gradient_matching_loss", "shape": "K=1024,P=1000", "path": "block per row (cosine)",
         "dims": dict(K=1024, P=1000), "kw": dict(metric="cosine")},
        {"op": "lbfgs_direction", "shape": "K=60,M=100,D=3072", "path": "block per problem",
         "dims": dict(K=60, M=100, D=3072)},
    ]


def copy_bandwidth():
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB tensor, median of 20."""
    import torch
    n = 1 << 28
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[3:])
    median = times[len(times) // 2]
    return {"bytes": 2 * src.numel() * src.element_size(), "median_s": median,
            "gb_per_s": 2 * src.numel() * src.element_size() / median / 1e9, "device": torch.cuda.get_device_name(0)}


def main(out: Path):
    import torch
    import fcl_ext
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / "copy_bw.json").write_text(json.dumps(copy_bandwidth(), indent=1))
    except Exception:
        (out / "copy_bw.json").write_text(json.dumps({"error": traceback.format_exc()}))
    results = []
    for case in cases():
        row = {k: case[k] for k in ("op", "shape", "path")}
        row["kw"] = {k: v for k, v in case.get("kw", {}).items()}
        t0 = time.monotonic()
        try:
            ref_out, ref_grad = _run(case, fcl_ext.reference, "cpu", torch.float64)
            cuda_out, cuda_grad = _run(case, fcl_ext.ops, "cuda", torch.float32)
            fcl_ext.check_device_errors()
            cpu_out, cpu_grad = _run(case, fcl_ext.ops, "cpu", torch.float32)
            row["value_err"] = {"cuda_vs_ref": _error(cuda_out, ref_out), "cpu_vs_ref": _error(cpu_out, ref_out),
                                "cuda_vs_cpu": _error(cuda_out, cpu_out)}
            if ref_grad is not None:
                row["grad_err"] = {"cuda_vs_ref": _error(cuda_grad, ref_grad), "cpu_vs_ref": _error(cpu_grad, ref_grad),
                                   "cuda_vs_cpu": _error(cuda_grad, cpu_grad)}
            worst = max(row["value_err"]["cuda_vs_ref"], row.get("grad_err", {}).get("cuda_vs_ref", 0.0))
            row["ok"] = worst <= TOLERANCE
        except Exception:
            row["ok"] = False
            row["error"] = traceback.format_exc()
        row["seconds"] = round(time.monotonic() - t0, 2)
        results.append(row)
        print(f"{row['op']:<24} {row['shape']:<22} {row['path']:<26} {'ok' if row['ok'] else 'FAILED'}", flush=True)
        (out / "correct.json").write_text(json.dumps({"tolerance": TOLERANCE, "cases": results}, indent=1))


# ---- trainers ------------------------------------------------------------------------------------

def _accuracies(summary):
    """The accuracy-like scalars of a run summary, in percent."""
    found = {}
    for key, value in (summary or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "acc" in key.lower() or "top1" in key.lower():
            found[key] = float(value)
    return found


def compare_runs(finished, names, tolerance_pp):
    """Per (run, backend): the accuracies on cuda vs cpu; ok when both finished and every shared key agrees
    within tolerance_pp points."""
    comparisons = []
    for name in names:
        for backend in ("fcl_ext", "reference"):
            gpu = finished.get(f"{name}-{backend}-cuda", {}).get("summary", {})
            cpu = finished.get(f"{name}-{backend}-cpu", {}).get("summary", {})
            keys = sorted(set(gpu) & set(cpu))
            diffs = {k: abs(gpu[k] - cpu[k]) for k in keys}  # NaN differences fail the check below
            ok = bool(keys) and all(d <= tolerance_pp for d in diffs.values())
            comparisons.append({"run": name, "backend": backend, "cuda": gpu, "cpu": cpu, "abs_diff": diffs, "ok": ok})
    return comparisons


def trainers(out: Path, runs, backend_key, tolerance_pp, budget_s):
    """Start every (run, backend, device) at once, wait at most budget_s, compare cuda with cpu."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / "trainers"
    base.mkdir(exist_ok=True)
    procs = {}
    for name, method, preset, overrides in runs:
        for backend in ("fcl_ext", "reference"):
            for device in ("cuda", "cpu"):
                tag = f"{name}-{backend}-{device}"
                run_dir = base / tag
                settings = [f"run.device={device}", f"{backend_key[name]}={backend}", *overrides]
                if method == "fccl":
                    settings.append(f"pretrain.cache_dir={base / ('cache-' + tag)}")
                # key=value settings right after the method: argparse takes them only there
                argv = [sys.executable, "-m", "python_api.cli", "train", method, *settings, "--config", preset,
                        "--out", str(run_dir), "--no-progress"]
                log = (base / f"{tag}.log").open("w")
                log.write("$ " + " ".join(argv) + "\n")
                log.flush()
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                procs[tag] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                              log, run_dir, time.monotonic())
    report = {"tolerance_percentage_points": tolerance_pp, "runs": {}, "comparisons": []}
    deadline = time.monotonic() + budget_s
    while procs:
        for tag, (proc, log, run_dir, start) in list(procs.items()):
            rc = proc.poll()
            if rc is None and time.monotonic() < deadline:
                continue
            timed_out = rc is None
            if timed_out:
                proc.kill()
                rc = proc.wait()
            log.close()
            entry = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "log": f"trainers/{tag}.log",
                     "timed_out": timed_out}
            try:
                entry["summary"] = _accuracies(json.loads((run_dir / "metrics.json").read_text())["summary"])
            except Exception as exc:
                entry["summary"] = {}
                entry["error"] = repr(exc)
            report["runs"][tag] = entry
            del procs[tag]
            (out / "trainers.json").write_text(json.dumps(report, indent=1))
        if procs:
            time.sleep(0.5)
    report["comparisons"] = compare_runs(report["runs"], [r[0] for r in runs], tolerance_pp)
    (out / "trainers.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["comparisons"], indent=1))
    sys.exit(0 if all(c["ok"] for c in report["comparisons"]) else 1)
