"""Every CUDA code path of every op against the CPU kernel and the float64 reference (issue 12).

Paths: warp-per-row and block-per-row row kernels (softmax_entropy, glfc_loss, dual_distillation), glfc_loss
with infinite / NaN logits and teacher logits (the twin's semantics, both row kernels); cross_correlation's
one-block fused path, its multi-block path (split-B column statistics + cuBLAS) at small K with a large
batch, at K=200 and at B*K^2 > 2^22, with 0 columns, and the scaled two-pass column statistics (columns near
+-3e38; NaN / inf columns as a "NaN in column" device error) on the fused, split-B and cuBLAS paths;
gradient matching's split-P forward (small K), block-per-row forward, K > 65535 (grid.y), and the cosine
rescale at extreme norms (1e-25 .. 1e25) in the forward (one-block and split-P finish) and the backward;
lbfgs_direction's register path (D <= 4 x threads, next history pair prefetched) and streaming path
(D > 4096) with ring buffers, M = 0 and invalid history indices. Each in float64/float32/float16/bfloat16
where the op takes them, with non-contiguous and zero-size inputs. Forward and backward of every loss run under
torch.cuda.set_sync_debug_mode("error"), so a host sync fails the test. Invalid inputs give NaN outputs
and a device error that fcl_ext.check_device_errors() raises (never a device assert).

Skips cleanly without a GPU (and in builds without CUDA kernels).
"""
import contextlib

import pytest
import torch

import fcl_ext
from fcl_ext import reference as ref
from fcl_ext.device_errors import DeviceInputError
from tests.testing import CUDA_SKIP_REASON, HAS_CUDA_KERNELS, HAS_GPU, tol

pytestmark = pytest.mark.skipif(not (HAS_GPU and HAS_CUDA_KERNELS), reason=CUDA_SKIP_REASON or "cuda")

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def no_pending_device_errors():
    """Every test starts and must end with an empty device-error buffer (tests that provoke one consume it)."""
    if HAS_GPU and HAS_CUDA_KERNELS:
        fcl_ext.check_device_errors("cuda")  # also allocates the buffer outside any sync-checked region
    yield
    if HAS_GPU and HAS_CUDA_KERNELS:
        fcl_ext.check_device_errors("cuda")


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _leaves(inputs, grad_idx):
    return [inputs[i] for i in grad_idx]


def _run(fn, inputs, grad_idx, weight_seed=1, sync_checked=False):
    """fn(*inputs) and the gradients of <fn(...), w> (w random, fixed) w.r.t. inputs[grad_idx]."""
    # detach() keeps a view's strides (clone() would make a strided input contiguous again)
    inputs = [x.detach().requires_grad_(i in grad_idx) if isinstance(x, torch.Tensor) and
              x.is_floating_point() else x for i, x in enumerate(inputs)]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=torch.float64)
    w = w.to(device=out.device, dtype=out.dtype)
    grads = ()
    if grad_idx:
        if sync_checked:
            with no_host_sync():
                out = fn(*inputs)
                grads = torch.autograd.grad((out * w).sum(), _leaves(inputs, grad_idx))
        else:
            grads = torch.autograd.grad((out * w).sum(), _leaves(inputs, grad_idx))
    elif sync_checked:
        with no_host_sync():
            out = fn(*inputs)
    return out.detach(), [g.detach() for g in grads]


def _to(inputs, device, dtype=None):
    moved = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x = x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)
        moved.append(x)
    return moved


def check_paths(fused, reference, inputs, grad_idx, dtype, non_contiguous=False, **tol_kw):
    """CUDA kernel vs float64 reference and vs the CPU kernel, values and gradients.

    `inputs` are CPU float64 (and integer) tensors; they are rounded to `dtype` once so every
    implementation sees the same values. The CUDA forward + backward run under sync-debug "error".
    """
    rounded = _to(inputs, "cpu", dtype)
    cuda_in = _to(rounded, "cuda")
    if non_contiguous:  # the same values, through a strided view
        cuda_in = [torch.cat([x, x], dim=-1)[..., : x.shape[-1]] if isinstance(x, torch.Tensor) and
                   x.is_floating_point() and x.dim() >= 2 else x for x in cuda_in]
        assert any(isinstance(x, torch.Tensor) and not x.is_contiguous() for x in cuda_in)
    _run(fused, cuda_in, grad_idx)  # warm up outside the sync check (cuBLAS handles, allocator)
    cuda_out, cuda_grads = _run(fused, cuda_in, grad_idx, sync_checked=True)
    fcl_ext.check_device_errors("cuda")
    cpu_out, cpu_grads = _run(fused, rounded, grad_idx)
    ref_out, ref_grads = _run(reference, _to(rounded, "cpu", torch.float64), grad_idx)
    opts = tol(dtype)
    opts.update(tol_kw)
    assert cuda_out.dtype == dtype or not cuda_out.is_floating_point()
    torch.testing.assert_close(cuda_out.cpu().double(), ref_out.double(), equal_nan=True, **opts)
    torch.testing.assert_close(cuda_out.cpu().double(), cpu_out.double(), equal_nan=True, **opts)
    for gc, gp, gr in zip(cuda_grads, cpu_grads, ref_grads):
        assert gc.dtype == dtype and gc.shape == gr.shape
        torch.testing.assert_close(gc.cpu().double(), gr.double(), equal_nan=True, **opts)
        torch.testing.assert_close(gc.cpu().double(), gp.double(), equal_nan=True, **opts)
    return cuda_out, cuda_grads


def randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def randint(high, n, seed=0):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


# ---- softmax_entropy ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("shape", [(37, 10), (9, 128), (5, 1000), (3, 4, 7), (2, 5000)],
                         ids=["warp-rows", "warp-128", "block-rows", "3d", "block-1024"])
def test_softmax_entropy_paths(shape, eps, dtype):
    check_paths(lambda x: fcl_ext.ops.softmax_entropy(x, reduction="none", eps=eps),
                lambda x: ref.softmax_entropy(x, reduction="none", eps=eps), [randn(*shape, scale=3)], [0], dtype)


@pytest.mark.parametrize("shape", [(37, 10), (5, 1000)])
def test_softmax_entropy_non_contiguous(shape):
    check_paths(lambda x: fcl_ext.ops.softmax_entropy(x, reduction="none"),
                lambda x: ref.softmax_entropy(x, reduction="none"), [randn(*shape, scale=3)], [0], torch.float32,
                non_contiguous=True)


def test_softmax_entropy_zero_rows():
    x = torch.zeros(0, 10, device="cuda", requires_grad=True)
    with no_host_sync():
        h = fcl_ext.ops.softmax_entropy(x, reduction="none")
        (g,) = torch.autograd.grad(h.sum(), [x])
    assert h.shape == (0,) and g.shape == (0, 10)


@pytest.mark.parametrize("cols", [10, 1000])
def test_softmax_entropy_nan_row_is_nan(cols):
    x = randn(4, cols).float().cuda()
    x[2, 3] = float("nan")
    x.requires_grad_()
    h = fcl_ext.ops.softmax_entropy(x, reduction="none")
    (g,) = torch.autograd.grad(h.sum(), [x])
    assert torch.isnan(h[2]) and torch.isfinite(h[[0, 1, 3]]).all()
    assert torch.isnan(g[2]).all() and torch.isfinite(g[[0, 1, 3]]).all()


# ---- glfc_loss ---------------------------------------------------------------------------------

