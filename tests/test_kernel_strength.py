"""Tests that would catch a wrong kernel (issue 17).

- Reduced precision: inputs where accumulating in bfloat16/float16 fails by a wide margin
  (long rows of small terms, values that cancel), checked against the float64 twin on the same
  rounded inputs with a tolerance derived from float32 accumulation: one final rounding, so
  within 3/4 ulp of the output dtype (assert_rounded_from_float32).
- Extreme logits: values AND gradients against the float64 twin, not just finiteness.
(float64 vs the float64 twin at 1e-12 is tests/testing.py's float64 tolerance, used by every op test.)
"""
import pytest
import torch

from fcl_ext import ops, reference
from tests.testing import (REDUCED_DTYPES, assert_close, assert_close_f64, assert_rounded_from_float32, devices,
                           make_logits)

# A running bfloat16 sum of a row this long stalls after ~1 % of it; even a pairwise one ends
# more than 1 ulp off on some of 64 such rows, while float32 accumulation stays within 1/2 ulp.
LONG = 16384


def _reduced(x64, dtype):
    """x64 rounded to dtype (the op's input, with grad) and the same values in float64 (the twin's)."""
    x = x64.to(dtype).requires_grad_()
    return x, x.detach().double().requires_grad_()


def _grad(out, x, grad_out=None):
    return torch.autograd.grad(out, x, grad_out)[0]


