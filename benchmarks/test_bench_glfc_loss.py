"""glfc_loss: fcl_ext vs eager reference vs torch.compile(reference), fwd and fwd+bwd.

The full GLFC objective as a client computes it with an old model: old logits for the first
C/2 classes and half the classes marked old (exemplars held)."""
import pytest
import torch

import fcl_ext
from benchmarks.conftest import IMPLS, MODES, bench_devices, forward_or_backward, implementation, run_case
from benchmarks.shapes import SHAPES, shapes_for

OP = "glfc_loss"


def _fused(x, y, mask, q):
    return fcl_ext.ops.glfc_loss(x, y, mask, q)


def _reference(x, y, mask, q):
    return fcl_ext.reference.glfc_loss(x, y, mask, q)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(max(len(v) for v in SHAPES[OP].values())))
def test_glfc_loss(benchmark, smoke, device, dtype, mode, impl, shape_idx):
    shapes = shapes_for(OP, device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device")
    label, dims = shapes[shape_idx]
    n, c = dims["N"], dims["C"]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 3).to(device=device, dtype=dtype)
    x.requires_grad_(mode != "fwd")
    y = torch.randint(0, c, (n,), generator=g).to(device)
    mask = torch.zeros(c, dtype=torch.bool)
    mask[: c // 2] = True
    mask = mask.to(device)
    q = (torch.randn(n, c // 2, generator=g) * 3).to(device=device, dtype=dtype)
    fn = implementation(impl, _fused, _reference)
    call = forward_or_backward(mode, lambda: fn(x, y, mask, q), [x])
    elem = x.element_size()
    # fwd reads x and q; fwd+bwd reads them twice more and writes the gradient
    bytes_moved = elem * (n * c + q.numel()) * (1 if mode == "fwd" else 2) + (0 if mode == "fwd" else elem * n * c)
    run_case(benchmark, op=OP, mode=mode, device=device, dtype=dtype, shape=label, impl=impl,
             make_call=call, bytes_moved=bytes_moved, smoke=smoke, main_shape=shape_idx == 0,
             reference=forward_or_backward(mode, lambda: _reference(x, y, mask, q), [x]))