def _glfc_inputs(n, c, seed=0):
    mask = torch.zeros(c, dtype=torch.bool)
    mask[: c // 2] = True
    return [randn(n, c, scale=3, seed=seed), randint(c, n, seed=seed + 1), mask, randn(n, c // 2, scale=3, seed=seed + 2)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n,c", [(37, 10), (9, 128), (7, 300)], ids=["warp-rows", "warp-128", "block-rows"])
def test_glfc_loss_paths(n, c, dtype):
    def fused(x, y, m, q):
        return fcl_ext.ops.relation_distillation_bce(x, y, q, reduction="none") + \
            fcl_ext.ops.gradient_compensated_bce(x, y, m, reduction="none")

    def reference(x, y, m, q):
        return ref.relation_distillation_bce(x, y, q, reduction="none") + \
            ref.gradient_compensated_bce(x, y, m, reduction="none")

    check_paths(fused, reference, _glfc_inputs(n, c), [0], dtype)
    check_paths(lambda x, y, m, q: fcl_ext.ops.glfc_loss(x, y, m, q), lambda x, y, m, q: ref.glfc_loss(x, y, m, q),
                _glfc_inputs(n, c, seed=5), [0], dtype)


@pytest.mark.parametrize("n,c", [(37, 10), (7, 300)])
def test_glfc_loss_non_contiguous(n, c):
    check_paths(lambda x, y, m, q: fcl_ext.ops.glfc_loss(x, y, m, q), lambda x, y, m, q: ref.glfc_loss(x, y, m, q),
                _glfc_inputs(n, c), [0], torch.float32, non_contiguous=True)


def test_glfc_loss_zero_rows():
    x = torch.zeros(0, 10, device="cuda", requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64, device="cuda")
    with no_host_sync():
        per_sample = fcl_ext.ops.gradient_compensated_bce(x, y, None, reduction="none")
        (g,) = torch.autograd.grad(per_sample.sum(), [x])
    assert per_sample.shape == (0,) and g.shape == (0, 10)


@pytest.mark.parametrize("c", [10, 300])
@pytest.mark.parametrize("bad", [-1, "C"])
def test_glfc_loss_bad_label_is_a_device_error_not_an_assert(c, bad):
    x, y, mask, q = _to(_glfc_inputs(6, c), "cuda", torch.float32)
    y[3] = c if bad == "C" else bad
    x.requires_grad_()
    with no_host_sync():  # no host sync for the check either
        per_sample = fcl_ext.ops.gradient_compensated_bce(x, y, mask, reduction="none")
        (g,) = torch.autograd.grad(per_sample.sum(), [x])
    assert torch.isnan(per_sample[3]) and torch.isfinite(per_sample[[0, 1, 2, 4, 5]]).all()
    assert torch.isnan(g[3]).all() and torch.isfinite(g[[0, 1, 2, 4, 5]]).all()
    with pytest.raises(DeviceInputError, match=rf"glfc_loss .*labels\[3\] = {y[3].item()} is outside the valid class "
                                               rf"range \[0, {c}\)"):
        fcl_ext.check_device_errors()
    fcl_ext.check_device_errors()  # cleared by the first check
    # The context is not poisoned: the same op still runs and matches the reference.
    y[3] = 0
    torch.testing.assert_close(fcl_ext.ops.glfc_loss(x, y, mask, q), ref.glfc_loss(x, y, mask, q), **tol(torch.float32))


def _glfc_nonfinite_inputs(c, nan_logit):
    """One row per non-finite case of issue 17 (the twin's semantics, tests/test_properties_glfc.py)."""
    x, q = randn(8, c, scale=2, seed=3), randn(8, 2, seed=4)
    y = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0])
    mask = torch.zeros(c, dtype=torch.bool)
    mask[0] = True  # rows 6, 7 form the old group
    inf = float("inf")
    x[0, 0] = inf                    # off the label: +inf
    x[1, 0] = -inf                   # off the label: NaN
    x[2, 1] = inf                    # at the label: NaN
    x[3, 1] = -inf                   # at the label: NaN
    x[4, 0], q[4, 0] = inf, 20.0     # against a teacher: +inf (1 - sigmoid(20) > 0 in float64)
    x[5, 0], q[5, 0] = inf, 40.0     # against a teacher: NaN (sigmoid(40) rounds to 1 in float64)
    x[6, 0], x[6, 1] = 200.0, inf    # G = 0 in float32 but not in float64: w * inf stays +inf
    q[7, 1] = float("nan")           # a NaN teacher logit: RD NaN, that entry's gradient NaN
    if nan_logit:
        x[1, 3] = float("nan")
    return [x, y, mask, q]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nan_logit", [False, True], ids=["inf", "inf-and-nan"])
@pytest.mark.parametrize("c", [10, 300], ids=["warp-rows", "block-rows"])
def test_glfc_loss_nonfinite_logits_like_twin(c, nan_logit, dtype):
    inputs = _glfc_nonfinite_inputs(c, nan_logit)
    for name, args in (("gradient_compensated_bce", lambda m, q: (m,)), ("relation_distillation_bce",
                                                                         lambda m, q: (q,))):
        out, _ = check_paths(lambda x, y, m, q: getattr(fcl_ext.ops, name)(x, y, *args(m, q), reduction="none"),
                             lambda x, y, m, q: getattr(ref, name)(x, y, *args(m, q), reduction="none"),
                             inputs, [0], dtype)
        assert not torch.isfinite(out[:8 if name == "relation_distillation_bce" else 7]).any(), name
    check_paths(lambda x, y, m, q: fcl_ext.ops.glfc_loss(x, y, m, q), lambda x, y, m, q: ref.glfc_loss(x, y, m, q),
                inputs, [0], dtype)


# ---- dual_distillation ---------------------------------------------------------------------------

def _dual_inputs(n, c, seed=0):
    return [randn(n, c, scale=3, seed=seed), randint(c, n, seed=seed + 1), randn(n, c, scale=3, seed=seed + 2),
            randn(n, c, scale=3, seed=seed + 3)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("teachers", ["both", "intra", "none"])
@pytest.mark.parametrize("n,c", [(37, 10), (9, 128), (5, 1000)], ids=["warp-rows", "warp-128", "block-rows"])
def test_dual_distillation_paths(n, c, teachers, dtype):
    def pick(t1, t2):
        return {"both": (t1, t2), "intra": (t1, None), "none": (None, None)}[teachers]

    kw = dict(temperature=2.0, ce_weight=0.7, intra_weight=0.5, inter_weight=1.5)
    check_paths(lambda s, y, t1, t2: fcl_ext.ops.dual_distillation_loss(s, y, *pick(t1, t2), **kw),
                lambda s, y, t1, t2: ref.dual_distillation_loss(s, y, *pick(t1, t2), **kw), _dual_inputs(n, c), [0],
                dtype)


@pytest.mark.parametrize("n,c", [(37, 10), (5, 1000)])
def test_dual_distillation_non_contiguous(n, c):
    check_paths(lambda s, y, t1, t2: fcl_ext.ops.dual_distillation_loss(s, y, t1, t2),
                lambda s, y, t1, t2: ref.dual_distillation_loss(s, y, t1, t2), _dual_inputs(n, c), [0], torch.float32,
                non_contiguous=True)


def test_dual_distillation_zero_size_is_a_clear_error():
    s = torch.zeros(0, 10, device="cuda")
    with pytest.raises(ValueError, match="logits must be a non-empty"):
        fcl_ext.ops.dual_distillation_loss(s, torch.zeros(0, dtype=torch.int64, device="cuda"))


@pytest.mark.parametrize("c", [10, 1000])
def test_dual_distillation_bad_label_is_a_device_error_not_an_assert(c):
    s, y, t1, t2 = _to(_dual_inputs(5, c), "cuda", torch.float32)
    y[1] = c + 7
    s.requires_grad_()
    with no_host_sync():
        loss = fcl_ext.ops.dual_distillation_loss(s, y, t1, t2)
        (g,) = torch.autograd.grad(loss, [s])
    assert torch.isnan(loss)
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2, 3, 4]]).all()
    with pytest.raises(DeviceInputError, match=rf"dual_distillation_loss .*labels\[1\] = {c + 7} is outside"):
        fcl_ext.check_device_errors()
    y[1] = 0
    torch.testing.assert_close(fcl_ext.ops.dual_distillation_loss(s, y, t1, t2),
                               ref.dual_distillation_loss(s, y, t1, t2), **tol(torch.float32))