# ---- reduced precision: float32 accumulation -----------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_softmax_entropy_reduced_precision_accumulates_in_float32(device, dtype, eps):
    # Long rows: H ~ 8 made of 16384 terms of ~5e-4 each.
    x, x64 = _reduced(make_logits((64, LONG), scale=2.0, device=device), dtype)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    exact = reference.softmax_entropy(x64, reduction="none", eps=eps)
    assert out.dtype == dtype
    assert_rounded_from_float32(out, exact)
    grad_out = torch.ones_like(exact)
    g, g_exact = _grad(out, x, grad_out.to(dtype)), _grad(exact, x64, grad_out)
    # each entry p_j (a_j - abar): one rounding of a float32 value, whose own error is ~1e-7 |p_j a_j|
    assert_rounded_from_float32(g, g_exact, atol=float(1e-6 * g_exact.abs().max()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_glfc_loss_reduced_precision_accumulates_in_float32(device, dtype):
    # BCE row sums over 4096 classes of small terms; a teacher for half the classes.
    x, x64 = _reduced(make_logits((16, LONG), scale=2.0, device=device) - 6.0, dtype)
    y = torch.randint(0, LONG, (16,), generator=torch.Generator().manual_seed(1)).to(device)
    q = make_logits((16, LONG // 2), scale=2.0, device=device, seed=2).to(dtype)
    mask = torch.arange(LONG, device=device) < LONG // 2
    for name, args in (("gradient_compensated_bce", (mask,)), ("relation_distillation_bce", (q,))):
        out = getattr(ops, name)(x, y, *args, reduction="none")
        exact = getattr(reference, name)(x64, y, *(a.double() if a.is_floating_point() else a for a in args),
                                         reduction="none")
        assert out.dtype == dtype
        assert_rounded_from_float32(out, exact)
        g, g_exact = _grad(out.sum(), x), _grad(exact.sum(), x64)
        assert_rounded_from_float32(g, g_exact, atol=float(1e-6 * g_exact.abs().max()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_dual_distillation_reduced_precision_accumulates_in_float32(device, dtype):
    n = 8
    s, s64 = _reduced(make_logits((n, LONG), scale=0.5, device=device), dtype)
    y = torch.arange(n, device=device) * 97
    t = make_logits((n, LONG), scale=0.5, device=device, seed=3).to(dtype)
    out = ops.dual_distillation_loss(s, y, t, t.flip(0), temperature=2.0)
    exact = reference.dual_distillation_loss(s64, y, t.double(), t.flip(0).double(), temperature=2.0)
    assert out.dtype == dtype
    assert_rounded_from_float32(out, exact)
    g, g_exact = _grad(out, s), _grad(exact, s64)
    assert_rounded_from_float32(g, g_exact, atol=float(1e-6 * g_exact.abs().max()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradient_matching_reduced_precision_accumulates_in_float32(device, dtype, metric):
    g, g64 = _reduced(make_logits((32, LONG), scale=1.0, device=device), dtype)
    t = (g64.detach() + 0.3 * make_logits((32, LONG), device=device, seed=4)).to(dtype)
    out = ops.gradient_matching_loss(g, t, metric=metric)
    exact = reference.gradient_matching_loss(g64, t.double(), metric=metric)
    assert out.dtype == dtype
    assert_rounded_from_float32(out, exact)
    gr, gr_exact = _grad(out.sum(), g), _grad(exact.sum(), g64)
    # cosine's gradient t/(|g||t|) - cos g/|g|^2 cancels: the float32 dot product's own error
    # (~sqrt(P) float32 ulps) shows up in the small entries, so it is allowed for there.
    row_error = 8 * LONG ** 0.5 * 2.0 ** -24 if metric == "cosine" else 1e-6
    assert_rounded_from_float32(gr, gr_exact, atol=float(row_error * gr_exact.abs().max()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_cross_correlation_reduced_precision_accumulates_in_float32(device, dtype):
    # A long batch with column offsets: means and variances over 2048 rows, a bfloat16 sum stalls.
    a, a64 = _reduced(make_logits((2048, 6), scale=1.0, device=device) + 4.0, dtype)
    b, b64 = _reduced(make_logits((2048, 6), scale=1.0, device=device, seed=5) - 3.0, dtype)
    m = ops.cross_correlation_matrix(a, b)
    m_exact = reference.cross_correlation_matrix(a64, b64)
    assert m.dtype == dtype
    assert_rounded_from_float32(m, m_exact, atol=1e-5)
    out = ops.cross_correlation_loss(a, b)
    exact = reference.cross_correlation_loss(a64, b64)
    assert_rounded_from_float32(out, exact)
    ga, ga_exact = _grad(out, a), _grad(exact, a64)
    assert_rounded_from_float32(ga, ga_exact, atol=float(1e-5 * ga_exact.abs().max()))


# ---- extreme logits: values and gradients against the twin --------------------------

EXTREME_ROWS = [[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4], [5e3, -5e3, 1.0, 2.0], [1e8, 1e8, 1e8, 0.0],
                [-3e4, 2e4, 2e4 - 1.0, 0.5]]


def _extreme(dtype, offset=0.0):
    x64 = torch.tensor(EXTREME_ROWS, dtype=torch.float64) + offset
    x = x64.to(dtype).requires_grad_()
    return x, x.detach().double().requires_grad_()


def _compare(out, exact, dtype):
    if dtype == torch.float64:
        assert_close_f64(out, exact)
    else:
        assert_close(out, exact, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_softmax_entropy_extreme_logits_match_twin(dtype, eps):
    x, x64 = _extreme(dtype)
    out = ops.softmax_entropy(x, reduction="none", eps=eps)
    exact = reference.softmax_entropy(x64, reduction="none", eps=eps)
    _compare(out, exact, dtype)
    w = torch.linspace(-1, 2, len(EXTREME_ROWS), dtype=torch.float64)
    _compare(_grad(out, x, w.to(dtype)), _grad(exact, x64, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dual_distillation_extreme_logits_match_twin(dtype, temperature):
    x, x64 = _extreme(dtype)
    y = torch.tensor([3, 0, 2, 3, 1])
    t = torch.tensor(EXTREME_ROWS, dtype=torch.float64).flip(0)
    out = ops.dual_distillation_loss(x, y, t.to(dtype), None, temperature=temperature)
    exact = reference.dual_distillation_loss(x64, y, t.to(dtype).double(), None, temperature=temperature)
    _compare(out, exact, dtype)
    _compare(_grad(out, x), _grad(exact, x64), dtype)


def test_dual_distillation_large_equal_logits_give_exact_gradient():
    # The example: softmax rebuilt from one stored log-sum-exp gave [1, 1, 1, -1].
    s = torch.tensor([[1e8, 1e8, 1e8, 0.0]], dtype=torch.float64, requires_grad=True)
    ops.dual_distillation_loss(s, torch.tensor([3])).backward()
    assert_close_f64(s.grad, torch.tensor([[1 / 3, 1 / 3, 1 / 3, -1.0]], dtype=torch.float64))


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_dual_distillation_float32_offset_logits_as_accurate_as_twin(offset):
    # A constant offset changes nothing in exact arithmetic; float32 error must stay ~1e-7, not 2e-4.
    base = make_logits((16, 50), scale=2.0)
    s = (base + offset).float().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    y = torch.arange(16) % 50
    t = (make_logits((16, 50), seed=7) + offset).float()
    out = ops.dual_distillation_loss(s, y, t, t, temperature=2.0)
    exact = reference.dual_distillation_loss(s64, y, t.double(), t.double(), temperature=2.0)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grad(out, s).double(), _grad(exact, s64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_glfc_extreme_logits_match_twin(dtype):
    x, x64 = _extreme(dtype)
    y = torch.tensor([0, 1, 3, 2, 1])
    mask = torch.tensor([True, True, False, False])
    q = torch.tensor(EXTREME_ROWS, dtype=dtype)[:, :3].flip(0)
    out = ops.glfc_loss(x, y, mask, q)
    exact = reference.glfc_loss(x64, y, mask, q.double())
    _compare(out, exact, dtype)
    _compare(_grad(out, x), _grad(exact, x64), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e-25, 1e-19, 1e19, 1e25])
def test_cosine_gradient_matching_at_extreme_scales_matches_twin(scale, dtype):
    # cosine is scale-invariant: the value at scale s equals the value at scale 1, and the
    # gradient scales as 1/s. Squaring unscaled entries under/overflows float32 near 1e±19.
    g1 = make_logits((4, 33), scale=1.0)
    t1 = g1 + make_logits((4, 33), scale=0.5, seed=8)
    g = (g1 * scale).to(dtype).requires_grad_()
    t = (t1 * scale).to(dtype)
    out = ops.gradient_matching_loss(g, t, metric="cosine")
    g1r = (g.detach().double() / scale).requires_grad_()
    exact = reference.gradient_matching_loss(g1r, t.double() / scale, metric="cosine")
    _compare(out.double() if dtype == torch.float64 else out, exact, dtype)
    gr = _grad(out.sum(), g).double() * scale
    _compare(gr.to(dtype) if dtype != torch.float64 else gr, _grad(exact.sum(), g1r), dtype)


@pytest.mark.parametrize("scale", [1e-25, 1e19, 1e25])
def test_float32_cosine_backward_scales_before_squaring(scale):
    # The finding's example: |g|^2 ~ 1e-50 underflows float32 (the gradient was 0), ~ 1e38 / 1e50 overflows it
    # (NaN). g = s [3, 4], t = s [4, 3]: cos = 24/25, d loss / d g = -(t / (|g| |t|) - cos g / |g|^2)
    # = [-28, 21] / (625 s); a second row at s = 0.2 takes the unscaled path.
    g = torch.tensor([[3.0, 4.0], [0.6, 0.8]], dtype=torch.float32) * torch.tensor([[scale], [1.0]])
    t = torch.tensor([[4.0, 3.0], [0.8, 0.6]], dtype=torch.float32) * torch.tensor([[scale], [1.0]])
    g.requires_grad_()
    out = ops.gradient_matching_loss(g, t, metric="cosine")
    # (rtol: s [3, 4] rounded to float32 moves cos by ~1e-7, 1 - cos = 0.04 by ~3e-6 relative)
    torch.testing.assert_close(out, torch.tensor([0.04, 0.04]), rtol=2e-5, atol=0)
    gr = _grad(out.sum(), g).double()
    expected = torch.tensor([[-28.0, 21.0], [-28.0, 21.0]], dtype=torch.float64) / 625
    torch.testing.assert_close(gr * torch.tensor([[scale], [0.2]], dtype=torch.float64), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_l2_gradient_matching_backward_does_not_overflow(dtype):
    # 2 go (g - t) is finite where g and t are near the top of the range; a*g - b*t is not.
    big = torch.finfo(dtype).max / 4
    g = torch.tensor([[big, -big / 2, 1.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[big * 0.999, -big / 2, 0.0]], dtype=dtype)
    out = ops.gradient_matching_loss(g, t, metric="l2")
    grad_out = torch.tensor([1e-30], dtype=dtype)
    gr = _grad(out, g, grad_out)
    expected = 2 * grad_out.double()[:, None] * (g.detach().double() - t.double())
    assert torch.isfinite(gr).all(), gr
    torch.testing.assert_close(gr.double(), expected, rtol=1e-5, atol=0)


# ---- cross_correlation: column variance that neither overflows nor hides NaN ----------

@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_cross_correlation_huge_columns_are_standardised_like_twin(eps):
    # float32 columns near +-3e38 are not constant: their squared deviations overflow float32,
    # a scaled variance does not. The float64 twin sees the same values without overflow.
    a64 = make_logits((16, 3), seed=11)
    a64 = a64 / a64.abs().max() * 3e38
    a = a64.float().requires_grad_()
    b = make_logits((16, 3), seed=12).float().requires_grad_()
    a_ref, b_ref = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    m = ops.cross_correlation_matrix(a, b, eps=eps)
    m_ref = reference.cross_correlation_matrix(a_ref, b_ref, eps=eps)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m.double(), m_ref, rtol=1e-4, atol=1e-5)
    gb, = torch.autograd.grad(m.sum(), b)
    gb_ref, = torch.autograd.grad(m_ref.sum(), b_ref)
    torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-4, atol=1e-5)


def test_cross_correlation_nan_column_is_named_as_nan_not_constant():
    a = make_logits((8, 3)).float()
    a[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        ops.cross_correlation_matrix(a, make_logits((8, 2), seed=1).float())
