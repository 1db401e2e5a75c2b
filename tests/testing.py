"""Shared test settings: devices, dtypes, tolerances, and the CUDA skip reason."""
import pytest
import torch

import fcl_ext

HAS_CUDA_KERNELS = fcl_ext.info()["cuda_kernels"]
HAS_GPU = torch.cuda.is_available()
CUDA_SKIP_REASON = ("no CUDA device visible" if not HAS_GPU
                    else "this build has no CUDA kernels" if not HAS_CUDA_KERNELS else "")


def devices():
    """cpu always; cuda as a parameter that skips with a reason where it cannot run."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not (HAS_GPU and HAS_CUDA_KERNELS), reason=CUDA_SKIP_REASON or "cuda"))]


FLOAT_DTYPES = [torch.float64, torch.float32]
REDUCED_DTYPES = [torch.bfloat16, torch.float16]

# (rtol, atol) for comparing an op with its reference at a given input dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, **kwargs):
    dtype = dtype or expected.dtype
    opts = tol(dtype)
    opts.update(kwargs)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **opts)


def make_logits(shape, dtype=torch.float64, device="cpu", scale=3.0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


# ---- tolerances that would catch a wrong kernel (issue 17) ---------------------------

# A float64 op against its float64 twin: both are float64 arithmetic that differ only in the
# order of rounding, so they agree to ~1e-12 relative, times the problem's condition where
# it amplifies rounding. A single float32 step inside a kernel is ~1e-7 off and fails this.
F64_RTOL = 1e-12


def assert_close_f64(actual, expected, cond=1.0):
    """actual (float64) == expected (float64 twin) to F64_RTOL * cond, relative to the
    largest |expected| for entries near zero; NaN must match NaN."""
    assert actual.dtype == torch.float64 and expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    finite = expected.detach()[torch.isfinite(expected.detach())]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    rtol = F64_RTOL * cond
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300), equal_nan=True)


_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |exact| (a float64 tensor); subnormals get the smallest normal's."""
    _, exponent = torch.frexp(exact.abs().clamp_min(torch.finfo(dtype).tiny).double())
    return torch.ldexp(torch.ones_like(exact, dtype=torch.float64), exponent - 1 - _MANTISSA_BITS[dtype])


def assert_rounded_from_float32(actual, exact, *, ulps=0.75, atol=0.0):
    """A reduced-precision result that was accumulated in float32 and rounded once is within
    half an ulp of the exact value (plus float32's own error, far below that): `ulps` of
    its dtype at the exact value (float64), plus `atol` for entries whose value cancels."""
    limit = ulps * ulp(exact, actual.dtype) + atol
    err = (actual.double() - exact).abs()
    worst = int(torch.argmax(err - limit))
    assert bool((err <= limit).all()), (f"{actual.dtype} result not float32-accumulated: |error| "
                                        f"{float(err.flatten()[worst]):.3g} > {float(limit.flatten()[worst]):.3g} "
                                        f"at flat index {worst} (exact {float(exact.flatten()[worst]):.6g})")


# ---- crash isolation ---------------------------------------------------------------

def run_isolated(code: str, timeout: float = 300.0):
    """Run `code` in a fresh Python (this checkout on the path); a segfault or abort there
    comes back as a failing return code instead of killing pytest. -> CompletedProcess."""
    import os
    import pathlib
    import subprocess
    import sys
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- hypothesis profiles -------------------------------------------------------------

def register_hypothesis_profiles():
    """Property tests take their example counts from a profile: "fast" (default, part of
    `make test`: derandomized, a dozen examples per test) or "large" (FCL_EXT_HYPOTHESIS=large,
    random, 300 per test). Tests with their own @settings keep theirs."""
    import os
    from hypothesis import HealthCheck, Phase, settings
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    # The fast profile reports a failing example as found (no shrinking): it stays fast when red.
    settings.register_profile("fast", max_examples=12, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=quiet, phases=[Phase.explicit, Phase.generate])
    settings.register_profile("large", max_examples=300, deadline=None, derandomize=False, print_blob=True,
                              suppress_health_check=quiet)
    settings.load_profile(os.environ.get("FCL_EXT_HYPOTHESIS", "fast"))
