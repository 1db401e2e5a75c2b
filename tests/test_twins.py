"""fcl_ext.reference twins have their op's signature and semantics exactly (issue 17):
same parameters, kinds and defaults, and they accept what the op accepts (old_class_mask=None,
int32 labels, teachers in another dtype cast to the student's)."""
import inspect

import pytest
import torch

from fcl_ext import ops, reference
from tests.testing import assert_close_f64, make_logits


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", ops.__all__)
def test_twin_has_the_op_signature(name):
    assert hasattr(reference, name), f"fcl_ext.reference has no twin of ops.{name}"
    assert _parameters(getattr(reference, name)) == _parameters(getattr(ops, name))


def _glfc_inputs(dtype=torch.float64, n=12, c=7, seed=0):
    x = make_logits((n, c), dtype, seed=seed, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    return x, y


def _grad(out, x):
    return torch.autograd.grad(out.sum(), x)[0]


@pytest.mark.parametrize("name", ["gradient_compensated_bce", "glfc_loss"])
def test_none_mask_means_no_old_class(name):
    x, y = _glfc_inputs()
    out, w = getattr(ops, name)(x, y, None, return_weights=True)
    ref, w_ref = getattr(reference, name)(x, y, None, return_weights=True)
    assert torch.equal(w_ref, torch.ones_like(w_ref))
    assert_close_f64(out, ref)
    assert_close_f64(w, w_ref)
    assert_close_f64(_grad(out, x), _grad(ref, x))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels(label_dtype):
    x, y = _glfc_inputs()
    y = y.to(label_dtype)
    mask = torch.tensor([True, False, True, False, False, False, True])
    q = make_logits((12, 4), seed=3)
    for name, args, kwargs in (("gradient_compensated_bce", (mask,), {"reduction": "none"}),
                               ("relation_distillation_bce", (q,), {"reduction": "none"}),
                               ("glfc_loss", (mask, q), {}),
                               ("dual_distillation_loss", (q.new_zeros(12, 7), None), {"temperature": 2.0})):
        out = getattr(ops, name)(x, y, *args, **kwargs)
        ref = getattr(reference, name)(x, y, *args, **kwargs)
        assert_close_f64(out, ref)
        assert_close_f64(_grad(out, x), _grad(ref, x))


def test_teacher_logits_are_cast_to_the_student_dtype():
    # float64 teachers for a float32 student: both round the teacher to float32 first, so the
    # results agree to float32 rounding of the same arithmetic, not merely to float32 tolerance.
    x, y = _glfc_inputs(torch.float32)
    q64 = make_logits((12, 4), seed=5) * 1.2345678901
    t64 = make_logits((12, 7), seed=6) * 1.2345678901
    cases = (("relation_distillation_bce", (q64,), {}),
             ("glfc_loss", (None, q64), {}),
             ("dual_distillation_loss", (t64, t64.flip(0)), {"temperature": 3.0}))
    for name, args, kwargs in cases:
        out = getattr(ops, name)(x, y, *args, **kwargs)
        ref = getattr(reference, name)(x, y, *args, **kwargs)
        assert out.dtype == ref.dtype == torch.float32, name
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-7)
        # Same as handing both the float32-rounded teacher.
        args32 = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
        torch.testing.assert_close(getattr(reference, name)(x, y, *args32, **kwargs), ref, rtol=0, atol=0)
