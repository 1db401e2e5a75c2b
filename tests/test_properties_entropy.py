"""Property-based tests of softmax_entropy (issue 17): random valid inputs against the float64
twin (values and gradients, every float dtype, non-contiguous, empty), random invalid inputs
(a clear error naming the argument), NaN/Inf inputs (NaN where the twin has NaN), and direct
torch.ops calls of the op and its private backward (crash-isolated).
Example counts: the hypothesis profile (tests/testing.py, FCL_EXT_HYPOTHESIS)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fcl_ext import ops, reference
from tests.properties import (SCALES, assert_like_twin, assert_nan_like_twin, assert_rejected, dtypes, layouts, leaf,
                              run_op_fuzz, tensor)

EPS = [0.0, 1e-5]


@st.composite
def shapes(draw):
    rows = draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))
    return (*rows, draw(st.integers(1, 40)))


@given(shape=shapes(), dtype=dtypes(), scale=st.sampled_from(SCALES), layout=layouts(), eps=st.sampled_from(EPS),
       reduction=st.sampled_from(["none", "sum", "mean"]), seed=st.integers(0, 2 ** 16))
def test_valid_inputs_match_twin(shape, dtype, scale, layout, eps, reduction, seed):
    x, x64 = leaf(tensor(shape, dtype, scale=scale, seed=seed, layout=layout))
    out = ops.softmax_entropy(x, reduction=reduction, eps=eps)
    exact = reference.softmax_entropy(x64, reduction=reduction, eps=eps)
    assert out.dtype == dtype and out.shape == exact.shape
    # H is at most log C; its terms carry logits up to ~scale (their rounding is compute_scale).
    rows = max(1, math.prod(shape[:-1])) if reduction != "none" else 1
    floor = math.log(shape[-1]) + 1
    assert_like_twin(out, exact, dtype, floor=floor * rows, compute_scale=scale * rows)
    grad_out = tensor(exact.shape, torch.float64, seed=seed + 1)
    g, = torch.autograd.grad(out, x, grad_out.to(dtype))
    g64, = torch.autograd.grad(exact, x64, grad_out)
    assert g.dtype == dtype
    assert_like_twin(g, g64, dtype, floor=float(grad_out.abs().max()) if grad_out.numel() else 0.0,
                     compute_scale=scale * float(grad_out.abs().max() if grad_out.numel() else 0), what="grad")


@given(rows=st.integers(1, 4), cols=st.integers(1, 12), dtype=st.sampled_from([torch.float64, torch.float32]),
       eps=st.sampled_from(EPS), bad=st.lists(st.tuples(st.integers(0, 47), st.sampled_from(["nan", "inf", "-inf"])),
                                              min_size=1, max_size=4), seed=st.integers(0, 2 ** 16))
def test_non_finite_inputs_like_twin(rows, cols, dtype, eps, bad, seed):
    x = tensor((rows, cols), dtype, scale=3.0, seed=seed)
    for flat, value in bad:
        x.view(-1)[flat % x.numel()] = float(value)
    x, x64 = leaf(x)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    exact = reference.softmax_entropy(x64, reduction="none", eps=eps)
    assert_nan_like_twin(out, exact)
    g, = torch.autograd.grad(out.sum(), x)
    g64, = torch.autograd.grad(exact.sum(), x64)
    assert_nan_like_twin(g, g64, what="grad")


BAD_CALLS = {
    "logits not a tensor": (lambda: ops.softmax_entropy([[1.0, 2.0]]), "logits"),
    "integer logits": (lambda: ops.softmax_entropy(torch.ones(2, 3, dtype=torch.int64)), "logits"),
    "0-dim logits": (lambda: ops.softmax_entropy(torch.tensor(1.0)), "logits"),
    "no classes": (lambda: ops.softmax_entropy(torch.ones(3, 0)), "logits"),
    "bad reduction": (lambda: ops.softmax_entropy(torch.ones(2, 3), reduction="avg"), "reduction"),
    "reduction None": (lambda: ops.softmax_entropy(torch.ones(2, 3), reduction=None), "reduction"),
}


@given(case=st.sampled_from(sorted(BAD_CALLS)), eps=st.sampled_from([None, "2", -1.0, float("nan"), float("inf"),
                                                                     [0.1]]),
       pick_eps=st.booleans())
def test_invalid_inputs_raise_naming_the_argument(case, eps, pick_eps):
    if pick_eps:
        assert_rejected(lambda: ops.softmax_entropy(torch.ones(2, 3), eps=eps), "eps", f"eps={eps!r}")
    else:
        call, name = BAD_CALLS[case]
        assert_rejected(call, name, case)


def test_direct_op_calls_never_crash():
    summary = run_op_fuzz("entropy")
    assert summary["cases"] > 0
