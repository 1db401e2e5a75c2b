"""Property-based tests of gradient_matching_loss and lbfgs_direction (issue 17): random valid
inputs against the float64 twin (values and gradients, every float dtype, non-contiguous,
empty, extreme scales), random invalid inputs, NaN/Inf inputs, and crash-isolated direct
torch.ops calls. Example counts: the hypothesis profile."""
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from fcl_ext import ops, reference
from tests.properties import (assert_like_twin, assert_nan_like_twin, assert_rejected, dtypes, layouts, leaf,
                              run_op_fuzz, tensor)


@given(k=st.integers(0, 6), p=st.integers(1, 50), dtype=dtypes(), layout=layouts(),
       scale=st.sampled_from([1e-6, 1.0, 1e3]), closeness=st.sampled_from([0.0, 0.1, 1.0, 10.0]),
       metric=st.sampled_from(["l2", "cosine"]), seed=st.integers(0, 2 ** 16), zero_row=st.booleans())
def test_matching_valid_inputs_match_twin(k, p, dtype, layout, scale, closeness, metric, seed, zero_row):
    g = tensor((k, p), dtype, scale=scale, seed=seed, layout=layout)
    t = (g.double() + closeness * tensor((k, p), torch.float64, scale=scale, seed=seed + 1)).to(dtype)
    if zero_row and k:
        g[0] = 0  # a zero norm: cosine is defined as 1 there, gradient 0
    g, g64 = leaf(g)
    out = ops.gradient_matching_loss(g, t, metric=metric)
    exact = reference.gradient_matching_loss(g64, t.double(), metric=metric)
    assert out.dtype == dtype and out.shape == (k,)
    if metric == "l2":
        # sum (g - t)^2: each difference rounds at ~scale, squared and summed over p
        assert_like_twin(out, exact, dtype, compute_scale=p * scale ** 2 * (1 + closeness), what="l2")
    else:
        # 1 - cos cancels when g ~ t: the rounding of <g,t>/(|g||t|) (~1) is what remains
        assert_like_twin(out, exact, dtype, floor=1.0, compute_scale=float(p), what="cosine")
    grad_out = tensor((k,), torch.float64, seed=seed + 2)
    gr, = torch.autograd.grad(out, g, grad_out.to(dtype))
    gr64, = torch.autograd.grad(exact, g64, grad_out)
    top = float(grad_out.abs().max()) if k else 0.0
    if metric == "l2":
        assert_like_twin(gr, gr64, dtype, cond=2.0, compute_scale=top * scale * (1 + closeness), what="l2 grad")
    else:
        # a g - b t: two terms of the gradient's natural size up / |g| whose coefficients carry ~5 roundings each
        # (sums, sqrt, division), so where they cancel (p = 1, or t = g) ~10 ulp of that size remain (the large
        # profile found 8 ulp at p = 1, t = g; float32 arithmetic would be 1e-7, not 1e-15)
        # (up / |g| with the row's own norm: a p = 1 row drawn at 0.3 scale has a gradient 3x the scale's)
        norms = g64.detach().norm(dim=1)
        smallest = min([scale] + [float(n) for n in norms if n > 0])
        assert_like_twin(gr, gr64, dtype, cond=4.0, compute_scale=4 * top * p / smallest, what="cosine grad")


