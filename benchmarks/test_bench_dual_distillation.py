"""dual_distillation_loss (FCCL local objective, both teachers, T = 1): fcl_ext vs eager reference vs
torch.compile(reference), fwd and fwd+bwd."""
import pytest
import torch

import fcl_ext
from benchmarks.conftest import IMPLS, MODES, bench_devices, forward_or_backward, implementation, run_case
from benchmarks.shapes import SHAPES, shapes_for

OP = "dual_distillation"


def _fused(s, y, t1, t2):
    return fcl_ext.ops.dual_distillation_loss(s, y, t1, t2)


def _reference(s, y, t1, t2):
    return fcl_ext.reference.dual_distillation_loss(s, y, t1, t2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(max(len(v) for v in SHAPES[OP].values())))
def test_dual_distillation(benchmark, smoke, device, dtype, mode, impl, shape_idx):
    shapes = shapes_for(OP, device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device")
    label, dims = shapes[shape_idx]
    N, C = dims["N"], dims["C"]
    g = torch.Generator().manual_seed(0)
    s, t1, t2 = (torch.randn(N, C, generator=g).mul(3).to(device=device, dtype=dtype) for _ in range(3))
    y = torch.randint(0, C, (N,), generator=g).to(device)
    s.requires_grad_(mode != "fwd")
    fn = implementation(impl, _fused, _reference)
    call = forward_or_backward(mode, lambda: fn(s, y, t1, t2), [s])
    elem = s.element_size() * s.numel()
    bytes_moved = 3 * elem if mode == "fwd" else 7 * elem  # fwd reads s, t1, t2; bwd reads them again, writes grad
    run_case(benchmark, op=OP, mode=mode, device=device, dtype=dtype, shape=label, impl=impl,
             make_call=call, bytes_moved=bytes_moved, smoke=smoke, main_shape=shape_idx == 0,
             reference=forward_or_backward(mode, lambda: _reference(s, y, t1, t2), [s]))
