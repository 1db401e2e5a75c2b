"""Property-based tests of dual_distillation_loss (issue 17): random valid inputs against the
float64 twin (values and gradients, every float dtype, non-contiguous, large logits and
offsets), random invalid inputs, NaN/Inf inputs, and crash-isolated direct torch.ops calls.
Example counts: the hypothesis profile."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from fcl_ext import ops, reference
from tests.properties import (SCALES, assert_like_twin, assert_nan_like_twin, assert_rejected, dtypes, layouts, leaf,
                              run_op_fuzz, tensor)


@st.composite
def dual_inputs(draw, dtype=None):
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    dtype = dtype or draw(dtypes())
    scale, seed = draw(st.sampled_from(SCALES)), draw(st.integers(0, 2 ** 16))
    offset = draw(st.sampled_from([0.0, 0.0, 100.0, -3000.0]))
    s = tensor((n, c), dtype, scale=scale, seed=seed, layout=draw(layouts()), offset=offset)
    labels = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    labels = labels.to(draw(st.sampled_from([torch.int64, torch.int32])))
    teachers = [tensor((n, c), draw(st.sampled_from([dtype, torch.float64])), scale=scale, seed=seed + i + 1,
                       offset=offset) if draw(st.booleans()) else None for i in range(2)]
    return s, labels, teachers, scale, abs(offset)


@given(inputs=dual_inputs(), temperature=st.sampled_from([0.5, 1.0, 3.0]), squared=st.booleans(),
       weights=st.tuples(st.sampled_from([0.0, 1.0, 0.3]), st.sampled_from([1.0, 2.0]), st.sampled_from([0.0, 0.7])),
       grad_out=st.sampled_from([1.0, -2.5]))
def test_valid_inputs_match_twin(inputs, temperature, squared, weights, grad_out):
    s, labels, teachers, scale, offset = inputs
    dtype = s.dtype
    s, s64 = leaf(s)
    kw = dict(temperature=temperature, temperature_squared=squared, ce_weight=weights[0], intra_weight=weights[1],
              inter_weight=weights[2])
    out = ops.dual_distillation_loss(s, labels, *teachers, **kw)
    # the op casts teachers to the student's dtype first
    t64 = [None if t is None else t.to(dtype).double() for t in teachers]
    exact = reference.dual_distillation_loss(s64, labels, *t64, **kw)
    assert out.dtype == dtype
    # log-sum-exp of logits ~ scale + offset: that is what rounds (in float32 and float64 alike);
    # KL terms divide it by T (and T^2 multiplies them back when squared).
    magnitude = (scale + offset) / min(temperature, 1.0) * (1 + sum(weights)) * (temperature ** 2 if squared else 1)
    assert_like_twin(out, exact, dtype, floor=1.0, compute_scale=magnitude, what="loss")
    g, = torch.autograd.grad(out, s, torch.tensor(grad_out, dtype=dtype))
    g64, = torch.autograd.grad(exact, s64, torch.tensor(grad_out, dtype=torch.float64))
    assert_like_twin(g, g64, dtype, cond=4.0, floor=abs(grad_out) / s.shape[0],
                     compute_scale=magnitude * abs(grad_out) / s.shape[0], what="grad")


@given(inputs=dual_inputs(dtype=torch.float64), dtype=st.sampled_from([torch.float64, torch.float32]),
       bad=st.lists(st.tuples(st.integers(0, 71), st.sampled_from(["nan", "inf", "-inf"])), min_size=1, max_size=3),
       where=st.sampled_from(["logits", "intra", "inter"]))
def test_non_finite_inputs_like_twin(inputs, dtype, bad, where):
    s, labels, teachers, _, _ = inputs
    s = s.to(dtype).contiguous()
    teachers = [s.detach().clone() * 0.5 if t is None else t.to(dtype).contiguous() for t in teachers]
    target = {"logits": s, "intra": teachers[0], "inter": teachers[1]}[where]
    for flat, value in bad:
        target.view(-1)[flat % target.numel()] = float(value)
    s, s64 = leaf(s)
    out = ops.dual_distillation_loss(s, labels, *teachers, temperature=2.0)
    exact = reference.dual_distillation_loss(s64, labels, *(t.double() for t in teachers), temperature=2.0)
    assert_nan_like_twin(out, exact)
    g, = torch.autograd.grad(out, s)
    g64, = torch.autograd.grad(exact, s64)
    assert_nan_like_twin(g, g64, what="grad")


def _s(n=3, c=4, dtype=torch.float32):
    return tensor((n, c), dtype)


Y = torch.tensor([0, 1, 3])
BAD_CALLS = {
    "labels out of range": (lambda: ops.dual_distillation_loss(_s(), torch.tensor([0, 1, 4])), "labels"),
    "negative label": (lambda: ops.dual_distillation_loss(_s(), torch.tensor([0, -1, 2])), "labels"),
    "float labels": (lambda: ops.dual_distillation_loss(_s(), Y.float()), "labels"),
    "labels wrong length": (lambda: ops.dual_distillation_loss(_s(), Y[:2]), "labels"),
    "labels not a tensor": (lambda: ops.dual_distillation_loss(_s(), [0, 1, 3]), "labels"),
    "empty logits": (lambda: ops.dual_distillation_loss(_s(0, 4), Y[:0]), "logits"),
    "logits not a tensor": (lambda: ops.dual_distillation_loss(None, Y), "logits"),
    "integer logits": (lambda: ops.dual_distillation_loss(torch.ones(3, 4, dtype=torch.int64), Y), "logits"),
    "intra wrong shape": (lambda: ops.dual_distillation_loss(_s(), Y, _s(3, 5)), "intra_logits"),
    "inter integer": (lambda: ops.dual_distillation_loss(_s(), Y, None, torch.ones(3, 4, dtype=torch.int64)),
                      "inter_logits"),
    "inter not a tensor": (lambda: ops.dual_distillation_loss(_s(), Y, None, [[0.0] * 4] * 3), "inter_logits"),
    "temperature_squared not bool": (lambda: ops.dual_distillation_loss(_s(), Y, temperature_squared=1),
                                     "temperature_squared"),
}


@given(case=st.sampled_from(sorted(BAD_CALLS)), value=st.sampled_from([None, "2", -1.0, float("nan"), float("inf")]),
       which=st.sampled_from(["call", "temperature", "ce_weight", "intra_weight", "inter_weight"]))
def test_invalid_inputs_raise_naming_the_argument(case, value, which):
    if which == "call":
        call, name = BAD_CALLS[case]
        assert_rejected(call, name, case)
    else:
        assert_rejected(lambda: ops.dual_distillation_loss(_s(), Y, _s(), _s(), **{which: value}), which,
                        f"{which}={value!r}")


def test_direct_op_calls_never_crash():
    assert run_op_fuzz("dual_distillation")["cases"] > 0
