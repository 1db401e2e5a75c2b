"""Property-based tests of cross_correlation_matrix / cross_correlation_loss (issue 17): random
valid inputs against the float64 twin (values and gradients, every float dtype, non-contiguous,
column offsets), random invalid inputs, NaN/Inf inputs, and crash-isolated direct torch.ops
calls. Example counts: the hypothesis profile."""
import math

import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from fcl_ext import ops, reference
from tests.properties import (assert_like_twin, assert_nan_like_twin, assert_rejected, dtypes, layouts, leaf,
                              run_op_fuzz, tensor)

# binary exponents from below the smallest subnormal to the largest finite value, by dtype
EXPONENT_RANGE = {torch.float32: (-152, 127), torch.float64: (-1077, 1023)}

FORMS = [dict(), dict(off_diag_target=0.0, unbiased=False, eps=1e-5), dict(off_diag_weight=0.3, eps=1e-3)]


def _worst_column(*xs):
    """(condition 1 + |mean| / std, 1 / std) of the worst column: a few rows drawn at `scale` can have a
    std far below it (batch 2: one difference), and the rounding of standardising grows with both."""
    cond, inv_std = 1.0, 0.0
    for x in xs:
        std, mean = x.detach().std(0, unbiased=False), x.detach().mean(0)
        cond, inv_std = max(cond, float((1 + mean.abs() / std).max())), max(inv_std, float(1 / std.min()))
    return cond, inv_std


@given(batch=st.integers(2, 24), ka=st.integers(1, 6), kb=st.integers(1, 6), dtype=dtypes(), layout=layouts(),
       scale=st.sampled_from([1e-2, 1.0, 30.0]), offset=st.sampled_from([0.0, 3.0, -50.0]),
       form=st.sampled_from(range(len(FORMS))), seed=st.integers(0, 2 ** 16))
def test_valid_inputs_match_twin(batch, ka, kb, dtype, layout, scale, offset, form, seed):
    kw = FORMS[form]
    a, a64 = leaf(tensor((batch, ka), dtype, scale=scale, seed=seed, layout=layout, offset=offset))
    b, b64 = leaf(tensor((batch, kb), dtype, scale=scale, seed=seed + 1, offset=-offset))
    # rounding to a narrow dtype can make a column constant (an error with eps = 0, tested elsewhere)
    assume(bool((a64.var(0) > 0).all() and (b64.var(0) > 0).all()))
    # Standardising a column divides by its std: the rounding of offset (and of the dtype's
    # inputs) is amplified by |offset| / scale, the column's condition.
    cond = 1.0 + abs(offset) / scale
    # ... and by the columns as drawn (the large profile found batch 2, scale 1 with a column std of 0.08)
    col_cond, inv_std = _worst_column(a64, b64)
    cond, inv_std = max(cond, col_cond), max(inv_std, 1 / scale)
    m_kw = {k: v for k, v in kw.items() if k in ("unbiased", "eps")}
    m = ops.cross_correlation_matrix(a, b, **m_kw)
    m64 = reference.cross_correlation_matrix(a64, b64, **m_kw)
    assert m.dtype == dtype
    assert_like_twin(m, m64, dtype, floor=1.0, compute_scale=cond * batch, what="matrix")
    grad_m = tensor(m.shape, torch.float64, seed=seed + 2)
    ga, gb = torch.autograd.grad(m, (a, b), grad_m.to(dtype))
    ga64, gb64 = torch.autograd.grad(m64, (a64, b64), grad_m)
    top = float(grad_m.abs().max()) * max(ka, kb) * inv_std
    assert_like_twin(ga, ga64, dtype, cond=4.0, compute_scale=cond * top, what="matrix grad a")
    assert_like_twin(gb, gb64, dtype, cond=4.0, compute_scale=cond * top, what="matrix grad b")
    if ka == kb:
        b2, b2_64 = leaf(tensor((batch, ka), dtype, scale=scale, seed=seed + 3, layout=layout))
        assume(bool((b2_64.var(0) > 0).all()))
        cond2, inv_std2 = _worst_column(a64, b2_64)
        cond2, inv_std2 = max(cond, cond2), max(inv_std, inv_std2)
        out = ops.cross_correlation_loss(a, b2, **kw)
        exact = reference.cross_correlation_loss(a64, b2_64, **kw)
        assert_like_twin(out, exact, dtype, floor=float(ka * ka), compute_scale=cond2 * batch * ka * ka, what="loss")
        ga, gb = torch.autograd.grad(out, (a, b2))
        ga64, gb64 = torch.autograd.grad(exact, (a64, b2_64))
        assert_like_twin(ga, ga64, dtype, cond=4.0, compute_scale=cond2 * ka * ka * inv_std2, what="loss grad a")
        assert_like_twin(gb, gb64, dtype, cond=4.0, compute_scale=cond2 * ka * ka * inv_std2, what="loss grad b")


