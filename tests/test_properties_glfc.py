"""Property-based tests of GLFC's losses (gradient_compensated_bce, relation_distillation_bce,
glfc_loss; issue 17): random valid inputs against the float64 twin (values, weights and
gradients, every float dtype, non-contiguous, empty batch), random invalid inputs, NaN/Inf
inputs, and crash-isolated direct torch.ops calls. Example counts: the hypothesis profile."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fcl_ext import ops, reference
from tests.properties import (SCALES, assert_like_twin, assert_nan_like_twin, assert_rejected, dtypes, layouts, leaf,
                              run_op_fuzz, tensor)


@st.composite
def glfc_inputs(draw, dtype=None, min_n=0):
    n, c = draw(st.integers(min_n, 6)), draw(st.integers(1, 12))
    dtype = dtype or draw(dtypes())
    scale, seed, layout = draw(st.sampled_from(SCALES)), draw(st.integers(0, 2 ** 16)), draw(layouts())
    x = tensor((n, c), dtype, scale=scale, seed=seed, layout=layout)
    labels = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.int64)
    labels = labels.to(draw(st.sampled_from([torch.int64, torch.int32])))
    mask_kind = draw(st.sampled_from(["none", "bool", "ids"]))
    old = draw(st.lists(st.booleans(), min_size=c, max_size=c))
    mask = (None if mask_kind == "none" else torch.tensor(old) if mask_kind == "bool"
            else torch.tensor([i for i, o in enumerate(old) if o], dtype=torch.int64))
    c_old = draw(st.integers(0, c))
    q = tensor((n, c_old), draw(st.sampled_from([dtype, torch.float64])), scale=scale, seed=seed + 1)
    return x, labels, mask, q, scale


@given(inputs=glfc_inputs(), reduction=st.sampled_from(["none", "sum", "mean"]),
       weights=st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.5]), st.sampled_from([0.0, 0.5, 3.0])),
       seed=st.integers(0, 2 ** 16))
def test_valid_inputs_match_twin(inputs, reduction, weights, seed):
    x, labels, mask, q, scale = inputs
    dtype, n = x.dtype, x.shape[0]
    x, x64 = leaf(x)
    q64 = q.to(dtype).double()  # the op casts the teacher to the student's dtype first
    for name, args, kwargs in (("gradient_compensated_bce", (mask,), {"reduction": reduction}),
                               ("relation_distillation_bce", (q,), {"reduction": reduction}),
                               ("glfc_loss", (mask, q), {"gc_weight": weights[0], "rd_weight": weights[1]})):
        if name == "glfc_loss" and n == 0:
            continue  # a mean over no samples: NaN on both sides, covered by reduction="mean" above
        out = getattr(ops, name)(x, labels, *args, **kwargs)
        args64 = tuple(q64 if a is q else a for a in args)
        exact = getattr(reference, name)(x64, labels, *args64, **kwargs)
        assert out.dtype == dtype, name
        # per-sample losses are BCE row means: O(scale) terms.
        rows = n if (reduction == "sum" and name != "glfc_loss") else 1
        assert_like_twin(out, exact, dtype, floor=rows, compute_scale=(1 + scale) * rows, what=name)
        grad_out = tensor(exact.shape, torch.float64, seed=seed)
        g, = torch.autograd.grad(out, x, grad_out.to(dtype))
        g64, = torch.autograd.grad(exact, x64, grad_out)
        top = float(grad_out.abs().max()) if grad_out.numel() else 0.0
        # d/dx of a weighted BCE mean over C: O(w / C); weights w_i are ~G_i / mean(G) (can be large)
        assert_like_twin(g, g64, dtype, cond=4.0, compute_scale=top * (1 + sum(weights)), what=f"{name} grad")
    if n:
        _, w = ops.gradient_compensated_bce(x, labels, mask, return_weights=True)
        _, w64 = reference.gradient_compensated_bce(x64, labels, mask, return_weights=True)
        assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_like_twin(w, w64, torch.float32 if dtype != torch.float64 else dtype, cond=4.0, what="weights")


def _non_finite(values):
    return st.lists(st.tuples(st.integers(0, 71), st.sampled_from(values)), min_size=1, max_size=3)


@given(inputs=glfc_inputs(dtype=torch.float64, min_n=1), dtype=st.sampled_from([torch.float64, torch.float32]),
       bad=_non_finite(["nan"]), in_teacher=st.booleans())
def test_nan_inputs_like_twin(inputs, dtype, bad, in_teacher):
    _check_non_finite(inputs, dtype, bad, in_teacher)


@given(inputs=glfc_inputs(dtype=torch.float64, min_n=1), dtype=st.sampled_from([torch.float64, torch.float32]),
       bad=_non_finite(["nan", "inf", "-inf"]), in_teacher=st.booleans())
def test_infinite_inputs_like_twin(inputs, dtype, bad, in_teacher):
    _check_non_finite(inputs, dtype, bad, in_teacher)


def _check_non_finite(inputs, dtype, bad, in_teacher):
    x, labels, mask, q, _ = inputs
    x, q = x.to(dtype).clone(), q.to(dtype).clone()
    target = q if in_teacher and q.numel() else x
    for flat, value in bad:
        target.reshape(-1)[flat % target.numel()] = float(value)  # noqa: reshape of a contiguous copy
    x, x64 = leaf(x)
    out = ops.glfc_loss(x, labels, mask, q)
    exact = reference.glfc_loss(x64, labels, mask, q.double())
    assert_nan_like_twin(out, exact)
    g, = torch.autograd.grad(out, x)
    g64, = torch.autograd.grad(exact, x64)
    assert_nan_like_twin(g, g64, what="grad")


def _x(n=3, c=4, dtype=torch.float32):
    return tensor((n, c), dtype)


BAD_CALLS = {
    "labels out of range": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 4]), None), "labels"),
    "negative label": (lambda: ops.gradient_compensated_bce(_x(), torch.tensor([0, -1, 2]), None), "labels"),
    "float labels": (lambda: ops.glfc_loss(_x(), torch.tensor([0.0, 1.0, 2.0]), None), "labels"),
    "labels wrong length": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1]), None), "labels"),
    "labels not a tensor": (lambda: ops.glfc_loss(_x(), [0, 1, 2], None), "labels"),
    "logits 1-D": (lambda: ops.glfc_loss(tensor((4,)), torch.tensor([0]), None), "logits"),
    "integer logits": (lambda: ops.glfc_loss(torch.ones(3, 4, dtype=torch.int64), torch.tensor([0, 1, 2]), None),
                       "logits"),
    "mask wrong length": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool)),
                          "old_class_mask"),
    "mask ids out of range": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), torch.tensor([5])),
                              "old_class_mask"),
    "float mask": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), torch.ones(4)), "old_class_mask"),
    "mask not a tensor": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), [True] * 4), "old_class_mask"),
    "teacher too wide": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), None, _x(3, 5)), "old_logits"),
    "teacher wrong rows": (lambda: ops.relation_distillation_bce(_x(), torch.tensor([0, 1, 2]), _x(2, 2)),
                           "old_logits"),
    "teacher missing": (lambda: ops.relation_distillation_bce(_x(), torch.tensor([0, 1, 2]), None), "old_logits"),
    "bad reduction": (lambda: ops.gradient_compensated_bce(_x(), torch.tensor([0, 1, 2]), None, reduction="avg"),
                      "reduction"),
    "return_weights not bool": (lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), None, return_weights="yes"),
                                "return_weights"),
}


@given(case=st.sampled_from(sorted(BAD_CALLS)), weight=st.sampled_from([None, "0.5", -1.0, float("nan"),
                                                                        float("-inf")]),
       which=st.sampled_from(["call", "gc_weight", "rd_weight"]))
def test_invalid_inputs_raise_naming_the_argument(case, weight, which):
    if which == "call":
        call, name = BAD_CALLS[case]
        assert_rejected(call, name, case)
    else:
        assert_rejected(lambda: ops.glfc_loss(_x(), torch.tensor([0, 1, 2]), None, _x(3, 2), **{which: weight}),
                        which, f"{which}={weight!r}")


def test_direct_op_calls_never_crash():
    assert run_op_fuzz("glfc")["cases"] > 0


# ---- regression examples of the finding above (issue 17): non-finite logits behave like the twin ----
INF, NAN = float("inf"), float("nan")


def _like_twin_at_nonfinite(name, x, labels, *args, expect, dtype=torch.float32, **kwargs):
    """ops.<name> and the float64 twin on the same inputs: the loss is `expect` (inf or NaN) on both sides, or
    "finite" and close,
    and the gradients agree (NaN where the twin's is, finite values within float tolerance)."""
    x, x64 = leaf(torch.tensor(x, dtype=dtype))
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    out = getattr(ops, name)(x, labels, *args, **kwargs)
    exact = getattr(reference, name)(x64, labels, *args64, **kwargs)
    if expect == "finite":
        assert_like_twin(out, exact, dtype, what=name)
    else:
        for value, who in ((out, "op"), (exact, "twin")):
            assert torch.isnan(value) if expect != expect else value.item() == expect, (who, value)
    g, = torch.autograd.grad(out, x)
    g64, = torch.autograd.grad(exact, x64)
    assert_nan_like_twin(g, g64, what="grad")
    finite = torch.isfinite(g64)
    assert_like_twin(g[finite], g64[finite], dtype, what="grad")
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("row, label, expect", [
    ([INF, 0.0, 1.0], 1, INF),    # the example: +inf off the label (was NaN)
    ([-INF, 0.0, 1.0], 1, NAN),   # -inf off the label: the twin's -inf + inf (was finite)
    ([0.0, INF, 1.0], 1, NAN),    # +inf at the label: the twin's 0 * inf (was finite)
    ([0.0, -INF, 1.0], 1, NAN),   # -inf at the label (was +inf)
    ([NAN, 0.0, 1.0], 1, NAN),
])
def test_nonfinite_logit_without_teacher_like_twin(row, label, expect, dtype):
    labels = torch.tensor([label, 0])
    rows = [row, [0.5, -1.0, 2.0]]
    for name in ("glfc_loss", "gradient_compensated_bce"):
        _like_twin_at_nonfinite(name, rows, labels, torch.tensor([True, False, False]), expect=expect, dtype=dtype)


@pytest.mark.parametrize("teacher, expect", [
    (20.0, INF),   # 1 - sigmoid(20) > 0 in float64 (float32 rounds it to 0): the twin's +inf
    (40.0, NAN),   # sigmoid(40) rounds to 1 in float64: the twin's 0 * inf
    (-INF, INF),   # target 0
    (INF, NAN),    # target 1
    (NAN, NAN),
])
def test_inf_logit_against_teacher_like_twin(teacher, expect):
    # +inf at old class 0 (not the label), whose RD target is sigmoid(teacher)
    x, labels, q = [[INF, 0.0, 1.0]], torch.tensor([2]), torch.tensor([[teacher, 0.3]])
    _like_twin_at_nonfinite("relation_distillation_bce", x, labels, q, expect=expect)
    # GC sees +inf off the label (+inf): the sum is NaN where RD is
    _like_twin_at_nonfinite("glfc_loss", x, labels, None, q, expect=expect)


@pytest.mark.parametrize("teacher, grad_nan", [(INF, False), (-INF, False), (NAN, True)])
def test_nonfinite_teacher_with_finite_logits_like_twin(teacher, grad_nan):
    x, labels, q = [[0.5, -2.0, 1.0]], torch.tensor([2]), torch.tensor([[teacher, 0.3]])
    g = _like_twin_at_nonfinite("glfc_loss", x, labels, None, q, expect=NAN if grad_nan else "finite")
    # only the entry that the NaN teacher logit targets has a NaN gradient
    assert torch.isnan(g).tolist() == [[grad_nan, False, False]]


def test_a_switched_off_term_does_not_turn_inf_into_nan():
    # +inf off the label in a new class: GC and RD rows are +inf; a zero weight leaves its term out
    x, labels, q = [[0.1, INF, 1.0]], torch.tensor([0]), torch.tensor([[0.2]])
    _like_twin_at_nonfinite("relation_distillation_bce", x, labels, q, expect=INF)
    _like_twin_at_nonfinite("glfc_loss", x, labels, None, q, gc_weight=0.0, expect=INF)
    _like_twin_at_nonfinite("glfc_loss", x, labels, None, q, rd_weight=0.0, expect=INF)


@pytest.mark.parametrize("label_logit, expect", [(200.0, INF), (800.0, NAN)])
def test_zero_float32_weight_times_inf_like_twin(label_logit, expect):
    # w_0 = G_0 / mean G with G_0 = sigmoid(-o_y): 0 in float32 from o_y ~ 104, in float64 only from ~ 745;
    # row 0 also holds +inf off its label, so its w * gc is 0 * inf = NaN only where the float64 weight is 0.
    x = [[label_logit, INF, 0.0], [0.0, 0.3, -0.2]]
    labels, mask = torch.tensor([0, 0]), torch.tensor([True, False, False])
    _like_twin_at_nonfinite("gradient_compensated_bce", x, labels, mask, expect=expect)