@pytest.mark.parametrize("c", [10, 1000])
def test_dual_distillation_nan_in_is_nan_out(c):
    s, y, t1, t2 = _to(_dual_inputs(4, c), "cuda", torch.float32)
    s[2, 0] = float("nan")
    assert torch.isnan(fcl_ext.ops.dual_distillation_loss(s, y, t1, t2))


# ---- cross_correlation ---------------------------------------------------------------------------

FORMS = {
    "fccl": dict(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0),
    "barlow": dict(off_diag_weight=0.0051, off_diag_target=0.0, unbiased=False, eps=1e-5),
}
# (B, K): the one-block fused path; the multi-block path at small K with a large batch (split-B
# statistics), at K = 200, and with B * K^2 > 2^22 (cuBLAS GEMMs, split-B backward column kernels).
CC_SHAPES = {"fused": (6, 3), "fused-64": (64, 12), "split-B small K": (8192, 8), "K=200": (16, 200),
             "B*K^2>2^22": (128, 200)}


def _pair(b, k, seed=0):
    a = randn(b, k, seed=seed)
    return [a, a + randn(b, k, seed=seed + 1)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("path", list(CC_SHAPES))
def test_cross_correlation_loss_paths(path, form, dtype):
    b, k = CC_SHAPES[path]
    if dtype in (torch.float16, torch.bfloat16) and path == "B*K^2>2^22":
        pytest.skip("covered in float32/float64; half-precision inputs take the same float32 kernels")
    kw = FORMS[form]
    grad_idx = [0, 1] if form == "barlow" else [0]  # FCCL detaches its target b
    check_paths(lambda a, bb: fcl_ext.ops.cross_correlation_loss(a, bb, **kw),
                lambda a, bb: ref.cross_correlation_loss(a, bb, **kw), _pair(b, k), grad_idx, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ka,kb,b", [(3, 5, 6), (5, 300, 16), (200, 7, 40), (8, 8, 8192)],
                         ids=["fused", "cublas-wide-b", "cublas-wide-a", "split-B"])
def test_cross_correlation_matrix_paths(ka, kb, b, dtype):
    a, bb = randn(b, ka), randn(b, kb, seed=3)
    check_paths(lambda x, y: fcl_ext.ops.cross_correlation_matrix(x, y, eps=1e-5),
                lambda x, y: ref.cross_correlation_matrix(x, y, eps=1e-5), [a, bb], [0, 1], dtype)


@pytest.mark.parametrize("path", ["fused", "K=200"])
def test_cross_correlation_non_contiguous(path):
    b, k = CC_SHAPES[path]
    kw = FORMS["barlow"]
    check_paths(lambda a, bb: fcl_ext.ops.cross_correlation_loss(a, bb, **kw),
                lambda a, bb: ref.cross_correlation_loss(a, bb, **kw), _pair(b, k), [0, 1], torch.float32,
                non_contiguous=True)


@pytest.mark.parametrize("ka,kb", [(0, 0), (0, 3), (0, 200), (200, 0)], ids=["fused-0x0", "fused-0x3", "cublas-0x200",
                                                                          "cublas-200x0"])
def test_cross_correlation_zero_columns(ka, kb):
    a = randn(6, ka).float().cuda().requires_grad_()
    b = randn(6, kb, seed=1).float().cuda().requires_grad_()
    with no_host_sync():
        m = fcl_ext.ops.cross_correlation_matrix(a, b, eps=1e-5)
        ga, gb = torch.autograd.grad(m.sum(), [a, b], allow_unused=True)
    assert m.shape == (ka, kb)
    assert ga is None or ga.shape == a.shape and (ga == 0).all()
    assert gb is None or gb.shape == b.shape and (gb == 0).all()
    if ka == kb:
        a0 = torch.zeros(6, 0, device="cuda", requires_grad=True)
        with no_host_sync():
            loss = fcl_ext.ops.cross_correlation_loss(a0, a0.detach() + 1, eps=1e-5)
            (g,) = torch.autograd.grad(loss, [a0])  # the fused backward with Ka + Kb = 0: no launch
        assert loss.item() == 0 and g.shape == (6, 0)


@pytest.mark.parametrize("b,k", [(6, 4), (16, 200)], ids=["fused", "cublas"])
def test_cross_correlation_constant_column_is_a_device_error(b, k):
    a = randn(b, k).float().cuda()
    a[:, 2] = 1.5
    with no_host_sync():  # eps = 0: no .item() on the hot path any more
        loss = fcl_ext.ops.cross_correlation_loss(a, a + 1.0, eps=0.0)
    assert torch.isnan(loss)
    with pytest.raises(DeviceInputError, match=r"column 2 of a is constant over the batch.*eps > 0"):
        fcl_ext.check_device_errors()
    # eps > 0 makes the constant column legal
    torch.testing.assert_close(fcl_ext.ops.cross_correlation_loss(a, a + 1.0, eps=1e-5),
                               ref.cross_correlation_loss(a.double(), a.double() + 1.0, eps=1e-5).float(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["fused", "split-B", "cublas"])
def test_cross_correlation_rounded_constant_column_is_constant(path):
    # 3.3 summed B times rounds; the scaled two-pass used to take that rounding for a variance (CPU and CUDA alike)
    b, k = {"fused": (7, 3), "split-B": (8192, 8), "cublas": (16, 200)}[path]
    a, bb = randn(b, k).float(), randn(b, k, seed=1).float()
    a[:, 2] = 3.3
    a, bb = a.cuda(), bb.cuda()
    with no_host_sync():
        m = fcl_ext.ops.cross_correlation_matrix(a, bb, eps=0.0)
    assert torch.isnan(m[2]).all()
    with pytest.raises(DeviceInputError, match=r"column 2 of a is constant over the batch"):
        fcl_ext.check_device_errors()
    _, stats_cuda, _ = torch.ops.fcl_ext.cross_correlation_matrix(a, bb, True, 1e-5)
    _, stats_cpu, _ = torch.ops.fcl_ext.cross_correlation_matrix(a.cpu(), bb.cpu(), True, 1e-5)
    assert stats_cuda[0, 2].item() == a[0, 2].item()
    torch.testing.assert_close(stats_cuda.cpu(), stats_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["fused", "split-B", "cublas"])
def test_cross_correlation_subnormal_column_like_cpu(path):
    b, k = {"fused": (16, 3), "split-B": (8192, 8), "cublas": (16, 200)}[path]
    a, bb = randn(b, k).float(), randn(b, k, seed=1).float()
    a[:, 0] = (randn(b, 1, seed=2) * 1e-40).float()[:, 0]
    a, bb = a.cuda(), bb.cuda()
    with no_host_sync():
        fcl_ext.ops.cross_correlation_matrix(a, bb, eps=0.0)
    with pytest.raises(DeviceInputError, match=r"column 0 of a varies, but its standard deviation is so small"):
        fcl_ext.check_device_errors()
    results = _on_devices(lambda x, y: fcl_ext.ops.cross_correlation_matrix(x, y, eps=1e-5), [a.cpu(), bb.cpu()], [0])
    fcl_ext.check_device_errors("cuda")
    assert torch.isfinite(results["cuda"][0]).all()
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["cuda"][1][0], results["cpu"][1][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "split-B", "cublas"])
def test_cross_correlation_column_whose_deviation_overflows_like_cpu(path):
    # x - mean beyond float's range (values near -3e38, one near +3.3e38): standardised from halves on every path
    b, k = {"fused": (16, 3), "split-B": (8192, 8), "cublas": (16, 200)}[path]
    a, bb = randn(b, k).float(), randn(b, k, seed=1).float()
    a[:, 0] = -3.0e38
    a[3, 0] = 3.3e38
    a[5, 0] = -2.9e38
    results = _on_devices(lambda x, y: fcl_ext.ops.cross_correlation_loss(x, y, eps=1e-5), [a, bb], [0])
    fcl_ext.check_device_errors("cuda")
    assert torch.isfinite(results["cuda"][0]).all() and torch.isfinite(results["cuda"][1][0]).all()
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["cuda"][1][0], results["cpu"][1][0], rtol=1e-4,
                               atol=1e-4 * float(results["cpu"][1][0].abs().max()))


