"""softmax_entropy: values and gradients vs the reference, gradcheck, opcheck, compile,
edge cases, bad inputs, and a property test over shapes and scales."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fcl_ext
from fcl_ext import ops, reference
from tests.testing import FLOAT_DTYPES, REDUCED_DTYPES, assert_close, devices, make_logits

EPS = [0.0, 1e-5]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_reference_values_and_grads(device, dtype, eps, reduction):
    x = make_logits((37, 53), dtype, device, requires_grad=True)
    out = ops.softmax_entropy(x, reduction=reduction, eps=eps)
    ref = reference.softmax_entropy(x, reduction=reduction, eps=eps)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype)
    grad_out = torch.randn_like(ref)  # random grad_output, not ones
    g_out, = torch.autograd.grad(out, x, grad_out)
    g_ref, = torch.autograd.grad(ref, x, grad_out)
    assert_close(g_out, g_ref, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("eps", EPS)
def test_reduced_precision_accumulates_in_float(device, dtype, eps):
    x64 = make_logits((16, 300), torch.float64, device, scale=4.0)
    x = x64.to(dtype).requires_grad_()
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    assert out.dtype == dtype
    ref = reference.softmax_entropy(x.detach().double(), reduction="none", eps=eps)
    assert_close(out, ref, dtype)
    out.sum().backward()
    xr = x.detach().double().requires_grad_()
    reference.softmax_entropy(xr, reduction="sum", eps=eps).backward()
    assert_close(x.grad, xr.grad, dtype)


@pytest.mark.parametrize("eps", EPS)
def test_gradcheck_float64(eps):
    x = make_logits((5, 7), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.softmax_entropy(t, reduction="none", eps=eps), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.softmax_entropy(t, reduction="mean", eps=eps), (x,))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("eps", EPS)
def test_opcheck(device, requires_grad, eps):
    x = make_logits((8, 13), torch.float32, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.fcl_ext.softmax_entropy.default, (x, eps))
    x3 = make_logits((2, 3, 5), torch.float64, device, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.fcl_ext.softmax_entropy.default, (x3, eps))


def test_compile_fullgraph():
    def loss_fn(x):
        return ops.softmax_entropy(x * 2.0, eps=1e-5) + x.pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = make_logits((6, 11), torch.float32, requires_grad=True)
    out = compiled(x)
    assert_close(out, loss_fn(x), torch.float32)
    g_c, = torch.autograd.grad(compiled(x), x)
    g_e, = torch.autograd.grad(loss_fn(x), x)
    assert_close(g_c, g_e, torch.float32)


@pytest.mark.slow
def test_compile_inductor():
    compiled = torch.compile(lambda x: ops.softmax_entropy(x), fullgraph=True)
    x = make_logits((6, 11), torch.float32)
    assert_close(compiled(x), ops.softmax_entropy(x), torch.float32)


# ---- edge cases -----------------------------------------------------------------

@pytest.mark.parametrize("eps", EPS)
def test_empty_batch(eps):
    x = torch.empty(0, 10, dtype=torch.float64, requires_grad=True)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    assert out.shape == (0,)
    assert ops.softmax_entropy(x, reduction="sum", eps=eps).item() == 0.0
    assert torch.isnan(ops.softmax_entropy(x, reduction="mean", eps=eps))  # as torch's mean of nothing
    ops.softmax_entropy(x, reduction="sum", eps=eps).backward()
    assert x.grad.shape == (0, 10)


@pytest.mark.parametrize("eps", EPS)
def test_one_class_has_zero_entropy_and_gradient(eps):
    x = make_logits((9, 1), torch.float64, requires_grad=True)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    assert_close(out, reference.softmax_entropy(x, reduction="none", eps=eps))
    if eps == 0:
        assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(x.grad.abs() < 1e-12)


@pytest.mark.parametrize("eps", EPS)
def test_non_contiguous_and_batched_inputs(eps):
    base = make_logits((40, 30), torch.float64, requires_grad=True)
    x = base.t()  # [30, 40], transposed view
    assert not x.is_contiguous()
    assert_close(ops.softmax_entropy(x, reduction="none", eps=eps),
                 reference.softmax_entropy(x.contiguous(), reduction="none", eps=eps))
    x3 = base.view(4, 10, 30)[:, ::2]  # strided 3-D view
    out = ops.softmax_entropy(x3, reduction="none", eps=eps)
    assert out.shape == (4, 5)
    assert_close(out, reference.softmax_entropy(x3, reduction="none", eps=eps))
    g = torch.randn(4, 5, dtype=torch.float64)
    ga, = torch.autograd.grad(out, base, g)
    gb, = torch.autograd.grad(reference.softmax_entropy(x3, reduction="none", eps=eps), base, g)
    assert_close(ga, gb)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps", EPS)
def test_extreme_logits_are_finite(dtype, eps):
    x = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4], [5e3, -5e3, 1.0, 2.0]], dtype=dtype,
                     requires_grad=True)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    assert torch.isfinite(out).all()
    x64 = x.detach().double().requires_grad_()
    ref = reference.softmax_entropy(x64, reduction="none", eps=eps)
    assert_close(out, ref, dtype)
    # the gradient too, not just its finiteness (issue 17)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out.backward(w.to(dtype))
    ref.backward(w)
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("eps", EPS)
def test_minus_inf_entries_contribute_nothing(eps):
    x = torch.tensor([[0.3, float("-inf"), 1.2, -0.5], [float("-inf"), 2.0, float("-inf"), 2.0]],
                     dtype=torch.float64, requires_grad=True)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    finite = reference.softmax_entropy(torch.tensor([[0.3, 1.2, -0.5]], dtype=torch.float64), reduction="none",
                                       eps=eps)
    assert_close(out[0], finite[0])
    if eps == 0:
        assert_close(out[1], torch.tensor(2.0, dtype=torch.float64).log())  # uniform over 2 classes
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 1] == 0 and x.grad[1, 0] == 0


# ---- bad input ------------------------------------------------------------------

def test_integer_logits_rejected():
    with pytest.raises(ValueError, match="logits"):
        ops.softmax_entropy(torch.ones(3, 4, dtype=torch.int64))


def test_zero_dim_rejected():
    with pytest.raises(ValueError, match="logits"):
        ops.softmax_entropy(torch.tensor(1.0))


def test_bad_reduction_rejected():
    with pytest.raises(ValueError, match="reduction"):
        ops.softmax_entropy(torch.randn(3, 4), reduction="avg")


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        ops.softmax_entropy(torch.randn(3, 4), eps=-1.0)


def test_direct_op_call_checks_dtype():
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.fcl_ext.softmax_entropy(torch.ones(3, 4, dtype=torch.int32), 0.0)


def test_double_backward_raises():
    x = make_logits((3, 4), torch.float64, requires_grad=True)
    g, = torch.autograd.grad(ops.softmax_entropy(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---- module ---------------------------------------------------------------------

def test_module_matches_functional():
    x = make_logits((4, 6), torch.float64)
    m = fcl_ext.losses.SoftmaxEntropy(reduction="sum", eps=1e-5)
    assert_close(m(x), ops.softmax_entropy(x, reduction="sum", eps=1e-5))
    assert "eps=1e-05" in repr(m)
    with pytest.raises(ValueError, match="reduction"):
        fcl_ext.losses.SoftmaxEntropy(reduction="bad")


# ---- property test --------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 70), scale=st.sampled_from([0.01, 1.0, 30.0, 300.0]),
       eps=st.sampled_from(EPS), seed=st.integers(0, 2**16))
def test_property_matches_reference(rows, cols, scale, eps, seed):
    x = make_logits((rows, cols), torch.float64, scale=scale, seed=seed, requires_grad=True)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    ref = reference.softmax_entropy(x, reduction="none", eps=eps)
    assert_close(out, ref)
    # 0 <= H <= log C for eps = 0; the eps form can dip to -log(1 + eps) (one sure class).
    lower = -torch.log1p(torch.tensor(eps, dtype=torch.float64)) - 1e-12
    assert (out >= lower).all() and (out <= torch.log(torch.tensor(float(cols))) + 1e-9).all()
    ga, = torch.autograd.grad(out.sum(), x)
    gb, = torch.autograd.grad(ref.sum(), x)
    assert_close(ga, gb)


# ---- regressions (issue 17) -----------------------------------------------------------

def test_backward_op_checks_its_saved_stats():
    # Used to read out of bounds (segfault): the private backward is a public torch.ops entry point.
    x = torch.randn(1, 9)
    with pytest.raises(RuntimeError, match=r"stats must have shape \[1, 3\]"):
        torch.ops.fcl_ext._softmax_entropy_backward(torch.ones(1), x, torch.zeros(0, 3), 0.0)
    with pytest.raises(RuntimeError, match=r"stats must have dtype Float"):  # float64 stats, float32 logits
        torch.ops.fcl_ext._softmax_entropy_backward(torch.ones(1), x, torch.zeros(1, 3, dtype=torch.float64), 0.0)
    with pytest.raises(RuntimeError, match=r"grad_entropy must have the shape of the forward.s output \[1\]"):
        torch.ops.fcl_ext._softmax_entropy_backward(torch.ones(5), x, torch.zeros(1, 3), 0.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps", EPS)
def test_nan_and_inf_rows_give_nan_like_the_reference(dtype, eps):
    # The fast float exp maps NaN to a finite number: NaN rows used to give a finite entropy or zero gradients.
    nan, inf = float("nan"), float("inf")
    x = make_logits((5, 13), dtype)
    x[1, 4] = nan
    x[2, 0] = inf
    x[3] = -inf
    x.requires_grad_(True)
    h = ops.softmax_entropy(x, reduction="none", eps=eps)
    h_ref = reference.softmax_entropy(x, reduction="none", eps=eps)
    torch.testing.assert_close(h, h_ref, equal_nan=True, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    assert h[1:4].isnan().all() and h[[0, 4]].isfinite().all()
    g, = torch.autograd.grad(h.sum(), x)
    g_ref, = torch.autograd.grad(h_ref.sum(), x)
    assert g[1:4].isnan().all()
    torch.testing.assert_close(g, g_ref, equal_nan=True, **({"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64
                                                              else {"rtol": 1e-4, "atol": 1e-6}))
    # A NaN upstream gradient gives a NaN gradient row.
    y = make_logits((2, 9), dtype).requires_grad_(True)
    gy, = torch.autograd.grad(ops.softmax_entropy(y, reduction="none", eps=eps), y, torch.tensor([nan, 1.0], dtype=dtype))
    assert gy[0].isnan().all() and gy[1].isfinite().all()
