"""pytest-benchmark harness shared by every op benchmark.

One benchmark group per (op, mode, device, dtype, shape); inside it the implementations
`fcl_ext`, `eager` (fcl_ext.reference) and `compiled` (torch.compile of the reference).
CUDA work is synchronised inside the timed call. Peak memory is measured in one extra
untimed call (CUDA: allocator peak; CPU: not tracked).
"""
import os

import pytest
import torch

IMPLS = ["fcl_ext", "eager", "compiled"]
MODES = ["fwd", "fwd+bwd"]


def pytest_configure(config):
    # FCL_EXT_BENCH_THREADS pins torch's CPU threads (e.g. 1 on a shared machine, where idle
    # OpenMP threads spin-wait and turn medians into scheduling noise). Default: torch's own.
    threads = os.environ.get("FCL_EXT_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


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


_COMPILED = {}


def implementation(impl, fused, reference):
    """The callable for one implementation: fused op, eager reference, or compiled reference."""
    if impl == "fcl_ext":
        return fused
    if impl == "eager":
        return reference
    key = id(reference)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(reference, dynamic=False)
    return _COMPILED[key]


def run_case(benchmark, *, op, mode, device, dtype, shape, impl, make_call, bytes_moved=None, smoke=False):
    """Time `make_call()` (a zero-arg callable returning the result) for one case.

    mode "fwd" times the forward; "fwd+bwd" times forward plus torch.autograd.grad.
    """
    if impl == "compiled" and smoke:
        pytest.skip("torch.compile is skipped in smoke mode (make test); make bench runs it")
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