def _on_devices(fn, inputs, grad_idx):
    """fn and its gradients (of the sum) on CUDA (under sync-debug "error") and on the CPU, as float64 on the CPU."""
    results = {}
    for device in ("cuda", "cpu"):
        xs = [x.detach().to(device).requires_grad_(i in grad_idx) for i, x in enumerate(inputs)]
        with no_host_sync() if device == "cuda" else contextlib.nullcontext():
            out = fn(*xs)
            grads = torch.autograd.grad(out.sum(), [xs[i] for i in grad_idx]) if grad_idx else []
        results[device] = (out.detach().cpu().double(), [g.cpu().double() for g in grads])
    return results


# The CPU's extreme-value tests (tests/test_kernel_strength.py) on every column-statistics path.
CC_EXTREME_SHAPES = {"fused": (16, 3), "split-B": (8192, 8), "cublas": (16, 200)}


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("path", list(CC_EXTREME_SHAPES))
def test_cross_correlation_huge_columns_like_cpu_and_twin(path, eps):
    # float32 columns near +-3e38: their squared deviations overflow float32, the scaled two-pass does not
    b, k = CC_EXTREME_SHAPES[path]
    a64 = randn(b, k, seed=11)
    a64 = a64 / a64.abs().max() * 3e38
    a, bb = a64.float(), randn(b, k, seed=12).float()
    results = _on_devices(lambda x, y: fcl_ext.ops.cross_correlation_matrix(x, y, eps=eps), [a, bb], [1])
    fcl_ext.check_device_errors("cuda")  # no column is constant or NaN
    a_ref, b_ref = a.double(), bb.double().requires_grad_()
    m_ref = ref.cross_correlation_matrix(a_ref, b_ref, eps=eps)
    gb_ref, = torch.autograd.grad(m_ref.sum(), [b_ref])
    for device, (m, (gb,)) in results.items():
        assert torch.isfinite(m).all(), device
        torch.testing.assert_close(m, m_ref.detach(), rtol=1e-4, atol=1e-5, msg=lambda msg: f"{device}: {msg}")
        torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-5, msg=lambda msg: f"{device}: {msg}")
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("path", list(CC_EXTREME_SHAPES))
def test_cross_correlation_nan_column_is_a_nan_device_error_not_constant(path, bad):
    b, k = CC_EXTREME_SHAPES[path]
    a, bb = randn(b, k).float(), randn(b, k, seed=1).float()
    a[2, 1] = float(bad)
    with pytest.raises(RuntimeError, match="NaN in column 1 of a"):  # the CPU raises at once
        fcl_ext.ops.cross_correlation_matrix(a, bb)
    a, bb = a.cuda(), bb.cuda()
    with no_host_sync():
        m = fcl_ext.ops.cross_correlation_matrix(a, bb)
    assert torch.isnan(m[1]).all() and torch.isfinite(m[[0] + list(range(2, k))]).all()
    with pytest.raises(DeviceInputError, match=r"NaN in column 1 of a \(a NaN or infinite entry"):
        fcl_ext.check_device_errors()
    # eps > 0: no error, NaN in -> NaN out (that row of M), like the CPU
    results = _on_devices(lambda x, y: fcl_ext.ops.cross_correlation_matrix(x, y, eps=1e-5), [a.cpu(), bb.cpu()], [])
    fcl_ext.check_device_errors("cuda")
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(results["cuda"][0][1]).all()


