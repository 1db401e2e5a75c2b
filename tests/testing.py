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
    torch.float64: (1e-6, 1e-9),
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
