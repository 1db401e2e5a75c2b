"""pytest-benchmark harness shared by every op benchmark.

One benchmark group per (op, mode, device, dtype, shape); inside it the implementations
`fcl_ext`, `eager` (fcl_ext.reference) and `compiled` (torch.compile of the reference).
CUDA work is synchronised inside the timed call. Peak memory is measured in one extra
untimed call (CUDA: allocator peak; CPU: not tracked).
"""
import os
import sys

import pytest
import torch

# FCL_EXT_BENCH_PACKAGE=dir times the fcl_ext package (and its built .so) of another checkout with this
# harness, so two commits are compared case by case under one set of rules (benchmarks/compare_builds.py).
_PACKAGE_DIR = os.environ.get("FCL_EXT_BENCH_PACKAGE")
if _PACKAGE_DIR:
    sys.path.insert(0, os.path.abspath(_PACKAGE_DIR))

IMPLS = ["fcl_ext", "eager", "compiled"]
MODES = ["fwd", "fwd+bwd"]


def pytest_configure(config):
    # FCL_EXT_BENCH_THREADS pins torch's CPU threads (e.g. 1 on a shared machine, where idle
    # OpenMP threads spin-wait and turn medians into scheduling noise). Default: torch's own.
    threads = os.environ.get("FCL_EXT_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if _PACKAGE_DIR:
        import fcl_ext
        where = os.path.dirname(os.path.dirname(os.path.abspath(fcl_ext.__file__)))
        if where != os.path.abspath(_PACKAGE_DIR):
            raise pytest.UsageError(f"FCL_EXT_BENCH_PACKAGE={_PACKAGE_DIR} but fcl_ext was imported from {where}")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record torch and the GPU with every run (benchmarks/report.py keys results by machine)."""
    machine_info["fcl_ext_torch"] = torch.__version__
    machine_info["fcl_ext_threads"] = torch.get_num_threads()
    machine_info["fcl_ext_gpu"] = torch.cuda.get_device_name(0) if "cuda" in bench_devices() else None
    try:
        import fcl_ext
        machine_info["fcl_ext_build"] = fcl_ext.info()
    except Exception as exc:  # the report still works without it
        machine_info["fcl_ext_build"] = repr(exc)


@pytest.fixture(scope="session")
def smoke(request):
    """True under --benchmark-disable (make test): tiny shapes, no torch.compile."""
    return bool(request.config.getoption("benchmark_disable", False)) or os.environ.get("FCL_EXT_BENCH_SMOKE") == "1"


def bench_devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        import fcl_ext
        if fcl_ext.info()["cuda_kernels"]:
            devs.append("cuda")
    return devs


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def implementation(impl, fused, reference):
    """The callable for one implementation: fused op, eager reference, or compiled reference.

    The compiled reference is compiled afresh for every case (dynamo reset): one cached torch.compile
    would pass dynamo's recompile limit after a few shapes and silently run eager from then on.
    """
    if impl == "fcl_ext":
        return fused
    if impl == "eager":
        return reference
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):  # belt and braces (the name differs by version)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(reference, dynamic=False)


# (rtol, atol) of the one check per case that the fused op matches the eager reference; atol is
# relative to the largest |reference| value (losses summed over millions of elements are large).
CHECK_TOL = {torch.float64: (1e-7, 1e-10), torch.float32: (1e-3, 1e-5), torch.bfloat16: (5e-2, 2e-2),
             torch.float16: (1e-2, 5e-3)}


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    return []


def check_against_reference(fused_call, reference_call, dtype, what):
    """Fused == reference once (values, or gradients in fwd+bwd mode) before a case is timed."""
    actual, expected = _tensors(fused_call()), _tensors(reference_call())
    assert len(actual) == len(expected), f"{what}: fused returned {len(actual)} tensors, reference {len(expected)}"
    rtol, atol = CHECK_TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = float(e.detach().abs().max()) if e.numel() else 1.0
        torch.testing.assert_close(a.detach(), e.detach().to(a.dtype), rtol=rtol, atol=atol * max(1.0, scale),
                                   msg=lambda m: f"{what}: output {i} differs from the reference: {m}")


def run_case(benchmark, *, op, mode, device, dtype, shape, impl, make_call, bytes_moved=None, smoke=False,
             main_shape=True, reference=None):
    """Time `make_call()` (a zero-arg callable returning the result) for one case.

    mode "fwd" times the forward; "fwd+bwd" times forward plus torch.autograd.grad.
    reference: the same call through the eager reference; the fcl_ext case first checks it matches.
    main_shape: the op's first shape; with FCL_EXT_BENCH_COMPILE=main (gpu-check) only it (fwd+bwd) is compiled.
    """
    if impl == "compiled" and smoke:
        pytest.skip("torch.compile is skipped in smoke mode (make test); make bench runs it")
    if impl == "compiled" and os.environ.get("FCL_EXT_BENCH_COMPILE") == "main" and not (
            main_shape and mode == "fwd+bwd"):
        pytest.skip("FCL_EXT_BENCH_COMPILE=main (gpu-check's time budget): torch.compile only at the op's main "
                    "shape, fwd+bwd")
    if impl == "fcl_ext" and reference is not None:
        check_against_reference(make_call, reference, dtype, f"{op} {mode} {device} {shape}")
    benchmark.group = f"{op} | {mode} | {device} | {str(dtype).replace('torch.', '')} | {shape}"
    benchmark.extra_info.update(op=op, mode=mode, device=device, dtype=str(dtype).replace("torch.", ""),
                                shape=shape, impl=impl, bytes_moved=bytes_moved)

    def call():
        out = make_call()
        _sync(device)
        return out

    # Warm up (compiles, allocates), then record the peak memory of one call.
    call()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        benchmark.extra_info["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    else:
        benchmark.extra_info["peak_mem_bytes"] = None
    if impl == "compiled":  # evidence that the timed callable is a compiled graph, not an eager fallback
        from torch._dynamo.utils import counters
        benchmark.extra_info["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    result = benchmark(call)
    return result


def forward_or_backward(mode, loss_fn, inputs):
    """A zero-arg callable: the loss, or the loss and its gradient w.r.t. `inputs`."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return loss_fn()
        return fwd

    def fwd_bwd():
        loss = loss_fn()
        if loss.dim() > 0:
            loss = loss.sum()
        return torch.autograd.grad(loss, inputs)
    return fwd_bwd