# ---- gradient_matching_loss ----------------------------------------------------------------------

GM_SHAPES = {"split-P": (3, 100_000), "block-rows": (300, 50), "one-row": (1, 5000)}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("path", list(GM_SHAPES))
def test_gradient_matching_paths(path, metric, dtype):
    k, p = GM_SHAPES[path]
    check_paths(lambda g, t: fcl_ext.ops.gradient_matching_loss(g, t, metric=metric),
                lambda g, t: ref.gradient_matching_loss(g, t, metric=metric), [randn(k, p), randn(k, p, seed=1)],
                [0], dtype)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradient_matching_more_rows_than_grid_y(metric):
    k = 70_000  # > 65535: the forward launches in chunks, the backward loops over grid.y
    check_paths(lambda g, t: fcl_ext.ops.gradient_matching_loss(g, t, metric=metric),
                lambda g, t: ref.gradient_matching_loss(g, t, metric=metric), [randn(k, 3), randn(k, 3, seed=1)],
                [0], torch.float32)


@pytest.mark.parametrize("path", ["split-P", "block-rows"])
def test_gradient_matching_non_contiguous(path):
    k, p = GM_SHAPES[path]
    check_paths(lambda g, t: fcl_ext.ops.gradient_matching_loss(g, t, metric="cosine"),
                lambda g, t: ref.gradient_matching_loss(g, t, metric="cosine"), [randn(k, p), randn(k, p, seed=1)],
                [0], torch.float32, non_contiguous=True)