@given(batch=st.integers(2, 8), k=st.integers(1, 4), dtype=st.sampled_from([torch.float64, torch.float32]),
       bad=st.lists(st.tuples(st.integers(0, 31), st.sampled_from(["nan", "inf", "-inf"])), min_size=1, max_size=3),
       in_b=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_non_finite_inputs_like_twin(batch, k, dtype, bad, in_b, seed):
    # eps > 0 so that a column is never an error: the result must then be NaN exactly like the twin's.
    a, b = tensor((batch, k), dtype, seed=seed), tensor((batch, k), dtype, seed=seed + 1)
    target = b if in_b else a
    for flat, value in bad:
        target.view(-1)[flat % target.numel()] = float(value)
    a, a64 = leaf(a)
    b, b64 = leaf(b)
    m = ops.cross_correlation_matrix(a, b, eps=1e-5)
    m64 = reference.cross_correlation_matrix(a64, b64, eps=1e-5)
    assert_nan_like_twin(m, m64, what="matrix")
    out = ops.cross_correlation_loss(a, b, eps=1e-5)
    exact = reference.cross_correlation_loss(a64, b64, eps=1e-5)
    assert_nan_like_twin(out, exact, what="loss")
    ga, = torch.autograd.grad(out, a)
    ga64, = torch.autograd.grad(exact, a64)
    assert_nan_like_twin(ga, ga64, what="grad a")


def _p(batch=4, k=3, dtype=torch.float32, seed=0):
    return tensor((batch, k), dtype, seed=seed)


BAD_CALLS = {
    "a not a tensor": (lambda: ops.cross_correlation_loss([[1.0]], _p()), "a"),
    "integer b": (lambda: ops.cross_correlation_matrix(_p(), torch.ones(4, 3, dtype=torch.int64)), "b"),
    "a 1-D": (lambda: ops.cross_correlation_matrix(tensor((4,)), _p()), "a"),
    "batch of one": (lambda: ops.cross_correlation_loss(_p(1), _p(1)), "a"),
    "batch sizes differ": (lambda: ops.cross_correlation_matrix(_p(4), _p(5)), ("a", "b")),
    "loss shapes differ": (lambda: ops.cross_correlation_loss(_p(4, 3), _p(4, 2)), "b"),
    "dtypes differ": (lambda: ops.cross_correlation_loss(_p(), _p(dtype=torch.float64)), "b"),
    "constant column, eps 0": (lambda: ops.cross_correlation_loss(torch.ones(4, 3), _p()), ("a", "column")),
    "NaN column, eps 0": (lambda: ops.cross_correlation_matrix(_p().index_fill(0, torch.tensor([1]), float("nan")),
                                                                _p(seed=1)), ("a", "NaN")),
    "unbiased not bool": (lambda: ops.cross_correlation_loss(_p(), _p(), unbiased="yes"), "unbiased"),
}


@given(case=st.sampled_from(sorted(BAD_CALLS)), value=st.sampled_from([None, "1", -1.0, float("nan"), float("inf")]),
       which=st.sampled_from(["call", "eps", "off_diag_weight", "off_diag_target"]))
def test_invalid_inputs_raise_naming_the_argument(case, value, which):
    if which == "call":
        call, name = BAD_CALLS[case]
        assert_rejected(call, name, case)
    elif which == "off_diag_target" and value == -1.0:
        ops.cross_correlation_loss(_p(), _p(seed=1), off_diag_target=value)  # any finite target is valid
    else:
        assert_rejected(lambda: ops.cross_correlation_loss(_p(), _p(seed=1), **{which: value}), which,
                        f"{which}={value!r}")


def test_direct_op_calls_never_crash():
    assert run_op_fuzz("cross_correlation")["cases"] > 0


@given(batch=st.one_of(st.integers(2, 40), st.sampled_from([255, 512, 1000, 4097])),
       dtype=st.sampled_from([torch.float32, torch.float64]), mantissa=st.floats(1.0, 2.0, exclude_max=True),
       where=st.floats(0.0, 1.0), negative=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(batch=512, dtype=torch.float32, mantissa=1.1, where=0.6, negative=False, seed=1)  # a subnormal / rounding case, run every time
@example(batch=7, dtype=torch.float64, mantissa=1.65, where=0.52, negative=True, seed=1)  # a subnormal / rounding case, run every time
def test_constant_column_of_any_value_is_constant(batch, dtype, mantissa, where, negative, seed):
    # A column of one value (any finite value of the dtype, subnormals included): eps = 0 raises "constant"; with
    # eps > 0 its mean is that value exactly and its inv_std 1/sqrt(eps). (B equal values summed round: that
    # rounding once passed for a variance.)
    lo, hi = EXPONENT_RANGE[dtype]
    exponent = lo + round(where * (hi - lo))
    value = torch.tensor(math.ldexp(-mantissa if negative else mantissa, exponent), dtype=torch.float64).to(dtype)
    assume(bool(torch.isfinite(value)) and value.item() != 0.0)
    a, b = tensor((batch, 3), dtype, seed=seed), tensor((batch, 3), dtype, seed=seed + 1)
    a[:, 1] = value
    try:
        ops.cross_correlation_matrix(a, b)
        raise AssertionError(f"constant column {value.item()!r} at batch {batch} was not reported")
    except RuntimeError as err:
        assert "column 1 of a is constant over the batch" in str(err), err
    _, stats, _ = torch.ops.fcl_ext.cross_correlation_matrix(a, b, True, 1e-5)
    assert stats[0, 1].item() == value.item()
    assert abs(stats[1, 1].item() * 1e-5 ** 0.5 - 1.0) < 8 * torch.finfo(dtype).eps


@given(batch=st.integers(2, 40), k=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]),
       where=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
@example(batch=16, k=3, dtype=torch.float32, where=0.043, seed=1)  # a subnormal / rounding case, run every time
@example(batch=16, k=3, dtype=torch.float64, where=0.0176, seed=1)  # a subnormal / rounding case, run every time
@example(batch=16, k=1, dtype=torch.float32, where=0.7578125, seed=0)  # 2^59: s1 * s1 overflowed, s2 did not
@example(batch=17, k=1, dtype=torch.float32, where=1.0, seed=65490)  # 2^127: x - mean overflowed
def test_matrix_does_not_change_when_a_column_is_scaled_by_a_power_of_two(batch, k, dtype, where, seed):
    # With eps = 0, M is invariant to scaling a column by 2^e (exact), over the whole range of the dtype:
    # subnormal columns and columns near the largest finite value included. Where 1/std of the scaled column is
    # beyond the dtype's range the op must say so (not NaN, not "constant").
    a, b = tensor((batch, k), dtype, seed=seed), tensor((batch, k), dtype, seed=seed + 1)
    assume(bool((a.double().var(0) > 0).all() and (b.double().var(0) > 0).all()))
    info = torch.finfo(dtype)
    lo, hi = EXPONENT_RANGE[dtype]
    exponent = lo + round(where * (hi - lo))
    scaled = a.clone()
    scaled[:, 0] = (a[:, 0].double() * 2.0 ** (exponent // 2) * 2.0 ** (exponent - exponent // 2)).to(dtype)
    col = scaled[:, 0].double()
    assume(bool(torch.isfinite(col).all()))
    # subnormal results lose digits when rounded: compare with the column as it is after rounding
    std = col.std().item()
    if std == 0.0:
        return  # rounded to one value (or flushed to 0): the constant-column test's case
    if abs(1.0 / std / info.max - 1.0) < 1e-4:
        return  # 1/std within rounding of the largest finite value: either outcome is right
    if 1.0 / std > info.max:
        try:
            ops.cross_correlation_matrix(scaled, b)
            raise AssertionError(f"1/std = {1 / std:.3g} overflows {dtype} but no error was raised")
        except RuntimeError as err:
            assert "column 0 of a varies, but its standard deviation is so small" in str(err), err
        return
    m = ops.cross_correlation_matrix(scaled, b)
    unit = scaled.double()
    unit[:, 0] = col / col.abs().max()  # the same column at unit scale (a positive factor: M unchanged)
    m64 = reference.cross_correlation_matrix(unit, b.double())
    cond, _ = _worst_column(unit, b.double())
    assert_like_twin(m, m64, dtype, floor=1.0, compute_scale=cond * batch, what=f"matrix, column 0 scaled by 2^{exponent}")
