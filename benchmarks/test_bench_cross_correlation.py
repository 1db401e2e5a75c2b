"""cross_correlation_loss (FCCL and Barlow Twins forms): fcl_ext vs eager reference vs
torch.compile(reference), fwd and fwd+bwd. FCCL trains a only (the target b is detached);
Barlow Twins trains both views."""
import pytest
import torch

import fcl_ext
from benchmarks.conftest import IMPLS, MODES, bench_devices, forward_or_backward, implementation, run_case
from benchmarks.shapes import SHAPES, shapes_for

OP = "cross_correlation"
FORMS = {
    "fccl": dict(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0),
    "barlow": dict(off_diag_weight=0.0051, off_diag_target=0.0, unbiased=False, eps=1e-5),
}


def _fused(a, b, form):
    return fcl_ext.ops.cross_correlation_loss(a, b, **FORMS[form])


def _reference(a, b, form):
    return fcl_ext.reference.cross_correlation_loss(a, b, **FORMS[form])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(max(len(v) for v in SHAPES[OP].values())))
def test_cross_correlation(benchmark, smoke, device, dtype, mode, impl, shape_idx):
    shapes = shapes_for(OP, device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device")
    label, dims = shapes[shape_idx]
    B, K, form = dims["B"], dims["K"], dims["form"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, K, generator=g).to(device=device, dtype=dtype)
    b = (a + torch.randn(B, K, generator=g).to(device=device, dtype=dtype)).detach()
    train_b = form == "barlow" and mode != "fwd"
    a.requires_grad_(mode != "fwd")
    b.requires_grad_(train_b)
    fn = implementation(impl, _fused, _reference)
    inputs = [a, b] if train_b else [a]
    call = forward_or_backward(mode, lambda: fn(a, b, form), inputs)
    elem = a.element_size() * a.numel()
    # fwd reads a and b; the backward reads them again and writes one or two gradients
    bytes_moved = 2 * elem if mode == "fwd" else (4 + len(inputs)) * elem
    run_case(benchmark, op=OP, mode=mode, device=device, dtype=dtype, shape=label, impl=impl,
             make_call=call, bytes_moved=bytes_moved, smoke=smoke, main_shape=shape_idx == 0,
             reference=forward_or_backward(mode, lambda: _reference(a, b, form), inputs))