@pytest.mark.parametrize("k,p", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradient_matching_zero_size(k, p, metric):
    g = torch.zeros(k, p, device="cuda", requires_grad=True)
    t = torch.zeros(k, p, device="cuda")
    with no_host_sync():
        loss = fcl_ext.ops.gradient_matching_loss(g, t, metric=metric)
        (grad,) = torch.autograd.grad(loss.sum(), [g])
    assert loss.shape == (k,) and grad.shape == (k, p)
    torch.testing.assert_close(loss.cpu(), ref.gradient_matching_loss(g.detach().cpu(), t.cpu(), metric=metric))


def test_gradient_matching_nan_row_is_nan():
    g, t = randn(4, 50_000).float().cuda(), randn(4, 50_000, seed=1).float().cuda()
    g[1, 7] = float("nan")
    loss = fcl_ext.ops.gradient_matching_loss(g, t, metric="cosine")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e-25, 1e-19, 1e19, 1e25])
@pytest.mark.parametrize("path", list(GM_SHAPES))
def test_cosine_gradient_matching_at_extreme_scales_like_cpu_and_twin(path, scale, dtype):
    # cosine is scale-invariant: at scale s the value is the value at scale 1 and the gradient scales as 1/s.
    # Squaring unscaled entries under/overflows float32 near 1e+-19: the rows are summed again, scaled, in the
    # forward (one-block and split-P finish) and in the backward.
    k, p = GM_SHAPES[path]
    g1 = randn(k, p)
    t1 = g1 + 0.5 * randn(k, p, seed=8)
    g, t = (g1 * scale).to(dtype), (t1 * scale).to(dtype)
    results = _on_devices(lambda x, y: fcl_ext.ops.gradient_matching_loss(x, y, metric="cosine"), [g, t], [0])
    g64 = (g.double() / scale).requires_grad_()
    exact = ref.gradient_matching_loss(g64, t.double() / scale, metric="cosine")
    gr64, = torch.autograd.grad(exact.sum(), [g64])
    for device, (loss, (gr,)) in results.items():
        torch.testing.assert_close(loss, exact.detach(), **tol(dtype), msg=lambda msg: f"{device}: {msg}")
        torch.testing.assert_close(gr * scale, gr64, rtol=tol(dtype)["rtol"], atol=tol(dtype)["rtol"] * float(
            gr64.abs().max()), msg=lambda msg: f"{device} grad: {msg}")


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-40), (torch.float64, 1e-310)])
@pytest.mark.parametrize("path", list(GM_SHAPES))
def test_cosine_gradient_matching_subnormal_rows_like_cpu(path, dtype, tiny):
    # a row whose largest entry is subnormal: its rescale 2^-e is applied as two factors (2^149 alone is inf)
    k, p = GM_SHAPES[path]
    g1 = randn(k, p)
    g = (g1 / g1.abs().amax(dim=1, keepdim=True) * tiny).to(dtype)
    t = (g1 + 0.5 * randn(k, p, seed=8)).to(dtype)
    go = torch.full((k,), 1e-12 if dtype == torch.float32 else 1e-300, dtype=dtype)  # keeps ~1/|g| in range
    out = {}
    for device in ("cuda", "cpu"):
        x = g.to(device).requires_grad_()
        with no_host_sync() if device == "cuda" else contextlib.nullcontext():
            loss = fcl_ext.ops.gradient_matching_loss(x, t.to(device), metric="cosine")
            gr, = torch.autograd.grad(loss, [x], go.to(device))
        out[device] = (loss.detach().cpu().double(), gr.cpu().double())
    cpu_loss, cpu_grad = out["cpu"]
    assert torch.isfinite(cpu_loss).all() and torch.isfinite(cpu_grad).all()  # tests/test_gradient_matching.py: = twin
    torch.testing.assert_close(out["cuda"][0], cpu_loss, **tol(dtype))
    torch.testing.assert_close(out["cuda"][1], cpu_grad, rtol=tol(dtype)["rtol"],
                               atol=tol(dtype)["rtol"] * float(cpu_grad.abs().max()))


# ---- lbfgs_direction -----------------------------------------------------------------------------

def _history(k, m, d, dtype, seed=0):
    s = randn(k, m, d, seed=seed)
    y = s + 0.3 * randn(k, m, d, seed=seed + 1)
    rho = 1.0 / (y * s).sum(2) if m else torch.zeros(k, 0, dtype=torch.float64)
    return [randn(k, d, seed=seed + 2), s, y, rho]