@given(k=st.integers(1, 4), p=st.integers(1, 12), dtype=st.sampled_from([torch.float64, torch.float32]),
       metric=st.sampled_from(["l2", "cosine"]),
       bad=st.lists(st.tuples(st.integers(0, 47), st.sampled_from(["nan", "inf", "-inf"])), min_size=1, max_size=3),
       in_target=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matching_non_finite_inputs_like_twin(k, p, dtype, metric, bad, in_target, seed):
    g, t = tensor((k, p), dtype, seed=seed), tensor((k, p), dtype, seed=seed + 1)
    target = t if in_target else g
    for flat, value in bad:
        target.view(-1)[flat % target.numel()] = float(value)
    g, g64 = leaf(g)
    out = ops.gradient_matching_loss(g, t, metric=metric)
    exact = reference.gradient_matching_loss(g64, t.double(), metric=metric)
    assert_nan_like_twin(out, exact)
    gr, = torch.autograd.grad(out.sum(), g)
    gr64, = torch.autograd.grad(exact.sum(), g64)
    assert_nan_like_twin(gr, gr64, what="grad")


@st.composite
def lbfgs_inputs(draw):
    k, m, d = draw(st.integers(0, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2 ** 16))
    grad = tensor((k, d), dtype, seed=seed, layout=draw(layouts()))
    s = tensor((k, m, d), dtype, seed=seed + 1)
    # y = A s with A symmetric positive definite (a convex quadratic): <y, s> > 0, rho finite
    a = tensor((d, d), torch.float64, seed=seed + 2)
    spd = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    y = (s.double() @ spd).to(dtype)
    rho = 1 / (y.double() * s.double()).sum(-1)
    hist_len = torch.tensor(draw(st.lists(st.integers(0, m), min_size=k, max_size=k)), dtype=torch.int64)
    hist_start = (torch.tensor(draw(st.lists(st.integers(0, m - 1), min_size=k, max_size=k)), dtype=torch.int64)
                  if draw(st.booleans()) else None)
    h_diag = tensor((k,), torch.float64, seed=seed + 3).abs().add(0.1).to(dtype)
    return grad, s, y, rho.to(dtype), hist_len, h_diag, hist_start


@given(inputs=lbfgs_inputs())
def test_lbfgs_valid_inputs_match_twin(inputs):
    grad, s, y, rho, hist_len, h_diag, hist_start = inputs
    out = ops.lbfgs_direction(grad, s, y, rho, hist_len, h_diag, hist_start=hist_start)
    as64 = [t.double() for t in (grad, s, y, rho)]
    exact = reference.lbfgs_direction(*as64, hist_len, h_diag.double(), hist_start=hist_start)
    assert out.dtype == grad.dtype and out.shape == grad.shape
    # up to 2 M dot products and axpys of length D: the conditioning of the quadratic (<= ~D) multiplies rounding
    m, d = s.shape[1], s.shape[2]
    assert_like_twin(out, exact, grad.dtype, cond=8.0 * m * d, what="direction")


BAD_CALLS = {
    "grads not a tensor": (lambda: ops.gradient_matching_loss([[1.0]], tensor((1, 1))), "grads"),
    "integer grads": (lambda: ops.gradient_matching_loss(torch.ones(2, 3, dtype=torch.int64), tensor((2, 3))),
                      "grads"),
    "grads 1-D": (lambda: ops.gradient_matching_loss(tensor((3,)), tensor((3,))), "grads"),
    "target shape": (lambda: ops.gradient_matching_loss(tensor((2, 3)), tensor((2, 4))), "target_grads"),
    "target dtype": (lambda: ops.gradient_matching_loss(tensor((2, 3)), tensor((2, 3), torch.float32)),
                     "target_grads"),
    "target not a tensor": (lambda: ops.gradient_matching_loss(tensor((2, 3)), None), "target_grads"),
    "metric": (lambda: ops.gradient_matching_loss(tensor((2, 3)), tensor((2, 3)), metric="l1"), "metric"),
    "metric not a str": (lambda: ops.gradient_matching_loss(tensor((2, 3)), tensor((2, 3)), metric=None), "metric"),
}


def _lbfgs_args(k=2, m=3, d=4):
    return [tensor((k, d)), tensor((k, m, d), seed=1), tensor((k, m, d), seed=2), tensor((k, m), seed=3),
            torch.full((k,), m), torch.ones(k, dtype=torch.float64), None]


LBFGS_NAMES = ["grad", "s_hist", "y_hist", "rho", "hist_len", "h_diag", "hist_start"]


@given(case=st.sampled_from(sorted(BAD_CALLS)), arg=st.integers(0, 6),
       value=st.sampled_from(["list", "none", "int32", "shape", "half"]), which=st.sampled_from(["matching", "lbfgs"]))
def test_invalid_inputs_raise_naming_the_argument(case, arg, value, which):
    if which == "matching":
        call, name = BAD_CALLS[case]
        assert_rejected(call, name, case)
        return
    args = _lbfgs_args()
    original = args[arg] if args[arg] is not None else torch.zeros(2, dtype=torch.int64)
    if value == "none" and arg == 6:
        return  # hist_start=None is the default
    args[arg] = {"list": lambda: original.tolist(), "none": lambda: None, "int32": lambda: original.to(torch.int32),
                 "shape": lambda: original[..., :1].unsqueeze(0), "half": lambda: original.half()}[value]()
    if value == "half" and arg not in (0, 4, 6):
        names = (LBFGS_NAMES[arg],)
    elif value == "half" and arg == 0:
        names = ("grad", "s_hist", "y_hist", "rho", "h_diag")  # float16 grad: every float argument now disagrees
    elif value == "shape" and arg in (0, 1):
        names = tuple(LBFGS_NAMES)  # grad and s_hist fix K, M, D: either may be reported
    else:
        names = (LBFGS_NAMES[arg],)
    assert_rejected(lambda: ops.lbfgs_direction(*args[:6], hist_start=args[6]), names, f"{LBFGS_NAMES[arg]}: {value}")


def test_direct_matching_op_calls_never_crash():
    assert run_op_fuzz("gradient_matching")["cases"] > 0


def test_direct_lbfgs_op_calls_never_crash():
    assert run_op_fuzz("lbfgs")["cases"] > 0


@given(k=st.integers(1, 4), p=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.float64]),
       where=st.floats(0.0, 1.0), closeness=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2 ** 16))
