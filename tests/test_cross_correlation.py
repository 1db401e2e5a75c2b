"""cross_correlation_matrix / cross_correlation_loss (FCCL and Barlow Twins forms): values and
gradients for a and b vs the reference, gradcheck, opcheck, compile, edge cases (B=2, K=1, K=65,
non-contiguous, constant columns), bad inputs, Barlow Twins from its paper, and a property test."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fcl_ext
from fcl_ext import ops, reference
from tests.testing import FLOAT_DTYPES, REDUCED_DTYPES, assert_close, devices, make_logits

FCCL = dict(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0)
BARLOW = dict(off_diag_weight=0.0051, off_diag_target=0.0, unbiased=False, eps=1e-5)
FORMS = {"fccl": FCCL, "barlow": BARLOW}
NEEDS = {"a": (True, False), "b": (False, True), "both": (True, True)}


def matrix_kwargs(kw):
    return {k: kw[k] for k in ("unbiased", "eps")}


def make_pair(B, K, dtype=torch.float64, device="cpu", seed=0, Kb=None, grads=(True, True)):
    a = make_logits((B, K), dtype, device, scale=2.0, seed=seed)
    # b correlated with a so that M has a real diagonal, plus noise
    noise = make_logits((B, Kb or K), dtype, device, scale=1.0, seed=seed + 1)
    b = (a[:, : (Kb or K)] + noise) if (Kb or K) <= K else noise
    return a.requires_grad_(grads[0]), b.detach().requires_grad_(grads[1])


def grads_of(out, a, b, grad_out):
    inputs = [t for t in (a, b) if t.requires_grad]
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("needs", NEEDS)
def test_loss_matches_reference_values_and_grads(device, dtype, form, needs):
    kw = FORMS[form]
    a, b = make_pair(37, 11, dtype, device, grads=NEEDS[needs])
    out = ops.cross_correlation_loss(a, b, **kw)
    ref = reference.cross_correlation_loss(a, b, **kw)
    assert out.shape == () and out.dtype == dtype
    assert_close(out, ref, dtype)
    grad_out = torch.randn((), dtype=dtype, device=device)
    for g_out, g_ref in zip(grads_of(out, a, b, grad_out), grads_of(ref, a, b, grad_out)):
        assert_close(g_out, g_ref, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("needs", NEEDS)
def test_matrix_matches_reference_values_and_grads(device, dtype, form, needs):
    kw = matrix_kwargs(FORMS[form])
    a, b = make_pair(29, 9, dtype, device, Kb=6, grads=NEEDS[needs])
    out = ops.cross_correlation_matrix(a, b, **kw)
    ref = reference.cross_correlation_matrix(a, b, **kw)
    assert out.shape == (9, 6) and out.dtype == dtype
    assert_close(out, ref, dtype)
    grad_out = torch.randn_like(ref)
    for g_out, g_ref in zip(grads_of(out, a, b, grad_out), grads_of(ref, a, b, grad_out)):
        assert_close(g_out, g_ref, dtype)


def test_float64_relative_error_within_1e12():
    a, b = make_pair(512, 65)
    for kw in FORMS.values():
        out = ops.cross_correlation_loss(a, b, **kw)
        ref = reference.cross_correlation_loss(a, b, **kw)
        assert abs(out.item() - ref.item()) <= 1e-12 * abs(ref.item())
        ga, gb = torch.autograd.grad(out, (a, b))
        ra, rb = torch.autograd.grad(ref, (a, b))
        for g, r in ((ga, ra), (gb, rb)):
            assert ((g - r).norm() / r.norm()).item() <= 1e-12


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_reduced_precision_accumulates_in_float(device, dtype, form):
    kw = FORMS[form]
    a64, b64 = make_pair(64, 12, torch.float64, device, grads=(False, False))
    a, b = a64.to(dtype).requires_grad_(), b64.to(dtype).requires_grad_()
    out = ops.cross_correlation_loss(a, b, **kw)
    assert out.dtype == dtype
    ar, br = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = reference.cross_correlation_loss(ar, br, **kw)
    assert_close(out, ref, dtype)
    out.backward()
    ref.backward()
    assert a.grad.dtype == dtype
    assert_close(a.grad, ar.grad, dtype, atol=5e-2)
    assert_close(b.grad, br.grad, dtype, atol=5e-2)
    m = ops.cross_correlation_matrix(a, b, **matrix_kwargs(kw))
    assert m.dtype == dtype
    assert_close(m, reference.cross_correlation_matrix(ar, br, **matrix_kwargs(kw)), dtype)


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form):
    kw = FORMS[form]
    a, b = make_pair(6, 4)
    assert torch.autograd.gradcheck(lambda x, y: ops.cross_correlation_loss(x, y, **kw), (a, b))
    assert torch.autograd.gradcheck(lambda x: ops.cross_correlation_loss(x, b.detach(), **kw), (a,))
    a2, b2 = make_pair(5, 4, Kb=3)
    assert torch.autograd.gradcheck(lambda x, y: ops.cross_correlation_matrix(x, y, **matrix_kwargs(kw)), (a2, b2))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(device, requires_grad, form):
    kw = FORMS[form]
    a, b = make_pair(9, 5, torch.float32, device, grads=(requires_grad, requires_grad))
    torch.library.opcheck(torch.ops.fcl_ext.cross_correlation_matrix.default, (a, b, kw["unbiased"], kw["eps"]))
    for keep in (True, False) if not requires_grad else (True,):
        torch.library.opcheck(torch.ops.fcl_ext.cross_correlation_loss.default,
                              (a, b, kw["off_diag_weight"], kw["off_diag_target"], kw["unbiased"], kw["eps"], keep))
    a2, b2 = make_pair(7, 3, torch.float64, device, Kb=2, grads=(requires_grad, False))
    torch.library.opcheck(torch.ops.fcl_ext.cross_correlation_matrix.default, (a2, b2, kw["unbiased"], kw["eps"]))


def test_compile_fullgraph():
    def fccl_step(z, target):
        return ops.cross_correlation_loss(z * 1.5, target.detach()) + z.pow(2).mean()

    def barlow(z1, z2):
        return fcl_ext.losses.CrossCorrelationLoss.barlow_twins()(z1, z2)

    a, b = make_pair(16, 6, torch.float32)
    for fn in (fccl_step, barlow):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out = compiled(a, b)
        assert_close(out, fn(a, b), torch.float32)
        g_c = torch.autograd.grad(compiled(a, b), (a, b), allow_unused=True)
        g_e = torch.autograd.grad(fn(a, b), (a, b), allow_unused=True)
        for x, y in zip(g_c, g_e):
            assert (x is None) == (y is None)
            if x is not None:
                assert_close(x, y, torch.float32)


@pytest.mark.slow
def test_compile_inductor():
    compiled = torch.compile(lambda x, y: ops.cross_correlation_loss(x, y), fullgraph=True)
    a, b = make_pair(16, 6, torch.float32, grads=(False, False))
    assert_close(compiled(a, b), ops.cross_correlation_loss(a, b), torch.float32)


# ---- gradients only where asked ----------------------------------------------------

def test_fccl_target_detached_gets_no_gradient():
    a, b = make_pair(20, 7, grads=(True, False))
    loss = fcl_ext.losses.CrossCorrelationLoss.fccl()(a, b)
    loss.backward()
    assert b.grad is None and a.grad is not None
    ra = a.detach().requires_grad_()
    reference.cross_correlation_loss(ra, b, **FCCL).backward()
    assert_close(a.grad, ra.grad)


def test_no_grad_forward_matches_and_keeps_no_matrix():
    a, b = make_pair(20, 7)
    with torch.no_grad():
        out = ops.cross_correlation_loss(a, b)
    assert not out.requires_grad
    assert_close(out, reference.cross_correlation_loss(a.detach(), b.detach()))
    _, matrix, _, _ = torch.ops.fcl_ext.cross_correlation_loss(a.detach(), b.detach(), 0.0051, -1.0, True, 0.0, False)
    assert matrix.numel() == 0


def test_double_backward_raises():
    a, b = make_pair(6, 3)
    g, = torch.autograd.grad(ops.cross_correlation_loss(a, b), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---- edge cases ---------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("B,K", [(2, 5), (8, 1), (2, 1), (512, 65), (33, 130), (600, 130)])  # last: parallel path
def test_shapes_match_reference(form, B, K):
    kw = FORMS[form]
    a, b = make_pair(B, K)
    out = ops.cross_correlation_loss(a, b, **kw)
    ref = reference.cross_correlation_loss(a, b, **kw)
    assert_close(out, ref)
    ga, gb = torch.autograd.grad(out, (a, b))
    ra, rb = torch.autograd.grad(ref, (a, b))
    assert_close(ga, ra)
    assert_close(gb, rb)


def test_batch_of_two_unbiased_is_exact():
    # B = 2, unbiased: every standardised column is (-1, 1)/sqrt(2) or (1, -1)/sqrt(2), so M_uv = +-1/2.
    a = torch.tensor([[0.0, 1.0], [2.0, 5.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    m = ops.cross_correlation_matrix(a, b)
    assert_close(m, torch.tensor([[-0.5, -0.5], [-0.5, -0.5]], dtype=torch.float64))
    assert_close(m, reference.cross_correlation_matrix(a, b))


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs(form):
    kw = FORMS[form]
    base_a = make_logits((12, 40), torch.float64, scale=2.0, seed=3, requires_grad=True)
    base_b = make_logits((40, 24), torch.float64, scale=2.0, seed=4, requires_grad=True)
    a = base_a.t()[:, ::2]        # [40, 6], transposed and strided
    b = base_b[:, 3:9]            # [40, 6], a column slice
    assert not a.is_contiguous() and not b.is_contiguous()
    out = ops.cross_correlation_loss(a, b, **kw)
    ref = reference.cross_correlation_loss(a, b, **kw)
    assert_close(out, ref)
    g = torch.autograd.grad(out, (base_a, base_b))
    r = torch.autograd.grad(ref, (base_a, base_b))
    for x, y in zip(g, r):
        assert_close(x, y)
    assert_close(ops.cross_correlation_matrix(a, b, **matrix_kwargs(kw)),
                 reference.cross_correlation_matrix(a.contiguous(), b.contiguous(), **matrix_kwargs(kw)))


@pytest.mark.parametrize("which", ["a", "b"])
def test_constant_column_with_eps_zero_is_an_error_not_nan(which):
    a, b = make_pair(16, 5, grads=(False, False))
    (a if which == "a" else b)[:, 2] = 3.25
    assert torch.isnan(reference.cross_correlation_loss(a, b, **FCCL))  # what the reference does
    with pytest.raises(RuntimeError, match=rf"column 2 of {which} is constant.*eps > 0"):
        ops.cross_correlation_loss(a, b, **FCCL)
    with pytest.raises(RuntimeError, match="eps > 0"):
        ops.cross_correlation_matrix(a, b)
    # with eps > 0 the column is allowed and matches the reference
    out = ops.cross_correlation_loss(a, b, **BARLOW)
    assert torch.isfinite(out)
    assert_close(out, reference.cross_correlation_loss(a, b, **BARLOW))


def test_barlow_twins_form_equals_the_paper_definition():
    """Barlow Twins (Zbontar et al. 2021): z_norm = BN(z) (batch statistics, biased variance, eps 1e-5,
    no affine), c = z_a_norm^T z_b_norm / N, loss = sum_i (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2.
    Algorithm 1 of the paper writes the normalisation as (z - z.mean(0)) / z.std(0) instead."""
    def barlow_twins_bn(z_a, z_b, lambd):
        n, d = z_a.shape
        z_a_norm = F.batch_norm(z_a, None, None, training=True, eps=1e-5)
        z_b_norm = F.batch_norm(z_b, None, None, training=True, eps=1e-5)
        c = z_a_norm.T @ z_b_norm / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].pow(2).sum()
        return on_diag + lambd * off_diag

    def barlow_twins_algorithm1(z_a, z_b, lambd):
        n, d = z_a.shape
        z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)
        z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
        c = torch.mm(z_a_norm.T, z_b_norm) / n
        c_diff = (c - torch.eye(d, dtype=c.dtype)).pow(2)
        c_diff[~torch.eye(d, dtype=torch.bool)] *= lambd
        return c_diff.sum()

    a, b = make_pair(48, 16)
    for lambd in (0.0051, 0.02):
        out = fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=lambd)(a, b)
        expected = barlow_twins_bn(a, b, lambd)
        assert_close(out, expected)
        for g, r in zip(torch.autograd.grad(out, (a, b)), torch.autograd.grad(expected, (a, b))):
            assert_close(g, r)
        out_alg1 = ops.cross_correlation_loss(a, b, off_diag_weight=lambd, off_diag_target=0.0, unbiased=True, eps=0.0)
        assert_close(out_alg1, barlow_twins_algorithm1(a, b, lambd))


def test_fccl_perfectly_aligned_columns_give_diag_b_minus_1_over_b():
    a, _ = make_pair(10, 4, grads=(False, False))
    m = ops.cross_correlation_matrix(a, a)
    assert_close(torch.diagonal(m), torch.full((4,), 0.9, dtype=torch.float64))


# ---- bad input ----------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    a, b = make_pair(8, 4, grads=(False, False))
    with pytest.raises(ValueError, match="a must have a batch of at least 2"):
        ops.cross_correlation_loss(a[:1], b[:1])
    with pytest.raises(ValueError, match="a must be 2-D"):
        ops.cross_correlation_loss(a[0], b)
    with pytest.raises(ValueError, match="b must be 2-D"):
        ops.cross_correlation_matrix(a, b[None])
    with pytest.raises(ValueError, match="batch size"):
        ops.cross_correlation_loss(a, b[:5])
    with pytest.raises(ValueError, match="b must have the shape of a"):
        ops.cross_correlation_loss(a, b[:, :3])
    with pytest.raises(ValueError, match="b must have the dtype"):
        ops.cross_correlation_loss(a, b.float())
    with pytest.raises(ValueError, match="a must be a floating-point"):
        ops.cross_correlation_loss(a.long(), b)
    with pytest.raises(ValueError, match="eps"):
        ops.cross_correlation_loss(a, b, eps=-1e-3)
    with pytest.raises(ValueError, match="off_diag_weight"):
        ops.cross_correlation_loss(a, b, off_diag_weight=-1.0)


def test_direct_op_call_checks_batch():
    a = torch.randn(1, 3)
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        torch.ops.fcl_ext.cross_correlation_loss(a, a, 0.0051, -1.0, True, 0.0, False)
    with pytest.raises(RuntimeError, match="a must be a floating-point"):
        torch.ops.fcl_ext.cross_correlation_matrix(a.int(), a, True, 0.0)


# ---- module -------------------------------------------------------------------------

def test_module_constructors():
    f = fcl_ext.losses.CrossCorrelationLoss.fccl()
    assert (f.off_diag_weight, f.off_diag_target, f.unbiased, f.eps) == (0.0051, -1.0, True, 0.0)
    bt = fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=0.01)
    assert (bt.off_diag_weight, bt.off_diag_target, bt.unbiased, bt.eps) == (0.01, 0.0, False, 1e-5)
    assert "off_diag_target=0.0" in repr(bt)
    a, b = make_pair(12, 5, grads=(False, False))
    assert_close(f(a, b), ops.cross_correlation_loss(a, b, **FCCL))
    assert_close(bt(a, b), reference.cross_correlation_loss(a, b, off_diag_weight=0.01, off_diag_target=0.0,
                                                            unbiased=False, eps=1e-5))
    with pytest.raises(ValueError, match="eps"):
        fcl_ext.losses.CrossCorrelationLoss(eps=-1.0)


# ---- property test ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(B=st.integers(2, 40), K=st.integers(1, 20), scale=st.sampled_from([1e-2, 1.0, 50.0]),
       form=st.sampled_from(sorted(FORMS)), target=st.sampled_from([-1.0, 0.0, 0.5]), seed=st.integers(0, 2**16))
def test_property_matches_reference(B, K, scale, form, target, seed):
    kw = dict(FORMS[form], off_diag_target=target)
    a = make_logits((B, K), torch.float64, scale=scale, seed=seed, requires_grad=True)
    b = make_logits((B, K), torch.float64, scale=scale, seed=seed + 7, requires_grad=True)
    out = ops.cross_correlation_loss(a, b, **kw)
    ref = reference.cross_correlation_loss(a, b, **kw)
    assert_close(out, ref)
    assert out.item() >= 0
    m = ops.cross_correlation_matrix(a, b, **matrix_kwargs(kw))
    assert (m.abs() <= 1 + 1e-9).all()  # a correlation (times (B-1)/B at most) is bounded by 1
    for g, r in zip(torch.autograd.grad(out, (a, b)), torch.autograd.grad(ref, (a, b))):
        assert_close(g, r)


def test_float32_large_offset_columns_keep_their_variance():
    # logits around 1000 with spread 0.01: a raw sum of squares would cancel in float32; the shifted
    # one-pass statistics must stay as accurate as the float32 reference against a float64 oracle.
    g = torch.Generator().manual_seed(0)
    a64 = 1000 + 0.01 * torch.randn(512, 65, generator=g, dtype=torch.float64)
    b64 = a64 + 0.01 * torch.randn(512, 65, generator=g, dtype=torch.float64)
    a, b = a64.float(), b64.float()
    for kw in FORMS.values():
        exact = reference.cross_correlation_loss(a.double(), b.double(), **kw)
        assert_close(ops.cross_correlation_loss(a, b, **kw), exact, torch.float32, rtol=1e-4, atol=0)


# ---- regressions (issue 17) ---------------------------------------------------------------

def test_backward_op_checks_stats_matrix_and_grad():
    # Used to read out of bounds: the private backward trusted its saved stats and matrix.
    a, b = (t.detach().float() for t in make_pair(6, 4))
    loss, m, sa, sb = torch.ops.fcl_ext.cross_correlation_loss(a, b, 0.0051, -1.0, True, 0.0, True)
    bwd = torch.ops.fcl_ext._cross_correlation_backward
    one = torch.ones(())
    with pytest.raises(RuntimeError, match=r"stats_a must have shape \[2, 4\]"):
        bwd(one, a, b, sa[:, :2], sb, m, True, 0.0051, -1.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"stats_b must have shape \[2, 4\]"):
        bwd(one, a, b, sa, sb[:1], m, True, 0.0051, -1.0, True, True, True)
    with pytest.raises(RuntimeError, match="stats_a must have dtype Float"):  # float64 stats, float32 a
        bwd(one, a, b, sa.double(), sb, m, True, 0.0051, -1.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"matrix must have shape \[4, 4\]"):
        bwd(one, a, b, sa, sb, torch.zeros(0), True, 0.0051, -1.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"grad must have the shape of the matrix \[4, 4\]"):
        bwd(torch.ones(3, 4), a, b, sa, sb, torch.zeros(0), True, 0.0, 0.0, False, True, True)
    with pytest.raises(RuntimeError, match="grad must have 1 element"):
        bwd(torch.ones(2), a, b, sa, sb, m, True, 0.0051, -1.0, True, True, True)


def _matrix_vs_float64_twin(a, b, eps, unbiased=True):
    m = ops.cross_correlation_matrix(a, b, unbiased=unbiased, eps=eps)
    m_ref = reference.cross_correlation_matrix(a.double(), b.double(), unbiased=unbiased, eps=eps)
    assert torch.isfinite(m_ref).all()
    torch.testing.assert_close(m.double(), m_ref, rtol=1e-4, atol=1e-5)


def test_columns_near_the_float_range_are_not_constant():
    # The one-pass variance overflowed for values near +-3e38 and was clamped to 0: "column 0 is constant".
    g = torch.Generator().manual_seed(5)
    a = (torch.rand(64, 3, generator=g, dtype=torch.float64) * 6e38 - 3e38).float()
    b = torch.randn(64, 3, generator=g)
    b[:, 0] += a[:, 0].double().mul(1e-38).float()
    _matrix_vs_float64_twin(a, b, eps=0.0)
    _matrix_vs_float64_twin(a, b, eps=1e-5)  # eps > 0: finite where the reference is finite (used to be NaN)


def test_tiny_columns_are_not_constant():
    # Squares of ~1e-25 underflow in float32: the variance came out 0 and the column "constant".
    g = torch.Generator().manual_seed(6)
    a = torch.randn(32, 2, generator=g) * 1e-25
    b = torch.randn(32, 2, generator=g) + a.double().mul(1e25).float()
    _matrix_vs_float64_twin(a, b, eps=0.0)


@pytest.mark.parametrize("which", ["a", "b"])
def test_nan_column_with_eps_zero_says_nan(which):
    # A NaN column used to be reported as "constant over the batch".
    a, b = (t.detach() for t in make_pair(8, 3))
    (a if which == "a" else b)[5, 1] = float("nan")
    with pytest.raises(RuntimeError, match=rf"NaN in column 1 of {which}"):
        ops.cross_correlation_loss(a, b)
    with pytest.raises(RuntimeError, match=rf"NaN in column 1 of {which}"):
        ops.cross_correlation_matrix(a, b)
    # A truly constant column still says so.
    c = a.nan_to_num()
    c[:, 2] = 7.25
    with pytest.raises(RuntimeError, match="column 2 of a is constant"):
        ops.cross_correlation_matrix(c, b.nan_to_num())
    # eps > 0: NaN flows through like the reference (no error, no hidden NaN).
    m = ops.cross_correlation_matrix(a, b, eps=1e-5)
    m_ref = reference.cross_correlation_matrix(a, b, eps=1e-5)
    torch.testing.assert_close(m, m_ref, equal_nan=True)
    assert m.isnan().any()


# Values whose B-fold sum rounds (not dyadic), at batch sizes where it does, in both accumulation types.
CONSTANT_VALUES = [1.1, 3.3, 0.7, 1e-3, 12345.678, -2.5e30, 1e-39]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [2, 7, 512, 1000])
def test_constant_columns_of_any_value_are_exactly_constant(B, dtype):
    # The scaled two-pass took the mean of B equal values, which rounds (1.1 * 512 is not exact in float): the
    # rounding passed for a variance, so eps=0 did not raise and eps>0 gave inv_std 22.7 instead of 316.2.
    g = torch.Generator().manual_seed(B)
    for v in CONSTANT_VALUES:
        a = torch.randn(B, 3, generator=g, dtype=torch.float64).to(dtype)
        a[:, 1] = v
        b = torch.randn(B, 3, generator=g, dtype=torch.float64).to(dtype)
        with pytest.raises(RuntimeError, match="column 1 of a is constant over the batch"):
            ops.cross_correlation_matrix(a, b)
        _, stats, _ = torch.ops.fcl_ext.cross_correlation_matrix(a, b, True, 1e-5)
        assert stats[0, 1].item() == a[0, 1].item(), v  # the mean of a constant column is its value, exactly
        torch.testing.assert_close(stats[1, 1].double(), torch.tensor(1e-5, dtype=torch.float64).rsqrt(),
                                   rtol=4 * torch.finfo(dtype).eps, atol=0)
        m = ops.cross_correlation_matrix(a, b, eps=1e-5)
        # the oracle: the same column at 0 (its standardised values are exactly 0 either way; the twin's own mean
        # of B copies of 12345.678 rounds, and 1/sqrt(eps) magnifies that)
        a0 = a.double()
        a0[:, 1] = 0.0
        m_ref = reference.cross_correlation_matrix(a0, b.double(), eps=1e-5)
        assert (m[1] == 0).all()
        torch.testing.assert_close(m.double(), m_ref, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-40), (torch.float32, 1e-38), (torch.float64, 1e-310)])
def test_subnormal_columns_standardise_like_the_float64_twin(dtype, tiny):
    # A column whose largest |entry| is subnormal: its scale 2^-e (2^149 in float) overflowed on its own, so every
    # scaled value was inf or NaN and the loss NaN for a finite input.
    g = torch.Generator().manual_seed(9)
    a = torch.randn(16, 3, generator=g, dtype=torch.float64)
    b = torch.randn(16, 3, generator=g, dtype=torch.float64) + 0.5 * a
    a[:, 0] = a[:, 0] / a[:, 0].abs().max() * tiny
    a, b = a.to(dtype), b.to(dtype)
    assert a[:, 0].abs().max() < torch.finfo(dtype).tiny and (a[:, 0] != 0).sum() > 8
    fccl_weights = {k: v for k, v in FCCL.items() if k != "eps"}
    # float64 squares of 1e-310 underflow in torch too: the oracle works on the column times 2^1000 (exact)
    up = 2.0 ** 1000 if dtype == torch.float64 else 1.0
    std_up = (a[:, 0].double() * up).std().item()  # std times up
    for eps in (1e-5, 0.0):
        if eps == 0.0 and std_up < up / torch.finfo(dtype).max:  # 1/std beyond the dtype's largest value
            # 1/std beyond the type's range: a clear error (not "constant", not NaN)
            with pytest.raises(RuntimeError, match=r"column 0 of a varies, but its standard deviation is so small"):
                ops.cross_correlation_matrix(a, b)
            continue
        # the float64 twin on the column scaled by an exact power of two (M does not change; float64 squares of
        # 1e-310 would underflow in the twin too)
        a_ref = a.double().clone()  # (.double() of a float64 tensor is the tensor itself)
        a_ref[:, 0] *= up  # eps == 0: M does not change when a column is scaled
        m = ops.cross_correlation_matrix(a, b, eps=eps)
        m_ref = reference.cross_correlation_matrix(a_ref if eps == 0.0 else a.double(), b.double(), eps=eps)
        assert torch.isfinite(m).all() and torch.isfinite(m_ref).all()
        torch.testing.assert_close(m.double(), m_ref, rtol=1e-4, atol=1e-5)
        loss = ops.cross_correlation_loss(a, b, eps=eps, **fccl_weights)
        loss_ref = reference.cross_correlation_loss(a_ref if eps == 0.0 else a.double(), b.double(), eps=eps,
                                                    **fccl_weights)
        torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exponent", [56, 58, 59, 60, 61, 62])
def test_float32_columns_near_1e18_keep_their_variance(exponent):
    # The one-pass variance formed s1 * s1 (sum of deviations squared): for float32 columns near 2^59..2^60 that
    # product overflowed while the sum of squares did not, the variance clamped to 0 and inv_std came out
    # 1/sqrt(eps) (or "constant" with eps = 0). The large hypothesis profile found it.
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(16, 2, generator=g, dtype=torch.float64) * 2.0 ** exponent).float()
    b = torch.randn(16, 2, generator=g)
    for eps in (0.0, 1e-5):
        _, stats, _ = torch.ops.fcl_ext.cross_correlation_matrix(a, b, True, eps)
        expected = 1.0 / torch.sqrt(a.double().var(0) + eps)
        torch.testing.assert_close(stats[1].double(), expected, rtol=1e-5, atol=0)
        _matrix_vs_float64_twin(a, b, eps=eps)


def test_columns_whose_deviation_from_the_mean_overflows_standardise_like_the_twin():
    # Values near -3e38 with one near +3.3e38: the mean is about -2.6e38, so x - mean (5.9e38) overflowed float32
    # in the standardisation although x_hat is O(1). Found by the power-of-two scaling property at 2^127.
    a = torch.full((8, 2), -3.0e38)
    a[:, 0] += torch.linspace(0, 1e37, 8)
    a[3, 0] = 3.3e38
    a[:, 1] = torch.randn(8, generator=torch.Generator().manual_seed(1))
    b = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)) + 1e-38 * a.double().float().nan_to_num()
    for eps in (0.0, 1e-5):
        _matrix_vs_float64_twin(a, b, eps=eps)
        a_leaf = a.clone().requires_grad_()
        loss = ops.cross_correlation_loss(a_leaf, b.detach(), eps=eps)
        grad, = torch.autograd.grad(loss, a_leaf)
        a64 = a.double().requires_grad_()
        loss64 = reference.cross_correlation_loss(a64, b.double(), eps=eps)
        grad64, = torch.autograd.grad(loss64, a64)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-3, atol=1e-3 * float(grad64.abs().max()))