def _lbfgs_compare(grad, s, y, rho, hist_len, h, start, dtype):
    cpu = [x.to(dtype) for x in (grad, s, y, rho, h)]
    cuda = [x.cuda() for x in cpu]
    with no_host_sync():
        d_cuda = fcl_ext.ops.lbfgs_direction(cuda[0], cuda[1], cuda[2], cuda[3], hist_len.cuda(), cuda[4],
                                             hist_start=None if start is None else start.cuda())
    d_cpu = fcl_ext.ops.lbfgs_direction(cpu[0], cpu[1], cpu[2], cpu[3], hist_len, cpu[4], hist_start=start)
    d_ref = ref.lbfgs_direction(*(x.double() for x in cpu[:4]), hist_len, cpu[4].double(), hist_start=start)
    torch.testing.assert_close(d_cuda.cpu().double(), d_ref, **tol(dtype))
    torch.testing.assert_close(d_cuda.cpu(), d_cpu, **tol(dtype))
    return d_cuda


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,m,d", [(3, 4, 1000), (2, 7, 5000), (5, 1, 33)])
def test_lbfgs_direction_ring_buffers(k, m, d, dtype):
    grad, s, y, rho = _history(k, m, d, dtype)
    hist_len = torch.tensor([m, max(m - 1, 0), 0, m, 1][:k], dtype=torch.int64).clamp(max=m)
    start = torch.tensor([0, m - 1, 0, m // 2, m - 1][:k], dtype=torch.int64)
    h = torch.rand(k, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    _lbfgs_compare(grad, s, y, rho, hist_len, h, start, dtype)
    _lbfgs_compare(grad, s, y, rho, hist_len, h, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [3072, 4096, 4097, 700], ids=["registers-3072", "registers-4096", "streaming-4097",
                                                        "registers-partial"])
def test_lbfgs_direction_register_and_streaming_paths(d, dtype):
    # D <= 4 x threads keeps q in registers with the next history pair prefetched before each reduction
    # (3072: the reconstruction's 3x32x32, 3 coordinates per thread; 4096: all 4; 700: threads own 2 or 3);
    # 4097 streams q through global memory. Full and wrapped ring buffers, M = 100 as in reconstruction.
    k, m = 3, 100
    grad, s, y, rho = _history(k, m, d, dtype, seed=9)
    hist_len = torch.tensor([m, m, 37], dtype=torch.int64)
    start = torch.tensor([0, 63, 99], dtype=torch.int64)
    h = torch.tensor([1.0, 0.25, 3.0], dtype=torch.float64)
    _lbfgs_compare(grad, s, y, rho, hist_len, h, start, dtype)


def test_lbfgs_direction_empty_history_m0():
    grad, s, y, rho = _history(3, 0, 20, torch.float32)
    d = _lbfgs_compare(grad, s, y, rho, torch.zeros(3, dtype=torch.int64), torch.full((3,), 2.0, dtype=torch.float64),
                       None, torch.float32)
    torch.testing.assert_close(d.cpu(), -2.0 * grad.float())


def test_lbfgs_direction_zero_size():
    for k, d in ((0, 5), (3, 0)):
        grad, s, y, rho = _history(k, 2, d, torch.float32)
        out = _lbfgs_compare(grad, s, y, rho, torch.full((k,), 2, dtype=torch.int64), torch.ones(k, dtype=torch.float64),
                             None, torch.float32)
        assert out.shape == (k, d)


def test_lbfgs_direction_non_contiguous_grad():
    grad, s, y, rho = (x.float().cuda() for x in _history(3, 4, 100, torch.float32))
    wide = torch.cat([grad, grad], 1)[:, :100]
    assert not wide.is_contiguous()
    hist_len, h = torch.full((3,), 4, dtype=torch.int64, device="cuda"), torch.ones(3, device="cuda")
    torch.testing.assert_close(fcl_ext.ops.lbfgs_direction(wide, s, y, rho, hist_len, h),
                               fcl_ext.ops.lbfgs_direction(grad, s, y, rho, hist_len, h))


@pytest.mark.parametrize("field,value,m", [("hist_len", 5, 4), ("hist_len", -1, 4), ("hist_start", 4, 4),
                                           ("hist_start", -2, 4), ("hist_len", 1, 0)])
def test_lbfgs_direction_bad_history_is_a_device_error(field, value, m):
    grad, s, y, rho = (x.float().cuda() for x in _history(3, m, 64, torch.float32))
    hist_len = torch.full((3,), m, dtype=torch.int64, device="cuda")
    start = torch.zeros(3, dtype=torch.int64, device="cuda")
    (hist_len if field == "hist_len" else start)[1] = value
    with no_host_sync():
        d = fcl_ext.ops.lbfgs_direction(grad, s, y, rho, hist_len, torch.ones(3, device="cuda"),
                                        hist_start=start if m else None)
    assert torch.isnan(d[1]).all() and torch.isfinite(d[[0, 2]]).all()
    with pytest.raises(DeviceInputError, match=rf"lbfgs_direction .*{field}\[1\] = {value} is outside"):
        fcl_ext.check_device_errors()


# ---- the device-error buffer itself ---------------------------------------------------------------

def test_check_device_errors_counts_and_keeps_the_first():
    s, y, t1, t2 = _to(_dual_inputs(6, 10), "cuda", torch.float32)
    y[4], y[5] = 11, 12
    fcl_ext.ops.dual_distillation_loss(s, y, t1, t2)
    records = fcl_ext.device_errors.take_device_errors("cuda")
    assert len(records) == 1 and records[0]["count"] == 2 and records[0]["index"] in (4, 5)
    assert fcl_ext.device_errors.take_device_errors("cuda") == []
