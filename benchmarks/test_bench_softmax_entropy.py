"""softmax_entropy: fcl_ext vs eager reference vs torch.compile(reference), fwd and fwd+bwd."""
import pytest
import torch

import fcl_ext
from benchmarks.conftest import IMPLS, MODES, bench_devices, forward_or_backward, implementation, run_case
from benchmarks.shapes import SHAPES, shapes_for

OP = "softmax_entropy"


# eps = 1e-5 is the GLFC task-transition form; eps = 0 the plain entropy (entropy minimisation).
def _fused(x):
    return fcl_ext.ops.softmax_entropy(x, eps=1e-5)


def _reference(x):
    return fcl_ext.reference.softmax_entropy(x, eps=1e-5)


def _fused_plain(x):
    return fcl_ext.ops.softmax_entropy(x)


def _reference_plain(x):
    return fcl_ext.reference.softmax_entropy(x)


FORMS = {"eps=1e-5": (_fused, _reference), "eps=0": (_fused_plain, _reference_plain)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("device", bench_devices())
@pytest.mark.parametrize("shape_idx", range(max(len(v) for v in SHAPES[OP].values())))
def test_softmax_entropy(benchmark, smoke, device, dtype, mode, impl, shape_idx, form):
    shapes = shapes_for(OP, device, smoke)
    if shape_idx >= len(shapes):
        pytest.skip("no such shape for this device")
    label, dims = shapes[shape_idx]
    x = torch.randn(dims["B"], dims["C"], device=device, dtype=dtype) * 3
    x.requires_grad_(mode != "fwd")
    fn = implementation(impl, *FORMS[form])
    call = forward_or_backward(mode, lambda: fn(x), [x])
    elem = x.element_size() * x.numel()
    bytes_moved = elem if mode == "fwd" else 3 * elem  # read x (fwd), + read x, write grad (bwd)
    run_case(benchmark, op=f"{OP} ({form})", mode=mode, device=device, dtype=dtype, shape=label, impl=impl,
             make_call=call, bytes_moved=bytes_moved, smoke=smoke, main_shape=shape_idx == 0,
             reference=forward_or_backward(mode, lambda: FORMS[form][1](x), [x]))
