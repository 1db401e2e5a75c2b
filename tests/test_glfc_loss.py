"""GLFC losses (gradient_compensated_bce, relation_distillation_bce, glfc_loss): values,
weights and gradients vs the reference, gradcheck, opcheck, compile, edge cases, bad inputs,
and a property test."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fcl_ext
from fcl_ext import ops, reference
from tests.testing import FLOAT_DTYPES, REDUCED_DTYPES, assert_close, devices, make_logits

REDUCTIONS = ["none", "mean", "sum"]


def make_case(n=37, c=53, c_old=26, dtype=torch.float64, device="cpu", seed=0, old_every=2, scale=3.0,
              requires_grad=True):
    """logits [n, c], labels covering 0 and c-1, a mask of every `old_every`-th class, old logits [n, c_old]."""
    logits = make_logits((n, c), dtype, device, scale=scale, seed=seed, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[0] = 0
    labels[-1] = c - 1
    mask = torch.zeros(c, dtype=torch.bool)
    mask[::old_every] = True
    old_logits = make_logits((n, c_old), dtype, device, scale=scale, seed=seed + 2)
    return logits, labels.to(device), mask.to(device), old_logits


def both(fn_name, *args, **kwargs):
    return getattr(ops, fn_name)(*args, **kwargs), getattr(reference, fn_name)(*args, **kwargs)


def grads(out, ref, x, seed=3):
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(ref.dtype).to(ref.device)  # random grad_output, not ones
    g_out, = torch.autograd.grad(out, x, grad_out)
    g_ref, = torch.autograd.grad(ref, x, grad_out)
    return g_out, g_ref


# ---- values and gradients vs the reference --------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_compensated_bce_matches_reference(device, dtype, reduction):
    x, y, mask, _ = make_case(dtype=dtype, device=device)
    (out, w), (ref, w_ref) = both("gradient_compensated_bce", x, y, mask, reduction=reduction, return_weights=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, dtype)
    assert w.dtype == w_ref.dtype
    assert_close(w, w_ref, dtype)
    assert_close(*grads(out, ref, x), dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("c_old", [0, 26, 53])
def test_relation_distillation_bce_matches_reference(device, dtype, reduction, c_old):
    x, y, _, q = make_case(dtype=dtype, device=device, c_old=c_old)
    out, ref = both("relation_distillation_bce", x, y, q, reduction=reduction)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype)
    assert_close(*grads(out, ref, x), dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_old_logits", [False, True])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.25)])
def test_glfc_loss_matches_reference(device, dtype, with_old_logits, weights):
    x, y, mask, q = make_case(dtype=dtype, device=device)
    q = q if with_old_logits else None
    gc_w, rd_w = weights
    (out, w), (ref, w_ref) = both("glfc_loss", x, y, mask, q, gc_weight=gc_w, rd_weight=rd_w, return_weights=True)
    assert out.dim() == 0
    assert_close(out, ref, dtype)
    assert_close(w, w_ref, dtype)
    assert_close(*grads(out, ref, x), dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("c", [5, 100, 300])  # warp-per-row and block-per-row CUDA launches
def test_float64_relative_error_is_below_1e12(device, c):
    x, y, mask, q = make_case(n=64, c=c, c_old=c // 2, device=device, seed=c)
    out, ref = both("glfc_loss", x, y, mask, q)
    assert ((out - ref).abs() / ref.abs()).item() <= 1e-12
    g_out, g_ref = grads(out, ref, x)
    assert ((g_out - g_ref).abs().max() / g_ref.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", REDUCED_DTYPES)
def test_reduced_precision_accumulates_in_float(device, dtype):
    x64, y, mask, q64 = make_case(n=16, c=300, c_old=150, device=device, requires_grad=False)
    x = x64.to(dtype).requires_grad_()
    q = q64.to(dtype)
    out, w = ops.glfc_loss(x, y, mask, q, return_weights=True)
    assert out.dtype == dtype and w.dtype == torch.float32
    xr = x.detach().double().requires_grad_()
    ref, w_ref = reference.glfc_loss(xr, y, mask, q.double(), return_weights=True)
    assert_close(out, ref, dtype)
    assert_close(w, w_ref, dtype)
    out.backward()
    ref.backward()
    assert x.grad.dtype == dtype
    # Gradient entries are O(1/(N C)); compare relative to their scale.
    scale = xr.grad.abs().max()
    assert_close(x.grad / scale.to(dtype), xr.grad / scale, dtype)
    per_row = ops.relation_distillation_bce(x, y, q, reduction="none")
    assert_close(per_row, reference.relation_distillation_bce(xr, y, q.double(), reduction="none"), dtype)


def test_old_logits_of_another_dtype_are_converted():
    x, y, mask, q = make_case(dtype=torch.float32)
    out = ops.glfc_loss(x, y, mask, q.double())
    assert_close(out, reference.glfc_loss(x, y, mask, q.double()), torch.float32)


# ---- gradcheck, opcheck, compile ------------------------------------------------

def test_gradcheck_float64():
    # w depends on the logits but is detached by definition, so finite differences only agree
    # with the analytic gradient where w is constant: no old classes (w = 1).
    x, y, _, q = make_case(n=6, c=7, c_old=3)
    assert torch.autograd.gradcheck(lambda t: ops.glfc_loss(t, y, None, q, gc_weight=0.7, rd_weight=0.4), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.gradient_compensated_bce(t, y, None, reduction="none"), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.relation_distillation_bce(t, y, q, reduction="sum"), (x,))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, requires_grad, dtype):
    x, y, mask, q = make_case(n=8, c=13, c_old=5, dtype=dtype, device=device, requires_grad=requires_grad)
    op = torch.ops.fcl_ext.glfc_loss.default
    torch.library.opcheck(op, (x, y, mask, q, 0.5, 0.5))
    torch.library.opcheck(op, (x, y, None, None, 1.0, 0.0))
    torch.library.opcheck(op, (x, y, mask, x.detach()[:, :13].clone(), 0.3, 0.9))  # C_old = C


def test_compile_fullgraph():
    x, y, mask, q = make_case(n=6, c=11, c_old=4, dtype=torch.float32)

    def loss_fn(logits):
        return ops.glfc_loss(logits * 2.0, y, mask, q) + ops.relation_distillation_bce(logits, y, q) \
            + logits.pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), loss_fn(x), torch.float32)
    g_c, = torch.autograd.grad(compiled(x), x)
    g_e, = torch.autograd.grad(loss_fn(x), x)
    assert_close(g_c, g_e, torch.float32)


@pytest.mark.slow
def test_compile_inductor():
    x, y, mask, q = make_case(n=6, c=11, c_old=4, dtype=torch.float32, requires_grad=False)
    compiled = torch.compile(lambda t: ops.glfc_loss(t, y, mask, q), fullgraph=True)
    assert_close(compiled(x), ops.glfc_loss(x, y, mask, q), torch.float32)


# ---- edge cases -----------------------------------------------------------------

def _assert_glfc_matches(x, y, mask, q):
    (out, w), (ref, w_ref) = both("glfc_loss", x, y, mask, q, return_weights=True)
    assert_close(out, ref)
    assert_close(w, w_ref)
    assert_close(*grads(out, ref, x))
    return w


def test_no_old_classes_gives_unit_weights():
    x, y, mask, q = make_case()
    w = _assert_glfc_matches(x, y, torch.zeros_like(mask), q)
    assert torch.all(w == 1)
    # None and an empty list of class ids mean the same
    assert_close(ops.glfc_loss(x, y, None, q), ops.glfc_loss(x, y, torch.zeros_like(mask), q))
    assert_close(ops.glfc_loss(x, y, torch.tensor([], dtype=torch.long), q), ops.glfc_loss(x, y, None, q))
    # with w = 1, L_GC is plain BCE with one-hot targets
    target = torch.nn.functional.one_hot(y, x.shape[1]).double()
    assert_close(ops.gradient_compensated_bce(x, y, None),
                 torch.nn.functional.binary_cross_entropy_with_logits(x, target))


def test_all_samples_old_and_all_new_form_one_group():
    x, y, mask, q = make_case()
    for mask_all in (torch.ones_like(mask), torch.zeros_like(mask).index_fill(0, y.unique(), True)):
        w = _assert_glfc_matches(x, y, mask_all, q)
        assert_close(w.mean(), torch.tensor(1.0, dtype=w.dtype))  # one group: weights average 1
        g = torch.sigmoid(-x.detach().gather(1, y[:, None]).squeeze(1))
        assert_close(w, g / g.mean())
    # all samples new although some class is old: again one group
    unused = torch.ones_like(mask)
    unused[y.unique()] = False
    assert unused.any()
    w = _assert_glfc_matches(x, y, unused, q)
    assert_close(w.mean(), torch.tensor(1.0, dtype=w.dtype))


def test_each_group_averages_one():
    x, y, mask, q = make_case(n=64)
    _, w = ops.glfc_loss(x, y, mask, q, return_weights=True)
    old = mask[y]
    assert old.any() and (~old).any()
    assert_close(w[old].mean(), torch.tensor(1.0, dtype=w.dtype))
    assert_close(w[~old].mean(), torch.tensor(1.0, dtype=w.dtype))
    assert not torch.allclose(w, torch.ones_like(w))


@pytest.mark.parametrize("c_old", [0, 53])
def test_c_old_zero_and_full(c_old):
    x, y, mask, q = make_case(c_old=c_old)
    assert q.shape == (37, c_old)
    _assert_glfc_matches(x, y, mask, q)
    if c_old == 0:  # RD against the plain one-hot target
        target = torch.nn.functional.one_hot(y, x.shape[1]).double()
        assert_close(ops.relation_distillation_bce(x, y, q),
                     torch.nn.functional.binary_cross_entropy_with_logits(x, target))


@pytest.mark.parametrize("label", [0, 52])
def test_single_sample_and_boundary_labels(label):
    x, _, mask, q = make_case(n=1)
    y = torch.tensor([label])
    w = _assert_glfc_matches(x, y, mask, q)
    assert_close(w, torch.ones(1, dtype=torch.float64))  # G / mean(G) of a single sample


def test_group_with_zero_mean_gets_unit_weights():
    # exp(-1e4) underflows: G = 0 for every old sample, so their group mean is 0.
    x, y, mask, q = make_case(n=8, c=6, c_old=3, requires_grad=False)
    old = mask[y]
    x[old, y[old]] = 1e4
    x.requires_grad_()
    w = _assert_glfc_matches(x, y, mask, q)
    assert torch.all(w[old] == 1)
    assert_close(w[~old].mean(), torch.tensor(1.0, dtype=w.dtype))


def test_class_id_mask_equals_bool_mask():
    x, y, mask, q = make_case()
    ids = mask.nonzero().squeeze(1)
    for id_mask in (ids, ids.int(), torch.cat([ids, ids[:3]])):  # repeated ids are fine
        a, wa = ops.glfc_loss(x, y, id_mask, q, return_weights=True)
        b, wb = ops.glfc_loss(x, y, mask, q, return_weights=True)
        assert_close(a, b)
        assert_close(wa, wb)


def test_without_old_logits_glfc_is_gc_alone():
    x, y, mask, _ = make_case()
    assert_close(ops.glfc_loss(x, y, mask, gc_weight=0.1, rd_weight=3.0), ops.gradient_compensated_bce(x, y, mask))
    assert_close(ops.glfc_loss(x, y, mask), reference.glfc_loss(x, y, mask))


def test_glfc_is_the_weighted_sum_of_its_terms():
    x, y, mask, q = make_case()
    expected = 0.3 * ops.gradient_compensated_bce(x, y, mask) + 0.9 * ops.relation_distillation_bce(x, y, q)
    assert_close(ops.glfc_loss(x, y, mask, q, gc_weight=0.3, rd_weight=0.9), expected)


def test_no_gradient_to_old_logits_or_through_weights():
    x, y, mask, q = make_case()
    q.requires_grad_()
    loss, w = ops.glfc_loss(x, y, mask, q, return_weights=True)
    assert not w.requires_grad
    loss.backward()
    assert q.grad is None
    per_sample, weights, stats = torch.ops.fcl_ext.glfc_loss(x, y, mask, q, 0.5, 0.5)
    assert per_sample.requires_grad and not weights.requires_grad and not stats.requires_grad


def test_row_stats_hold_the_unweighted_terms():
    x, y, mask, q = make_case()
    per_sample, w, stats = torch.ops.fcl_ext.glfc_loss(x, y, mask, q, 0.3, 0.9)
    assert_close(stats[:, 0] * w, reference.gradient_compensated_bce(x, y, mask, reduction="none"))
    assert_close(stats[:, 1], reference.relation_distillation_bce(x, y, q, reduction="none"))
    assert_close(per_sample, 0.3 * w * stats[:, 0] + 0.9 * stats[:, 1])


def test_empty_batch():
    x = torch.empty(0, 10, dtype=torch.float64, requires_grad=True)
    y = torch.empty(0, dtype=torch.long)
    q = torch.empty(0, 4, dtype=torch.float64)
    assert ops.gradient_compensated_bce(x, y, None, reduction="none").shape == (0,)
    assert ops.relation_distillation_bce(x, y, q, reduction="sum").item() == 0.0
    assert torch.isnan(ops.glfc_loss(x, y, None, q))  # as torch's mean of nothing
    ops.relation_distillation_bce(x, y, q, reduction="sum").backward()
    assert x.grad.shape == (0, 10)


def test_non_contiguous_inputs():
    base, y, mask, _ = make_case(n=40, c=30, requires_grad=True)
    x = base.t()[:, ::2]  # [30, 20] strided view
    assert not x.is_contiguous()
    y = y[:30] % 20
    q = make_logits((20, 30), torch.float64, seed=9).t()[:, :7]
    m = mask[:20]
    out, ref = both("glfc_loss", x, y, m, q)
    assert_close(out, ref)
    assert_close(*grads(out, ref, base))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits_are_finite_and_accurate(dtype):
    x = torch.tensor([[1e4, -1e4, 0.3, -2.0], [-1e4, -1e4, -1e4, -1e4], [5e3, -5e3, 1.0, 1e4],
                      [0.1, 1e4, -1e4, 2.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1, 3, 2])
    mask = torch.tensor([True, True, False, False])
    q = torch.tensor([[1e4, -1e4], [3.0, -1e4], [-1e4, 1e4], [0.0, 1e4]], dtype=dtype)
    for name, args in (("glfc_loss", (x, y, mask, q)), ("gradient_compensated_bce", (x, y, mask)),
                       ("relation_distillation_bce", (x, y, q))):
        out = getattr(ops, name)(*args, reduction="none") if name != "glfc_loss" else ops.glfc_loss(*args)
        assert torch.isfinite(out).all()
        x64 = x.detach().double().requires_grad_()
        args64 = (x64,) + tuple(a.double() if a.is_floating_point() else a for a in args[1:])
        ref = getattr(reference, name)(*args64, reduction="none") if name != "glfc_loss" \
            else reference.glfc_loss(*args64)
        # a row whose only loss is one exact zero-cancelling target must stay exact, not O(ulp(1e4))
        assert_close(out, ref, dtype)
        g, = torch.autograd.grad(out.sum(), x)
        g_ref, = torch.autograd.grad(ref.sum(), x64)
        assert torch.isfinite(g).all()
        assert_close(g, g_ref, dtype)


# ---- bad input ------------------------------------------------------------------

def test_labels_out_of_range_rejected():
    x, y, mask, q = make_case(n=4, c=5, c_old=2)
    for bad in (torch.tensor([0, 1, 5, 2]), torch.tensor([0, -1, 2, 3])):
        with pytest.raises(ValueError, match="labels"):
            ops.glfc_loss(x, bad, mask, q)
        with pytest.raises(ValueError, match="labels"):
            ops.relation_distillation_bce(x, bad, q)
        with pytest.raises(ValueError, match="labels"):  # the kernel checks (also direct op calls)
            torch.ops.fcl_ext.glfc_loss(x, bad, mask, q, 0.5, 0.5)


def test_labels_of_wrong_shape_or_dtype_rejected():
    x, y, mask, q = make_case(n=4, c=5, c_old=2)
    with pytest.raises(ValueError, match="labels"):
        ops.gradient_compensated_bce(x, y[:3], mask)
    with pytest.raises(ValueError, match="labels"):
        ops.gradient_compensated_bce(x, y.double(), mask)
    with pytest.raises(TypeError, match="labels"):
        ops.gradient_compensated_bce(x, [0, 1, 2, 3], mask)


def test_mask_of_wrong_length_or_kind_rejected():
    x, y, mask, q = make_case(n=4, c=5, c_old=2)
    with pytest.raises(ValueError, match="old_class_mask"):
        ops.glfc_loss(x, y, mask[:4], q)
    with pytest.raises(ValueError, match="old_class_mask"):
        ops.gradient_compensated_bce(x, y, torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="old_class_mask"):
        ops.gradient_compensated_bce(x, y, torch.tensor([0, 7]))  # class id out of range
    with pytest.raises(ValueError, match="old_class_mask"):
        ops.gradient_compensated_bce(x, y, mask.double())
    with pytest.raises(RuntimeError, match="old_class_mask"):
        torch.ops.fcl_ext.glfc_loss(x, y, mask[:4], q, 0.5, 0.5)


def test_bad_old_logits_rejected():
    x, y, mask, q = make_case(n=4, c=5, c_old=2)
    with pytest.raises(ValueError, match="old_logits"):
        ops.glfc_loss(x, y, mask, make_logits((4, 6)))  # wider than logits
    with pytest.raises(ValueError, match="old_logits"):
        ops.relation_distillation_bce(x, y, make_logits((3, 2)))  # another batch size
    with pytest.raises(ValueError, match="old_logits"):
        ops.relation_distillation_bce(x, y, torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="old_logits"):
        ops.relation_distillation_bce(x, y, None)
    with pytest.raises(RuntimeError, match="old_logits"):
        torch.ops.fcl_ext.glfc_loss(x, y, mask, make_logits((4, 6)), 0.5, 0.5)
    with pytest.raises(RuntimeError, match="old_logits"):
        torch.ops.fcl_ext.glfc_loss(x, y, mask, make_logits((3, 2)), 0.5, 0.5)


def test_bad_logits_rejected():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="logits"):
        ops.glfc_loss(torch.ones(2, 3, dtype=torch.int64), y, None)
    with pytest.raises(ValueError, match="logits"):
        ops.gradient_compensated_bce(torch.randn(2, 3, 4), y, None)
    with pytest.raises(ValueError, match="logits"):
        ops.gradient_compensated_bce(torch.randn(2, 0), y, None)
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.fcl_ext.glfc_loss(torch.ones(2, 3, dtype=torch.int32), y, None, None, 1.0, 0.0)


def test_bad_reduction_and_weights_rejected():
    x, y, mask, q = make_case(n=4, c=5, c_old=2)
    with pytest.raises(ValueError, match="reduction"):
        ops.gradient_compensated_bce(x, y, mask, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        ops.relation_distillation_bce(x, y, q, reduction="batchmean")
    with pytest.raises(ValueError, match="gc_weight"):
        ops.glfc_loss(x, y, mask, q, gc_weight=-1.0)
    with pytest.raises(ValueError, match="rd_weight"):
        ops.glfc_loss(x, y, mask, q, rd_weight=float("nan"))


def test_double_backward_raises():
    x, y, mask, q = make_case(n=3, c=4, c_old=2)
    g, = torch.autograd.grad(ops.glfc_loss(x, y, mask, q), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_ops_are_guarded_for_cuda():
    from fcl_ext import _registrations
    assert "fcl_ext::glfc_loss" in _registrations._ALL_OPS
    assert "fcl_ext::_glfc_loss_backward" in _registrations._BACKWARD_OPS


# ---- modules --------------------------------------------------------------------

def test_modules_match_functional():
    x, y, mask, q = make_case()
    gc = fcl_ext.losses.GradientCompensatedBCELoss(reduction="sum")
    assert_close(gc(x, y, mask), ops.gradient_compensated_bce(x, y, mask, reduction="sum"))
    out, w = gc(x, y, mask, return_weights=True)
    assert_close(w, reference.gradient_compensation_weights(x, y, mask))
    rd = fcl_ext.losses.RelationDistillationLoss(reduction="none")
    assert_close(rd(x, y, q), ops.relation_distillation_bce(x, y, q, reduction="none"))
    glfc = fcl_ext.losses.GLFCLoss(gc_weight=0.25, rd_weight=0.75)
    assert_close(glfc(x, y, mask, q), reference.glfc_loss(x, y, mask, q, gc_weight=0.25, rd_weight=0.75))
    assert_close(glfc(x, y, mask), reference.glfc_loss(x, y, mask))
    assert "gc_weight=0.25" in repr(glfc) and "reduction='none'" in repr(rd)
    with pytest.raises(ValueError, match="reduction"):
        fcl_ext.losses.GradientCompensatedBCELoss(reduction="bad")
    with pytest.raises(ValueError, match="rd_weight"):
        fcl_ext.losses.GLFCLoss(rd_weight=-0.1)


# ---- property test --------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(1, 40), old_frac=st.floats(0.0, 1.0), c_old_frac=st.floats(0.0, 1.0),
       scale=st.sampled_from([0.01, 1.0, 30.0, 300.0]), seed=st.integers(0, 2**16),
       weights=st.sampled_from([(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.2, 1.7)]))
def test_property_matches_reference(n, c, old_frac, c_old_frac, scale, seed, weights):
    g = torch.Generator().manual_seed(seed)
    x = make_logits((n, c), torch.float64, scale=scale, seed=seed, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    mask = torch.rand(c, generator=g) < old_frac
    q = make_logits((n, int(round(c_old_frac * c))), torch.float64, scale=scale, seed=seed + 1)
    gc_w, rd_w = weights
    (out, w), (ref, w_ref) = both("glfc_loss", x, y, mask, q, gc_weight=gc_w, rd_weight=rd_w, return_weights=True)
    assert_close(out, ref)
    assert_close(w, w_ref)
    assert out >= 0  # BCE terms and weights are non-negative
    assert_close(*grads(out, ref, x))


# ---- regressions (issue 17, issue 12 item 3) -----------------------------------------------

def test_backward_op_checks_weights_and_grad():
    x, y, mask, q = make_case(n=4, c=5, c_old=2, dtype=torch.float32, requires_grad=False)
    _, w, _ = torch.ops.fcl_ext.glfc_loss(x, y, mask, q, 0.5, 0.5)
    bwd = torch.ops.fcl_ext._glfc_loss_backward
    with pytest.raises(RuntimeError, match="weights must have dtype Float"):  # float64 weights, float32 logits
        bwd(torch.ones(4), x, y, q, w.double(), 0.5, 0.5)
    with pytest.raises(RuntimeError, match=r"weights must have shape \[4\]"):
        bwd(torch.ones(4), x, y, q, w[:2], 0.5, 0.5)
    with pytest.raises(RuntimeError, match=r"grad_per_sample_loss must have shape \[4\]"):
        bwd(torch.ones(3), x, y, q, w, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"labels\[3\] = 5 is out of range \[0, 5\)"):
        bwd(torch.ones(4), x, torch.tensor([0, 1, 2, 5]), q, w, 0.5, 0.5)


def test_labels_are_checked_by_the_kernel_without_a_host_sync(monkeypatch):
    # ops.py used torch.aminmax + int() (a host sync on CUDA on every call); the kernel now checks labels where it
    # reads them and names the row, the value and the range.
    x, y, mask, q = make_case(n=6, c=5, c_old=2)

    def no_aminmax(*args, **kwargs):
        raise AssertionError("ops.py must not check labels with torch.aminmax")

    monkeypatch.setattr(torch, "aminmax", no_aminmax)
    assert_close(ops.glfc_loss(x, y, mask, q), reference.glfc_loss(x, y, mask, q))
    bad = y.clone()
    bad[4] = -2
    with pytest.raises(ValueError, match=r"labels\[4\] = -2 is out of range \[0, 5\)"):
        ops.glfc_loss(x, bad, mask, q)
    with pytest.raises(ValueError, match=r"labels\[4\] = -2 is out of range"):
        ops.gradient_compensated_bce(x, bad, mask)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_logits_give_nan_like_the_reference(dtype):
    x, y, mask, q = make_case(n=6, c=9, c_old=4, dtype=dtype, requires_grad=False)
    x[2, 5] = float("nan")
    x.requires_grad_(True)
    out = ops.glfc_loss(x, y, mask, q)
    ref = reference.glfc_loss(x, y, mask, q)
    assert out.isnan() and ref.isnan()
    g, = torch.autograd.grad(out, x)
    g_ref, = torch.autograd.grad(ref, x)
    assert g[2].isnan().any() and g_ref[2].isnan().any()
    torch.testing.assert_close(g.isnan(), g_ref.isnan())
    keep = ~g_ref.isnan()
    assert_close(g[keep], g_ref[keep], dtype)