@example(k=2, p=33, dtype=torch.float32, where=0.043, closeness=1.0, seed=1)  # a subnormal / rounding case, run every time
@example(k=2, p=33, dtype=torch.float64, where=0.0176, closeness=1.0, seed=1)  # a subnormal / rounding case, run every time
def test_cosine_does_not_change_when_a_row_is_scaled_by_a_power_of_two(k, p, dtype, where, closeness, seed):
    # The cosine loss is invariant to g -> 2^e g (exact) and its gradient scales by 2^-e, over the whole range of
    # the dtype (rows whose largest entry is subnormal or near the largest finite value included).
    lo, hi = {torch.float32: (-152, 125), torch.float64: (-1077, 1020)}[dtype]  # subnormal .. near the largest
    exponent = lo + round(where * (hi - lo))
    g = tensor((k, p), dtype, seed=seed)
    t = (g.double() + closeness * tensor((k, p), torch.float64, seed=seed + 1)).to(dtype)
    half = exponent // 2
    scaled = (g.double() * 2.0 ** half * 2.0 ** (exponent - half)).to(dtype)
    assume(bool(torch.isfinite(scaled).all()) and bool((scaled != 0).any(dim=1).all()))
    # the rows as rounded (subnormals lose digits), brought back to unit scale exactly: the oracle's input
    unit = scaled.double() * 2.0 ** -half * 2.0 ** -(exponent - half)
    g_op, _ = leaf(scaled)
    out = ops.gradient_matching_loss(g_op, t, metric="cosine")
    g64 = unit.requires_grad_()
    exact = reference.gradient_matching_loss(g64, t.double(), metric="cosine")
    assert_like_twin(out, exact, dtype, floor=1.0, compute_scale=float(p), what=f"cosine, g scaled by 2^{exponent}")
    # d loss / d g at scale 2^e is 2^-e times the unit-scale one: an upstream gradient 2^u with u = e clipped to
    # what the dtype holds keeps the result in range
    limit = 120 if dtype == torch.float32 else 1000
    up_exp = max(-limit, min(limit, exponent))
    up = torch.full((k,), 2.0 ** up_exp, dtype=torch.float64)
    gr, = torch.autograd.grad(out, g_op, up.to(dtype))
    gr64, = torch.autograd.grad(exact, g64, up)
    expected = gr64 * 2.0 ** -half * 2.0 ** -(exponent - half)
    assert torch.isfinite(expected).all()
    # the gradient's natural size, up 2^-e / |g| (its entries can cancel to 0, e.g. at p = 1)
    natural = 2.0 ** (up_exp - exponent) / float(unit.norm(dim=1).min())
    assert_like_twin(gr, expected, dtype, cond=4.0, compute_scale=natural * p,
                     what=f"cosine grad, g scaled by 2^{exponent}")
