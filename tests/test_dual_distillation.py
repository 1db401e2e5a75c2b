"""dual_distillation_loss (FCCL local objective: CE + intra/inter-domain KL): values and gradients
vs the reference, gradcheck, opcheck, compile, teachers None, temperature_squared, no gradient to
teachers, edge cases, bad inputs, and a property test."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fcl_ext
from fcl_ext import ops, reference
from tests.testing import FLOAT_DTYPES, REDUCED_DTYPES, assert_close, devices, make_logits

TEACHERS = ["both", "intra", "inter", "none"]
SETTINGS = {
    "fccl": dict(),  # T = 1, all weights 1, no T^2
    "hinton": dict(temperature=3.0, temperature_squared=True, ce_weight=0.5, intra_weight=0.7, inter_weight=1.3),
    "warm": dict(temperature=0.5, intra_weight=2.0, inter_weight=0.0),
}


def make_inputs(N, C, dtype=torch.float64, device="cpu", seed=0, teachers="both", scale=3.0):
    s = make_logits((N, C), dtype, device, scale=scale, seed=seed, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed)).to(device)
    t1 = make_logits((N, C), dtype, device, scale=scale, seed=seed + 1) if teachers in ("both", "intra") else None
    t2 = make_logits((N, C), dtype, device, scale=scale, seed=seed + 2) if teachers in ("both", "inter") else None
    return s, y, t1, t2


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("teachers", TEACHERS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_reference_values_and_grads(device, dtype, teachers, setting):
    kw = SETTINGS[setting]
    s, y, t1, t2 = make_inputs(37, 23, dtype, device, teachers=teachers)
    out = ops.dual_distillation_loss(s, y, t1, t2, **kw)
    ref = reference.dual_distillation_loss(s, y, t1, t2, **kw)
    assert out.shape == () and out.dtype == dtype
    assert_close(out, ref, dtype)
    grad_out = torch.randn((), dtype=dtype, device=device)
    g_out, = torch.autograd.grad(out, s, grad_out)
    g_ref, = torch.autograd.grad(ref, s, grad_out)
    assert_close(g_out, g_ref, dtype)


@pytest.mark.parametrize("C", [10, 65, 1000])
def test_float64_relative_error_within_1e12(C):
    s, y, t1, t2 = make_inputs(64, C)
    out = ops.dual_distillation_loss(s, y, t1, t2, temperature=2.0)
    ref = reference.dual_distillation_loss(s, y, t1, t2, temperature=2.0)
    assert abs(out.item() - ref.item()) <= 1e-12 * abs(ref.item())
    g, = torch.autograd.grad(out, s)
    r, = torch.autograd.grad(ref, s)
    assert ((g - r).norm() / r.norm()).item() <= 1e-12


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_reduced_precision_accumulates_in_float(device, dtype):
    s64, y, t1, t2 = make_inputs(16, 300, torch.float64, device)
    s = s64.detach().to(dtype).requires_grad_()
    out = ops.dual_distillation_loss(s, y, t1.to(dtype), t2.to(dtype), temperature=2.0)
    assert out.dtype == dtype
    sr = s.detach().double().requires_grad_()
    ref = reference.dual_distillation_loss(sr, y, t1.to(dtype).double(), t2.to(dtype).double(), temperature=2.0)
    assert_close(out, ref, dtype)
    out.backward()
    ref.backward()
    assert s.grad.dtype == dtype
    assert_close(s.grad, sr.grad, dtype)


@pytest.mark.parametrize("teachers", TEACHERS)
def test_gradcheck_float64(teachers):
    s, y, t1, t2 = make_inputs(5, 7, teachers=teachers)
    for kw in SETTINGS.values():
        assert torch.autograd.gradcheck(lambda x: ops.dual_distillation_loss(x, y, t1, t2, **kw), (s,))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("teachers", TEACHERS)
def test_opcheck(device, requires_grad, teachers):
    s, y, t1, t2 = make_inputs(8, 13, torch.float32, device, teachers=teachers)
    s = s.detach().requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fcl_ext.dual_distillation_loss.default, (s, y, t1, t2, 2.0, 1.0, 0.5, 4.0))


def test_compile_fullgraph():
    def local_step(s, y, t1, t2):
        return ops.dual_distillation_loss(s * 2.0, y, t1, t2, temperature=2.0) + s.pow(2).mean()

    s, y, t1, t2 = make_inputs(12, 10, torch.float32)
    compiled = torch.compile(local_step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(s, y, t1, t2), local_step(s, y, t1, t2), torch.float32)
    g_c, = torch.autograd.grad(compiled(s, y, t1, t2), s)
    g_e, = torch.autograd.grad(local_step(s, y, t1, t2), s)
    assert_close(g_c, g_e, torch.float32)
    compiled_none = torch.compile(lambda s, y: ops.dual_distillation_loss(s, y), fullgraph=True, backend="aot_eager")
    assert_close(compiled_none(s, y), F.cross_entropy(s, y), torch.float32)


@pytest.mark.slow
def test_compile_inductor():
    s, y, t1, t2 = make_inputs(12, 10, torch.float32)
    compiled = torch.compile(lambda *x: ops.dual_distillation_loss(*x), fullgraph=True)
    assert_close(compiled(s, y, t1, t2), ops.dual_distillation_loss(s, y, t1, t2), torch.float32)


# ---- semantics ----------------------------------------------------------------------

def test_teachers_get_no_gradient():
    s, y, t1, t2 = make_inputs(9, 6)
    t1.requires_grad_()
    t2.requires_grad_()
    ops.dual_distillation_loss(s, y, t1, t2).backward()
    assert s.grad is not None
    assert t1.grad is None and t2.grad is None


def test_no_teachers_is_weighted_cross_entropy():
    s, y, _, _ = make_inputs(11, 5, teachers="none")
    assert_close(ops.dual_distillation_loss(s, y, ce_weight=0.3), 0.3 * F.cross_entropy(s, y))


def test_fccl_form_is_ce_plus_two_batchmean_kls():
    # specs/fccl.md 1.4: CE + KLDivLoss(batchmean)(log q, p_intra) + the same for p_inter, T = 1.
    s, y, t1, t2 = make_inputs(10, 8)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    log_q = F.log_softmax(s, dim=1)
    expected = F.cross_entropy(s, y) + kl(log_q, F.softmax(t1, dim=1)) + kl(log_q, F.softmax(t2, dim=1))
    assert_close(ops.dual_distillation_loss(s, y, t1, t2), expected)


def test_temperature_squared_scales_only_the_kl_terms():
    s, y, t1, t2 = make_inputs(10, 8)
    T = 4.0
    ce = F.cross_entropy(s, y)
    plain = ops.dual_distillation_loss(s, y, t1, t2, temperature=T)
    squared = ops.dual_distillation_loss(s, y, t1, t2, temperature=T, temperature_squared=True)
    assert_close(squared - ce, T ** 2 * (plain - ce))
    assert not torch.allclose(squared, plain)


def test_identical_teacher_and_student_has_zero_kl():
    s, y, _, _ = make_inputs(7, 9)
    out = ops.dual_distillation_loss(s, y, s.detach(), s.detach(), temperature=2.0, ce_weight=0.0)
    assert abs(out.item()) < 1e-12
    g, = torch.autograd.grad(out, s)
    assert g.abs().max().item() < 1e-12


def test_non_contiguous_inputs():
    base = make_logits((30, 24), torch.float64, requires_grad=True)
    s = base.t()[:, ::2]  # [24, 15]
    t1 = make_logits((15, 24), torch.float64, seed=5).t()
    t2 = make_logits((24, 30), torch.float64, seed=6)[:, ::2]
    y = torch.arange(24) % 15
    y_strided = torch.stack([y, y], 1)[:, 0]
    assert not s.is_contiguous() and not t1.is_contiguous() and not y_strided.is_contiguous()
    out = ops.dual_distillation_loss(s, y_strided, t1, t2, temperature=1.5)
    ref = reference.dual_distillation_loss(s, y, t1, t2, temperature=1.5)
    assert_close(out, ref)
    assert_close(torch.autograd.grad(out, base)[0], torch.autograd.grad(ref, base)[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits_are_finite(dtype):
    s = torch.tensor([[1e4, -1e4, 0.0], [-5e3, 5e3, 1.0]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [3.0, -3.0, 0.0]], dtype=dtype)
    y = torch.tensor([0, 2])
    out = ops.dual_distillation_loss(s, y, t, t.flip(0), temperature=2.0)
    assert torch.isfinite(out)
    s64 = s.detach().double().requires_grad_()
    ref = reference.dual_distillation_loss(s64, y, t.double(), t.flip(0).double(), temperature=2.0)
    assert_close(out, ref, dtype)
    out.backward()
    ref.backward()
    assert torch.isfinite(s.grad).all()
    assert_close(s.grad, s64.grad, dtype)  # the gradient too, not just its finiteness (issue 17)


def test_int32_labels_accepted():
    s, y, t1, t2 = make_inputs(6, 4)
    assert_close(ops.dual_distillation_loss(s, y.int(), t1, t2), ops.dual_distillation_loss(s, y, t1, t2))


# ---- bad input ----------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    s, y, t1, t2 = make_inputs(6, 4)
    with pytest.raises(ValueError, match="labels must be an integer"):
        ops.dual_distillation_loss(s, y.double())
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.dual_distillation_loss(s, y[:3])
    with pytest.raises(ValueError, match="logits must be a non-empty 2-D"):
        ops.dual_distillation_loss(s[0], y)
    with pytest.raises(ValueError, match="logits must be a non-empty 2-D"):
        ops.dual_distillation_loss(s[:0], y[:0])
    with pytest.raises(ValueError, match="intra_logits must have the shape"):
        ops.dual_distillation_loss(s, y, t1[:, :3], t2)
    with pytest.raises(ValueError, match="inter_logits must be a floating-point"):
        ops.dual_distillation_loss(s, y, t1, t2.long())
    with pytest.raises(ValueError, match="temperature"):
        ops.dual_distillation_loss(s, y, t1, t2, temperature=0.0)
    with pytest.raises(ValueError, match="intra_weight"):
        ops.dual_distillation_loss(s, y, t1, t2, intra_weight=-1.0)


def test_out_of_range_label_raises():
    s, y, t1, t2 = make_inputs(6, 4)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 4 is out of range"):
        ops.dual_distillation_loss(s, torch.tensor([0, 1, 4, 0, 0, 0]), t1, t2)


def test_double_backward_raises():
    s, y, t1, t2 = make_inputs(4, 3)
    g, = torch.autograd.grad(ops.dual_distillation_loss(s, y, t1, t2), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---- module -------------------------------------------------------------------------

def test_module_matches_functional():
    s, y, t1, t2 = make_inputs(8, 5)
    m = fcl_ext.losses.DualDomainDistillationLoss(temperature=2.0, intra_weight=0.5, temperature_squared=True)
    assert_close(m(s, y, t1, t2), ops.dual_distillation_loss(s, y, t1, t2, temperature=2.0, intra_weight=0.5,
                                                             temperature_squared=True))
    assert_close(fcl_ext.losses.DualDomainDistillationLoss()(s, y), F.cross_entropy(s, y))
    assert "temperature_squared=True" in repr(m)
    with pytest.raises(ValueError, match="temperature"):
        fcl_ext.losses.DualDomainDistillationLoss(temperature=-1.0)


# ---- property test ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 12), C=st.integers(1, 70), scale=st.sampled_from([0.01, 1.0, 30.0]),
       T=st.sampled_from([0.5, 1.0, 4.0]), squared=st.booleans(), teachers=st.sampled_from(TEACHERS),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(N, C, scale, T, squared, teachers, seed):
    s, y, t1, t2 = make_inputs(N, C, scale=scale, seed=seed, teachers=teachers)
    kw = dict(temperature=T, temperature_squared=squared)
    out = ops.dual_distillation_loss(s, y, t1, t2, **kw)
    ref = reference.dual_distillation_loss(s, y, t1, t2, **kw)
    assert_close(out, ref)
    assert out.item() >= -1e-9  # CE and KL are non-negative
    g, = torch.autograd.grad(out, s)
    r, = torch.autograd.grad(ref, s)
    assert_close(g, r)
    assert abs(g.sum().item()) < 1e-9  # every term's gradient sums to zero over the classes
