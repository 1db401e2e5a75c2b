"""Gradient-matching reconstruction: the fused ops, and whole batched reconstructions against
the sequential per-problem torch.optim.LBFGS loop of GLFC's proxy server.

    python -m pytest benchmarks/test_bench_reconstruct.py -q -k cpu --benchmark-group-by=group
    FCL_EXT_BENCH_RECONSTRUCT_FULL=1 ...   # adds K=60 and 250-step runs on the CPU (long)

Each reconstruction group holds `batched` (fcl_ext.reconstruct.reconstruct_from_gradients) and
`sequential` (reconstruct_sequential_reference), one timed round each (they take seconds to
minutes); extra_info records the median final loss and, once both ran, their relative gap.
"""
import os

import pytest
import torch

import fcl_ext
from benchmarks.conftest import IMPLS, MODES, bench_devices, forward_or_backward, implementation, run_case
from benchmarks.shapes import SHAPES, shapes_for
from fcl_ext.reconstruct import (LeNetEncoder, encode_gradients, reconstruct_from_gradients,
                                 reconstruct_sequential_reference)

FULL = os.environ.get("FCL_EXT_BENCH_RECONSTRUCT_FULL") == "1"
SEQUENTIAL_CUDA_MAX = {"K": 6, "steps": 20}


# ---- gradient_matching_loss ------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(max(len(v) for v in SHAPES["gradient_matching_loss"].values())))
def test_gradient_matching_loss(benchmark, smoke, device, metric, mode, impl, shape_idx):
    op = "gradient_matching_loss"
    shapes = shapes_for(op, device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device")
    label, dims = shapes[shape_idx]
    g = torch.randn(dims["K"], dims["P"], device=device)
    t = torch.randn(dims["K"], dims["P"], device=device)
    g.requires_grad_(mode != "fwd")
    fn = implementation(impl, lambda a, b: fcl_ext.ops.gradient_matching_loss(a, b, metric=metric),
                        lambda a, b: fcl_ext.reference.gradient_matching_loss(a, b, metric=metric))
    call = forward_or_backward(mode, lambda: fn(g, t), [g])
    elem = g.element_size() * g.numel()
    run_case(benchmark, op=f"{op} ({metric})", mode=mode, device=device, dtype=torch.float32, shape=label,
             impl=impl, make_call=call, bytes_moved=2 * elem if mode == "fwd" else 5 * elem, smoke=smoke,
             main_shape=shape_idx == 0,
             reference=forward_or_backward(
                 mode, lambda: fcl_ext.reference.gradient_matching_loss(g, t, metric=metric), [g]))


# ---- lbfgs_direction --------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fcl_ext", "eager"])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(max(len(v) for v in SHAPES["lbfgs_direction"].values())))
def test_lbfgs_direction(benchmark, smoke, device, impl, shape_idx):
    op = "lbfgs_direction"
    shapes = shapes_for(op, device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device")
    label, dims = shapes[shape_idx]
    k, m, d = dims["K"], dims["M"], dims["D"]
    s = torch.randn(k, m, d, device=device)
    y = s + 0.3 * torch.randn(k, m, d, device=device)
    rho = 1.0 / (y * s).sum(2)
    grad = torch.randn(k, d, device=device)
    hist_len = torch.full((k,), m, dtype=torch.int64, device=device)
    start = torch.randint(0, m, (k,), device=device)
    h = torch.ones(k, device=device)
    fn = fcl_ext.ops.lbfgs_direction if impl == "fcl_ext" else fcl_ext.reference.lbfgs_direction
    run_case(benchmark, op=op, mode="fwd", device=device, dtype=torch.float32, shape=label, impl=impl,
             make_call=lambda: fn(grad, s, y, rho, hist_len, h, hist_start=start),
             bytes_moved=2 * 2 * s.element_size() * s.numel(), smoke=smoke, main_shape=shape_idx == 0,
             reference=lambda: fcl_ext.reference.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=start))


# ---- whole reconstructions ----------------------------------------------------------------

_FINAL_LOSSES = {}


def reconstruct_shapes(device, smoke):
    if smoke:
        return SHAPES["reconstruct"]["smoke"]
    shapes = list(SHAPES["reconstruct"][device])
    if device == "cpu" and FULL:
        shapes += SHAPES["reconstruct"]["cpu_full"]
    return shapes


@pytest.mark.parametrize("impl", ["batched", "sequential"])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(len(SHAPES["reconstruct"]["cpu"]) + len(SHAPES["reconstruct"]["cpu_full"])))
def test_reconstruct(benchmark, smoke, device, impl, shape_idx):
    shapes = reconstruct_shapes(device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device (FCL_EXT_BENCH_RECONSTRUCT_FULL=1 adds K=60 on the CPU)")
    label, dims = shapes[shape_idx]
    k, steps = dims["K"], dims["steps"]
    if impl == "sequential" and device == "cuda" and (k > SEQUENTIAL_CUDA_MAX["K"] or steps > SEQUENTIAL_CUDA_MAX["steps"]):
        pytest.skip("the sequential loop runs on the GPU only at K <= 6, 20 steps (the summary extrapolates)")
    size, classes = dims.get("image_size", 32), dims.get("classes", 100)
    encoder = LeNetEncoder(3, size, classes, seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(k, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, classes, (k,), generator=gen).to(device)
    target = encode_gradients(encoder, images, labels)
    x0 = torch.randn(k, 3, size, size, generator=gen).to(device)
    fn = reconstruct_from_gradients if impl == "batched" else reconstruct_sequential_reference
    kw = dict(steps=steps, keep_last=min(20, steps), init=x0)
    fn(encoder, target[:1], steps=1, keep_last=1, init=x0[:1])  # warm up (allocator, kernels)

    def call():
        out = fn(encoder, target, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"reconstruct | lbfgs | {device} | float32 | {label}"
    benchmark.extra_info.update(op="reconstruct", mode="lbfgs", device=device, dtype="float32", shape=label,
                                impl=impl, bytes_moved=None, peak_mem_bytes=None)
    result = benchmark.pedantic(call, rounds=1, iterations=1)
    losses = result.losses.detach().double().cpu()
    benchmark.extra_info["median_final_loss"] = float(losses.median())
    benchmark.extra_info["mean_func_evals"] = float(result.func_evals.double().mean())
    key = (device, label)
    _FINAL_LOSSES.setdefault(key, {})[impl] = losses
    if len(_FINAL_LOSSES[key]) == 2:
        a, b = _FINAL_LOSSES[key]["batched"], _FINAL_LOSSES[key]["sequential"]
        gap = abs(float(a.median()) - float(b.median())) / max(float(b.median()), 1e-30)
        benchmark.extra_info["median_loss_gap_vs_other"] = gap
    assert torch.isfinite(losses).all()
