"""Shared pieces of the property-based tests (tests/test_properties_*.py): input strategies,
dtype-aware comparison with the float64 twin, checks of rejected inputs, and the crash-isolated
fuzz of direct torch.ops.fcl_ext.* calls (tests/op_fuzz.py, run in a subprocess)."""
import json
import os
import re

import torch
from hypothesis import settings
from hypothesis import strategies as st

from tests.testing import run_isolated

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided"]
SCALES = [1e-3, 1.0, 8.0, 60.0]

# Relative error allowed against the float64 twin on the same (rounded) inputs, before the
# problem's condition: float32 accumulation over short rows, or one rounding of the output.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def fast_examples(n: int):
    """Fewer examples than the fast profile's for a slow property (the large profile keeps its own)."""
    if os.environ.get("FCL_EXT_HYPOTHESIS", "fast") == "fast":
        return settings(max_examples=n)
    return lambda test: test


def dtypes():
    return st.sampled_from(ALL_DTYPES)


def layouts():
    return st.sampled_from(LAYOUTS)


def tensor(shape, dtype=torch.float64, *, scale=1.0, seed=0, layout="contiguous", offset=0.0):
    """Random normal values (float64 draw, rounded to dtype) in the given memory layout:
    "transposed" (a .t() / permuted view) or "strided" (every other column of a wider buffer)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(shape[::-1], generator=g, dtype=torch.float64) * scale + offset
        x = base.to(dtype).permute(*reversed(range(len(shape))))
    elif layout == "strided" and len(shape) >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64) * scale + offset
        x = base.to(dtype)[..., ::2]
    else:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    assert tuple(x.shape) == shape
    return x


def leaf(x):
    """x (any layout) as a leaf that requires grad, plus its float64 twin input (same values)."""
    x = x.detach().requires_grad_()
    return x, x.detach().double().requires_grad_()


# What the arithmetic itself costs, per unit of `compute_scale` (the size of the values the
# kernel adds and subtracts, e.g. the largest |logit|): float64 for float64, float32 otherwise.
COMPUTE_EPS = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def assert_like_twin(actual, exact, dtype, *, cond=1.0, floor=0.0, compute_scale=0.0, what="value"):
    """The op's result (in dtype) against the float64 twin's on the same inputs.

    Allowed: RTOL[dtype] * cond relative, and as much absolute error relative to
    max(largest |exact|, floor) for entries near zero, plus COMPUTE_EPS[dtype] * compute_scale
    for the rounding of intermediate values; NaN where (and only where) the twin has NaN."""
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    actual, exact = actual.detach().double(), exact.detach()
    # beyond the dtype's range the right answer is an infinity (float16's max is 65504)
    exact = torch.where(exact.abs() > torch.finfo(dtype).max, exact.sign() * float("inf"), exact)
    finite = exact[torch.isfinite(exact)]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, floor)
    rtol = RTOL[dtype] * cond
    # + half the dtype's smallest subnormal: a result below it underflows to 0, rightly
    atol = rtol * scale + COMPUTE_EPS[dtype] * compute_scale + torch.finfo(dtype).smallest_normal * RTOL[dtype] / 2
    torch.testing.assert_close(actual, exact, rtol=rtol, atol=max(atol, 1e-300), equal_nan=True,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def assert_nan_like_twin(actual, exact, what="value"):
    """NaN in -> NaN out: the op is NaN exactly where the twin is, and finite where it is finite."""
    actual, exact = actual.detach(), exact.detach()
    assert torch.equal(torch.isnan(actual), torch.isnan(exact)), (
        f"{what}: NaN at {torch.isnan(actual).nonzero().tolist()}, twin NaN at {torch.isnan(exact).nonzero().tolist()}")
    assert torch.equal(torch.isfinite(actual), torch.isfinite(exact)), (
        f"{what}: finite {torch.isfinite(actual).tolist()}, twin finite {torch.isfinite(exact).tolist()}")


ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError, IndexError)


def assert_rejected(call, names, what=""):
    """call() raises ValueError/TypeError/RuntimeError/IndexError whose message names one of `names`."""
    names = (names,) if isinstance(names, str) else tuple(names)
    try:
        call()
    except ALLOWED_ERRORS as err:
        message = str(err)
        assert any(re.search(rf"\b{re.escape(n)}\b", message) for n in names), (
            f"{what}: {type(err).__name__} does not name {names}: {message[:300]}")
        return
    raise AssertionError(f"{what}: accepted; expected an error naming {names}")


FUZZ_FAMILIES = ("entropy", "glfc", "cross_correlation", "dual_distillation", "gradient_matching", "lbfgs")
_FUZZ_RESULTS = {}


def _run_fuzz_processes(families):
    """Fuzz `families` in as few fresh processes as possible (one, unless one crashes: the rest
    then run in the next process). -> {family: (ok, detail)}."""
    profile = os.environ.get("FCL_EXT_HYPOTHESIS", "fast")
    results, todo = {}, list(families)
    while todo:
        proc = run_isolated(f"from tests.op_fuzz import main; main({todo!r}, {profile!r})", timeout=1800)
        current, last_case = None, "?"
        for line in proc.stdout.splitlines():
            if line.startswith("FAMILY START "):
                current, last_case = line.split()[2], "?"
            elif line.startswith("CASE "):
                last_case = line[5:]
            elif line.startswith(("FAMILY OK ", "FAMILY FAIL ")):
                _, status, family, detail = line.split(" ", 3)
                results[family] = (status == "OK", json.loads(detail))
                current = None
        if current is None and proc.returncode != 0:
            raise AssertionError(f"op fuzz process failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        if current is not None:  # it died inside this family
            results[current] = (False, {"error": f"crashed the process (rc {proc.returncode}) on: {last_case}"})
        todo = [f for f in todo if f not in results]
    return results


def run_op_fuzz(family: str):
    """Fuzz direct torch.ops.fcl_ext calls of one op family (forward and private backward, each
    case one broken argument that must be rejected naming it) in a fresh process with the
    current hypothesis profile; a crash there fails here with the case that crashed. All
    families run together the first time one is asked for (one interpreter start, not six)."""
    if family not in _FUZZ_RESULTS:
        _FUZZ_RESULTS.update(_run_fuzz_processes([f for f in FUZZ_FAMILIES if f not in _FUZZ_RESULTS]))
    ok, detail = _FUZZ_RESULTS[family]
    assert ok, f"direct {family} op calls: {detail['error']}"
    return detail
