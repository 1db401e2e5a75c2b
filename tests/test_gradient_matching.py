"""gradient_matching_loss and lbfgs_direction: values and gradients vs the reference,
gradcheck, opcheck, compile, edge cases, bad inputs, and property tests."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fcl_ext import ops, reference
from tests.testing import FLOAT_DTYPES, REDUCED_DTYPES, assert_close, devices, make_logits

METRICS = ["l2", "cosine"]


def make_pair(k, p, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = make_logits((k, p), dtype, device, scale=1.0, seed=seed, requires_grad=requires_grad)
    t = make_logits((k, p), dtype, device, scale=1.0, seed=seed + 1)
    return g, t


def make_history(k, m, d, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(k, m, d, generator=gen, dtype=torch.float64)
    y = s + 0.3 * torch.randn(k, m, d, generator=gen, dtype=torch.float64)  # positive curvature pairs
    rho = 1.0 / (y * s).sum(2)
    h_diag = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    grad = torch.randn(k, d, generator=gen, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    return grad.to(**cast), s.to(**cast), y.to(**cast), rho.to(**cast), h_diag.to(**cast)


# ---- gradient_matching_loss -----------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_matching_loss_matches_reference(device, dtype, metric):
    g, t = make_pair(7, 1031, dtype, device, requires_grad=True)
    out = ops.gradient_matching_loss(g, t, metric=metric)
    ref = reference.gradient_matching_loss(g, t, metric=metric)
    assert out.shape == (7,)
    assert_close(out, ref, dtype)
    grad_out = torch.randn_like(ref)
    g_out, = torch.autograd.grad(out, g, grad_out)
    g_ref, = torch.autograd.grad(ref, g, grad_out)
    assert_close(g_out, g_ref, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_matching_loss_reduced_precision_accumulates_in_float(device, dtype, metric):
    g64, t64 = make_pair(5, 300, torch.float64, device)
    g, t = g64.to(dtype).requires_grad_(), t64.to(dtype)
    out = ops.gradient_matching_loss(g, t, metric=metric)
    assert out.dtype == dtype
    ref = reference.gradient_matching_loss(g.detach().double(), t.double(), metric=metric)
    assert_close(out, ref, dtype, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    gr = g.detach().double().requires_grad_()
    reference.gradient_matching_loss(gr, t.double(), metric=metric).sum().backward()
    assert_close(g.grad, gr.grad, dtype)


@pytest.mark.parametrize("metric", METRICS)
def test_matching_loss_gradcheck(metric):
    g, t = make_pair(3, 11, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.gradient_matching_loss(x, t, metric=metric), (g,))


@pytest.mark.parametrize("metric", METRICS)
def test_matching_loss_gradient_flows_through_a_double_backward_graph(metric):
    # The reconstruction use: grads are themselves gradients (create_graph) of a function of x.
    x = make_logits((4, 6), torch.float64, seed=3, requires_grad=True)
    w = make_logits((6, 5), torch.float64, seed=4)
    t = make_logits((4, 6), torch.float64, seed=5)

    def loss_of(fn):
        def f(x):
            y = torch.tanh(x @ w).sum()
            gx, = torch.autograd.grad(y, x, create_graph=True)  # [4, 6], depends on x
            return fn(gx, t, metric=metric)
        return f

    assert torch.autograd.gradcheck(loss_of(ops.gradient_matching_loss), (x,))
    a, = torch.autograd.grad(loss_of(ops.gradient_matching_loss)(x).sum(), x)
    b, = torch.autograd.grad(loss_of(reference.gradient_matching_loss)(x).sum(), x)
    assert_close(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_matching_loss_opcheck(device, requires_grad, metric):
    g, t = make_pair(4, 37, torch.float32, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.fcl_ext.gradient_matching_loss.default, (g, t, metric))
    g, t = make_pair(3, 8, torch.float64, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.fcl_ext.gradient_matching_loss.default, (g, t, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_matching_loss_compile_fullgraph(metric):
    def f(g, t):
        return ops.gradient_matching_loss(g * 2.0, t, metric=metric).sum() + g.pow(2).mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g, t = make_pair(3, 17, torch.float32, requires_grad=True)
    assert_close(compiled(g, t), f(g, t), torch.float32)
    a, = torch.autograd.grad(compiled(g, t), g)
    b, = torch.autograd.grad(f(g, t), g)
    assert_close(a, b, torch.float32)


def test_matching_loss_no_gradient_to_target():
    g, t = make_pair(3, 10, requires_grad=True)
    t.requires_grad_(True)
    out = ops.gradient_matching_loss(g, t).sum()
    gg, gt = torch.autograd.grad(out, [g, t], allow_unused=True)
    assert gt is None
    assert_close(gg, 2 * (g - t).detach())


def test_matching_loss_known_values_and_zero_norm_rows():
    g = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 2.0, 2.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    l2 = ops.gradient_matching_loss(g, t, metric="l2")
    assert_close(l2, torch.tensor([0.0, 3.0, 10.0], dtype=torch.float64))
    cos = ops.gradient_matching_loss(g, t, metric="cosine")
    assert_close(cos, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))  # equal, zero-norm, orthogonal
    cos.sum().backward()
    assert torch.isfinite(g.grad).all()
    assert torch.all(g.grad[1] == 0)  # undefined cosine: no gradient
    assert_close(g.grad[0], torch.zeros(3, dtype=torch.float64), atol=1e-12)  # minimum at g = t


def test_matching_loss_empty_and_bad_inputs():
    g = torch.empty(0, 5, dtype=torch.float64, requires_grad=True)
    out = ops.gradient_matching_loss(g, torch.empty(0, 5, dtype=torch.float64))
    assert out.shape == (0,)
    out.sum().backward()
    g, t = make_pair(2, 4)
    with pytest.raises(ValueError, match="metric"):
        ops.gradient_matching_loss(g, t, metric="l1")
    with pytest.raises(ValueError, match="target_grads"):
        ops.gradient_matching_loss(g, t[:, :3])
    with pytest.raises(ValueError, match="target_grads"):
        ops.gradient_matching_loss(g, t.float())
    with pytest.raises(ValueError, match="grads"):
        ops.gradient_matching_loss(g[0], t[0])
    with pytest.raises(ValueError, match="grads"):
        ops.gradient_matching_loss(g.long(), t)
    with pytest.raises(RuntimeError, match="metric"):
        torch.ops.fcl_ext.gradient_matching_loss(g, t, "l1")


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), p=st.integers(1, 300), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 1000),
       metric=st.sampled_from(METRICS))
def test_matching_loss_property(k, p, scale, seed, metric):
    g = make_logits((k, p), torch.float64, scale=scale, seed=seed, requires_grad=True)
    t = make_logits((k, p), torch.float64, scale=scale, seed=seed + 7)
    out = ops.gradient_matching_loss(g, t, metric=metric)
    ref = reference.gradient_matching_loss(g, t, metric=metric)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9 * scale * scale)
    if metric == "cosine":
        assert torch.all((out >= -1e-12) & (out <= 2 + 1e-12))
    else:
        assert torch.all(out >= 0)


# ---- lbfgs_direction -----------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lbfgs_direction_matches_reference_with_ring_layout(device, dtype):
    k, m, d = 5, 6, 203
    grad, s, y, rho, h = make_history(k, m, d, dtype, device)
    hist_len = torch.tensor([0, 1, 6, 4, 6], device=device)
    hist_start = torch.tensor([0, 5, 3, 4, 0], device=device)  # wraps around for rows 2 and 3
    out = ops.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=hist_start)
    ref = reference.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=hist_start)
    assert_close(out, ref, dtype, rtol=1e-9 if dtype == torch.float64 else 1e-4)
    assert_close(out[0], -grad[0] * h[0], dtype)  # empty history: scaled steepest descent
    # hist_start=None is slot order 0..len-1
    out0 = ops.lbfgs_direction(grad, s, y, rho, hist_len, h)
    assert_close(out0, reference.lbfgs_direction(grad, s, y, rho, hist_len, h), dtype,
                 rtol=1e-9 if dtype == torch.float64 else 1e-4)


def test_lbfgs_direction_ring_equals_shifted_history():
    # A ring buffer with start j holds the same pairs as the shifted (oldest-first) layout.
    grad, s, y, rho, h = make_history(2, 5, 40)
    start = torch.tensor([2, 4])
    hist_len = torch.tensor([5, 3])
    ring = ops.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=start)
    shifted = []
    for k in range(2):
        order = [(int(start[k]) + i) % 5 for i in range(5)]
        shifted.append((s[k, order], y[k, order], rho[k, order]))
    s2, y2, r2 = (torch.stack(v) for v in zip(*shifted))
    flat = ops.lbfgs_direction(grad, s2, y2, r2, hist_len, h)
    assert_close(ring, flat, rtol=1e-12, atol=1e-12)


def test_lbfgs_direction_satisfies_the_secant_equation():
    # BFGS's inverse-Hessian estimate maps the newest y to the newest s: H y_new = s_new.
    grad, s, y, rho, h = make_history(3, 5, 30)
    hist_len = torch.tensor([5, 3, 1])
    start = torch.tensor([2, 0, 4])
    newest = (start + hist_len - 1) % 5
    rows = torch.arange(3)
    out = ops.lbfgs_direction(y[rows, newest], s, y, rho, hist_len, h, hist_start=start)
    assert_close(out, -s[rows, newest], rtol=1e-9, atol=1e-10)
    # and a descent direction for a positive-curvature history
    d = ops.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=start)
    assert torch.all((d * grad).sum(1) < 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_start", [False, True])
def test_lbfgs_direction_opcheck(device, with_start):
    grad, s, y, rho, h = make_history(3, 4, 19, torch.float32, device)
    hist_len = torch.tensor([0, 2, 4], device=device)
    start = torch.tensor([0, 3, 1], device=device) if with_start else None
    torch.library.opcheck(torch.ops.fcl_ext.lbfgs_direction.default, (grad, s, y, rho, hist_len, h, start))


def test_lbfgs_direction_bad_inputs():
    grad, s, y, rho, h = make_history(2, 3, 7)
    hist_len = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="hist_len"):
        ops.lbfgs_direction(grad, s, y, rho, hist_len.int(), h)
    with pytest.raises(ValueError, match="hist_start"):
        ops.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rho"):
        ops.lbfgs_direction(grad, s, y, rho[:, :2], hist_len, h)
    with pytest.raises(ValueError, match="y_hist"):
        ops.lbfgs_direction(grad, s, y[:, :2], rho, hist_len, h)
    with pytest.raises(ValueError, match="s_hist"):
        ops.lbfgs_direction(grad, s[:, :, :3], y, rho, hist_len, h)
    with pytest.raises(ValueError, match="h_diag"):
        ops.lbfgs_direction(grad, s, y, rho, hist_len, h.float())
    with pytest.raises(ValueError, match="grad"):
        ops.lbfgs_direction(grad.half(), s.half(), y.half(), rho.half(), hist_len, h.half())
    with pytest.raises(RuntimeError, match="hist_len"):
        ops.lbfgs_direction(grad, s, y, rho, torch.tensor([1, 4]), h)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 4), m=st.integers(1, 5), d=st.integers(1, 70), seed=st.integers(0, 1000), data=st.data())
def test_lbfgs_direction_property(k, m, d, seed, data):
    grad, s, y, rho, h = make_history(k, m, d, seed=seed)
    hist_len = torch.tensor(data.draw(st.lists(st.integers(0, m), min_size=k, max_size=k)))
    hist_start = torch.tensor(data.draw(st.lists(st.integers(0, m - 1), min_size=k, max_size=k)))
    out = ops.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=hist_start)
    ref = reference.lbfgs_direction(grad, s, y, rho, hist_len, h, hist_start=hist_start)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)


# ---- regressions (issue 17) ---------------------------------------------------------------

def test_matching_backward_op_checks_stats_and_grad():
    # Used to read out of bounds: the private backward trusted its saved stats.
    g, t = make_pair(4, 9, torch.float32)
    _, stats = torch.ops.fcl_ext.gradient_matching_loss(g, t, "cosine")
    bwd = torch.ops.fcl_ext._gradient_matching_loss_backward
    with pytest.raises(RuntimeError, match=r"stats must have shape \[4, 3\]"):
        bwd(torch.ones(4), g, t, stats[:1], "cosine")
    with pytest.raises(RuntimeError, match=r"stats must have shape \[4, 3\]"):
        bwd(torch.ones(4), g, t, torch.zeros(0), "l2")
    with pytest.raises(RuntimeError, match="stats must have dtype Float"):  # float64 stats, float32 grads
        bwd(torch.ones(4), g, t, stats.double(), "cosine")
    with pytest.raises(RuntimeError, match=r"grad_loss must have the shape of the forward.s output \[4\]"):
        bwd(torch.ones(2), g, t, stats, "cosine")
    with pytest.raises(RuntimeError, match="grad_loss must have the dtype of grads"):
        bwd(torch.ones(4, dtype=torch.float64), g, t, stats, "cosine")


def test_l2_backward_does_not_overflow_where_the_difference_does_not():
    # a*g - b*t with a = b = 2 overflowed (inf - inf = NaN) where 2 * go * (g - t) is finite.
    g = torch.tensor([[3e38, 1.0, -2e38], [1.0, 2.0, 3.0]], requires_grad=True)
    t = torch.tensor([[2.9e38, 0.5, -2.1e38], [1.0, 1.0, 1.0]])
    go = torch.tensor([1.0, 0.5])
    grad, = torch.autograd.grad(ops.gradient_matching_loss(g, t, metric="l2"), g, go)
    expected = 2 * go[:, None].double() * (g.detach().double() - t.double())
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("g_norm,t_norm", [(1e-19, 1.0), (1e19, 1.0), (1e-19, 1e19), (1e19, 1e-19), (3e-18, 2e17)])
@pytest.mark.parametrize("p", [7, 1000])
def test_cosine_is_right_at_extreme_norms(g_norm, t_norm, p):
    # The squares used to under/overflow in float32 for |g| below ~1e-19 or above ~1e19: scaled before squaring.
    g0, t0 = make_pair(3, p, torch.float64, seed=p)
    t0 = t0 + 0.7 * g0  # a real correlation
    g32 = (g0 / g0.norm(dim=1, keepdim=True) * g_norm).float()
    t32 = (t0 / t0.norm(dim=1, keepdim=True) * t_norm).float()
    g32.requires_grad_(True)
    loss = ops.gradient_matching_loss(g32, t32, metric="cosine")
    go = torch.tensor([1.0, -0.5, 2.0])
    grad, = torch.autograd.grad(loss, g32, go)
    g64 = g32.detach().double().requires_grad_(True)  # the float64 twin on the same values
    loss_ref = reference.gradient_matching_loss(g64, t32.double(), metric="cosine")
    grad_ref, = torch.autograd.grad(loss_ref, g64, go.double())
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    err = (grad.double() - grad_ref).abs().max() / grad_ref.abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cosine_nan_in_gives_nan_out(dtype):
    # NaN used to fail the den > 0 test and come back as loss 1 with zero gradient. (The twin's torch.where
    # has the same blind spot for the loss; NaN in -> NaN out is the rule here.)
    g, t = make_pair(3, 11, dtype)
    g[1, 4] = float("nan")
    t[2, 0] = float("nan")
    g.requires_grad_(True)
    loss = ops.gradient_matching_loss(g, t, metric="cosine")
    grad, = torch.autograd.grad(loss.sum(), g)
    assert loss[1:].isnan().all() and grad[1:].isnan().all()
    loss_ref = reference.gradient_matching_loss(g, t, metric="cosine")
    grad_ref, = torch.autograd.grad(loss_ref.sum(), g)
    assert_close(loss[0], loss_ref[0], dtype)
    assert_close(grad[0], grad_ref[0], dtype)


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-40), (torch.float32, 1e-38), (torch.float64, 1e-310)])
def test_cosine_rows_with_a_subnormal_largest_entry(dtype, tiny):
    # The rescale factor 2^-e of such a row (2^149 in float) overflowed on its own: loss and gradient came out NaN.
    g0, t0 = make_pair(2, 33, torch.float64, seed=4)
    t0 = t0 + 0.5 * g0
    g = (g0 / g0.abs().max(dim=1, keepdim=True).values * tiny).to(dtype)
    assert g.abs().max() < torch.finfo(dtype).tiny
    g[1] = g0[1].to(dtype)  # a normal row next to it
    t = t0.to(dtype)
    g.requires_grad_(True)
    loss = ops.gradient_matching_loss(g, t, metric="cosine")
    # a small upstream gradient keeps d loss / d g (about 1/|g|) inside float's range
    go = torch.tensor([1e-10, 1.0], dtype=dtype) if dtype == torch.float32 else torch.tensor([1e-290, 1.0], dtype=dtype)
    grad, = torch.autograd.grad(loss, g, go)
    # Oracle: the float64 twin on g scaled row by row by an exact power of two that brings its largest entry to
    # [1, 2) (the cosine loss does not change; its gradient scales back by the same power). Unscaled, float64
    # squares of 1e-310 underflow in the twin too.
    e = torch.frexp(g.detach().double().abs().amax(dim=1, keepdim=True)).exponent - 1
    half = torch.div(-e, 2, rounding_mode="floor")
    scale_1, scale_2 = torch.pow(2.0, half.double()), torch.pow(2.0, (-e - half).double())
    g64 = (g.detach().double() * scale_1 * scale_2).requires_grad_(True)
    loss_ref = reference.gradient_matching_loss(g64, t.double(), metric="cosine")
    grad_ref, = torch.autograd.grad(loss_ref, g64, go.double())
    grad_ref = grad_ref * scale_1 * scale_2
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    for k in range(2):
        err = (grad[k].double() - grad_ref[k]).abs().max() / grad_ref[k].abs().max()
        assert err < 1e-5, (k, err)
