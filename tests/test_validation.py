"""Clear errors for bad arguments of the public API (issue 17, "unclear errors"): a wrong type
is a TypeError and a wrong value (NaN included) a ValueError, both naming the argument; meta
tensors either work (shapes only) or raise clearly, never through .item()."""
import math

import numpy as np
import pytest
import torch

from fcl_ext import ops, reconstruct
from tests.testing import make_logits

NAN, INF = float("nan"), float("inf")
NON_NUMBERS = [None, "2", [1.0], torch.tensor(1.0), True, 1j]


def _x(*shape, dtype=torch.float32):
    return make_logits(shape, dtype)


def _labels(n=4, c=5):
    return torch.arange(n) % c


# name of the float argument -> call with that argument set to `value`
FLOAT_ARGS = {
    "softmax_entropy.eps": lambda v: ops.softmax_entropy(_x(4, 5), eps=v),
    "glfc_loss.gc_weight": lambda v: ops.glfc_loss(_x(4, 5), _labels(), None, _x(4, 3), gc_weight=v),
    "glfc_loss.rd_weight": lambda v: ops.glfc_loss(_x(4, 5), _labels(), None, _x(4, 3), rd_weight=v),
    "cross_correlation_matrix.eps": lambda v: ops.cross_correlation_matrix(_x(4, 3), _x(4, 2), eps=v),
    "cross_correlation_loss.eps": lambda v: ops.cross_correlation_loss(_x(4, 3), _x(4, 3), eps=v),
    "cross_correlation_loss.off_diag_weight":
        lambda v: ops.cross_correlation_loss(_x(4, 3), _x(4, 3), off_diag_weight=v),
    "cross_correlation_loss.off_diag_target":
        lambda v: ops.cross_correlation_loss(_x(4, 3), _x(4, 3), off_diag_target=v),
    "dual_distillation_loss.temperature": lambda v: ops.dual_distillation_loss(_x(4, 5), _labels(), temperature=v),
    "dual_distillation_loss.ce_weight": lambda v: ops.dual_distillation_loss(_x(4, 5), _labels(), ce_weight=v),
    "dual_distillation_loss.intra_weight":
        lambda v: ops.dual_distillation_loss(_x(4, 5), _labels(), _x(4, 5), intra_weight=v),
    "dual_distillation_loss.inter_weight":
        lambda v: ops.dual_distillation_loss(_x(4, 5), _labels(), None, _x(4, 5), inter_weight=v),
    "psnr.data_range": lambda v: reconstruct.psnr(_x(1, 2, 2), _x(1, 2, 2), data_range=v),
    "BatchedLBFGS.lr": lambda v: reconstruct.BatchedLBFGS(_x(2, 3), lr=v),
    "BatchedLBFGS.tolerance_grad": lambda v: reconstruct.BatchedLBFGS(_x(2, 3), tolerance_grad=v),
}
# signed arguments accept negative values; the others must be >= 0 (temperature, data_range > 0)
SIGNED = {"cross_correlation_loss.off_diag_target"}


@pytest.mark.parametrize("value", NON_NUMBERS, ids=repr)
@pytest.mark.parametrize("arg", sorted(FLOAT_ARGS))
def test_non_numeric_hyperparameter_is_a_type_error_naming_it(arg, value):
    with pytest.raises(TypeError, match=arg.split(".")[1]):
        FLOAT_ARGS[arg](value)


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=repr)
@pytest.mark.parametrize("arg", sorted(FLOAT_ARGS))
def test_non_finite_hyperparameter_is_a_value_error_naming_it(arg, value):
    with pytest.raises(ValueError, match=arg.split(".")[1]):
        FLOAT_ARGS[arg](value)


@pytest.mark.parametrize("arg", sorted(set(FLOAT_ARGS) - SIGNED))
def test_negative_hyperparameter_is_a_value_error_naming_it(arg):
    with pytest.raises(ValueError, match=arg.split(".")[1]):
        FLOAT_ARGS[arg](-0.5)


@pytest.mark.parametrize("arg", sorted(FLOAT_ARGS))
def test_numpy_and_integer_numbers_are_accepted(arg):
    FLOAT_ARGS[arg](np.float64(0.5))
    FLOAT_ARGS[arg](1)


def test_zero_temperature_rejected():
    with pytest.raises(ValueError, match="temperature"):
        ops.dual_distillation_loss(_x(4, 5), _labels(), temperature=0.0)


FLAG_AND_CHOICE_ARGS = {
    "reduction": lambda v: ops.softmax_entropy(_x(4, 5), reduction=v),
    "return_weights": lambda v: ops.glfc_loss(_x(4, 5), _labels(), None, return_weights=v),
    "unbiased": lambda v: ops.cross_correlation_matrix(_x(4, 3), _x(4, 2), unbiased=v),
    "temperature_squared": lambda v: ops.dual_distillation_loss(_x(4, 5), _labels(), temperature_squared=v),
    "metric": lambda v: ops.gradient_matching_loss(_x(2, 3), _x(2, 3), metric=v),
}


@pytest.mark.parametrize("value", [None, 1, torch.tensor(True), ["mean"]], ids=repr)
@pytest.mark.parametrize("arg", sorted(FLAG_AND_CHOICE_ARGS))
def test_flag_or_choice_of_wrong_type_is_a_type_error_naming_it(arg, value):
    with pytest.raises(TypeError, match=arg):
        FLAG_AND_CHOICE_ARGS[arg](value)


def _lbfgs_args(k=2, m=3, d=4):
    return dict(grad=_x(k, d, dtype=torch.float64), s_hist=_x(k, m, d, dtype=torch.float64),
                y_hist=_x(k, m, d, dtype=torch.float64), rho=_x(k, m, dtype=torch.float64),
                hist_len=torch.full((k,), m), h_diag=torch.ones(k, dtype=torch.float64))


@pytest.mark.parametrize("value", [None, [1.0, 2.0], 3.0], ids=repr)
@pytest.mark.parametrize("arg", ["grad", "s_hist", "y_hist", "rho", "hist_len", "h_diag", "hist_start"])
def test_lbfgs_direction_non_tensor_is_a_type_error_naming_it(arg, value):
    args = _lbfgs_args()
    if arg == "hist_start" and value is None:
        pytest.skip("hist_start=None is the documented default")
    kwargs = {"hist_start": value} if arg == "hist_start" else {}
    if arg != "hist_start":
        args[arg] = value
    with pytest.raises(TypeError, match=arg):
        ops.lbfgs_direction(*args.values(), **kwargs)


# ---- meta tensors -------------------------------------------------------------------

def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


META_CALLS = {
    "softmax_entropy": (lambda: ops.softmax_entropy(_meta(3, 4), reduction="none"), (3,)),
    "gradient_compensated_bce": (lambda: ops.gradient_compensated_bce(
        _meta(3, 4), _meta(3, dtype=torch.int64), _meta(2, dtype=torch.int64), reduction="none"), (3,)),
    "relation_distillation_bce": (lambda: ops.relation_distillation_bce(
        _meta(3, 4), _meta(3, dtype=torch.int32), _meta(3, 2), reduction="none"), (3,)),
    "glfc_loss": (lambda: ops.glfc_loss(_meta(3, 4), _meta(3, dtype=torch.int64), _meta(4, dtype=torch.bool),
                                        _meta(3, 2)), ()),
    "cross_correlation_matrix": (lambda: ops.cross_correlation_matrix(_meta(3, 4), _meta(3, 5)), (4, 5)),
    "cross_correlation_loss": (lambda: ops.cross_correlation_loss(_meta(3, 4), _meta(3, 4)), ()),
    "dual_distillation_loss": (lambda: ops.dual_distillation_loss(
        _meta(3, 4), _meta(3, dtype=torch.int64), _meta(3, 4), _meta(3, 4)), ()),
    "gradient_matching_loss": (lambda: ops.gradient_matching_loss(_meta(3, 4), _meta(3, 4), metric="cosine"),
                               (3,)),
    "lbfgs_direction": (lambda: ops.lbfgs_direction(
        _meta(3, 4), _meta(3, 2, 4), _meta(3, 2, 4), _meta(3, 2), _meta(3, dtype=torch.int64), _meta(3)), (3, 4)),
}


@pytest.mark.parametrize("name", sorted(META_CALLS))
def test_meta_tensors_give_shapes_without_reading_data(name):
    call, shape = META_CALLS[name]
    out = call()
    assert out.device.type == "meta" and tuple(out.shape) == shape


def test_meta_tensors_still_get_shape_checks():
    with pytest.raises(ValueError, match="labels"):
        ops.glfc_loss(_meta(3, 4), _meta(2, dtype=torch.int64), None)


# ---- reconstruct ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    return reconstruct.LeNetEncoder(1, 8, 4, seed=0)


def _target(encoder, k=2):
    p = sum(t.numel() for t in encoder.parameters())
    return torch.randn(k, p, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arg, value, exc", [
    ("steps", 0, ValueError), ("steps", 2.5, TypeError), ("keep_last", 0, ValueError), ("keep_last", None, TypeError),
    ("lr", -1.0, ValueError), ("lr", NAN, ValueError), ("lr", "0.1", TypeError),
    ("max_iter", 0, ValueError), ("history_size", 0, ValueError), ("history_size", 1.5, TypeError),
    ("optimizer", "sgd", ValueError), ("optimizer", None, TypeError), ("metric", "l1", ValueError),
    ("metric", 2, TypeError), ("init", "zeros", ValueError), ("init", 3, TypeError), ("generator", 0, TypeError),
    ("init", torch.zeros(1, 1, 8, 8), ValueError),
])
@pytest.mark.parametrize("fn", ["reconstruct_from_gradients", "reconstruct_sequential_reference"])
def test_reconstruct_errors_name_the_argument(encoder, fn, arg, value, exc):
    with pytest.raises(exc, match=arg):
        getattr(reconstruct, fn)(encoder, _target(encoder), **{"steps": 1, "keep_last": 1, arg: value})


@pytest.mark.parametrize("labels, exc", [(torch.tensor([0, 4]), ValueError), (torch.tensor([0.0, 1.0]), ValueError),
                                         (torch.tensor([0]), ValueError), ("ab", TypeError)])
def test_reconstruct_bad_labels_name_labels(encoder, labels, exc):
    with pytest.raises(exc, match="labels"):
        reconstruct.reconstruct_from_gradients(encoder, _target(encoder), labels, steps=1, keep_last=1)


@pytest.mark.parametrize("target, exc", [(None, TypeError), (torch.zeros(2, 3, 4), ValueError),
                                         (torch.zeros(2, 5, dtype=torch.int64), ValueError), ([], ValueError)])
def test_reconstruct_bad_target_names_target_grads(encoder, target, exc):
    with pytest.raises(exc, match="target_grads"):
        reconstruct.reconstruct_from_gradients(encoder, target, steps=1, keep_last=1)


def test_reconstruct_other_errors_name_the_argument(encoder):
    with pytest.raises(ValueError, match="original"):
        reconstruct.psnr(torch.zeros(1, 3, 3), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="reconstructed"):
        reconstruct.psnr(None, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="grads"):
        reconstruct.recover_labels(torch.zeros(2, 3, 4), encoder)
    with pytest.raises(TypeError, match="grads"):
        reconstruct.recover_labels("grads", encoder)
    with pytest.raises(ValueError, match="x0"):
        reconstruct.BatchedLBFGS(torch.zeros(3))
    with pytest.raises(ValueError, match="max_eval"):
        reconstruct.BatchedLBFGS(torch.zeros(2, 3), max_eval=0)
    with pytest.raises(TypeError, match="images"):
        reconstruct.encode_gradients(encoder, None, torch.zeros(2, dtype=torch.int64))
    assert math.isinf(float(reconstruct.psnr(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))))


# ---- upstream gradients of the private backward ops: the forward output's exact shape (issue 17, large fuzz) --
OPS = torch.ops.fcl_ext
F32 = dict(dtype=torch.float32)
UPSTREAM_SHAPE_CALLS = {
    # a 0-dim gradient has the one element of a [1] output, but not its shape: the large fuzz found these accepted
    "softmax_entropy": (lambda g: OPS._softmax_entropy_backward(g, torch.randn(1, 3), torch.zeros(1, 3), 0.0),
                        "grad_entropy"),
    "glfc_loss": (lambda g: OPS._glfc_loss_backward(g, torch.randn(1, 3), torch.tensor([0]), None, torch.ones(1),
                                                    1.0, 0.0), "grad_per_sample_loss"),
    "gradient_matching": (lambda g: OPS._gradient_matching_loss_backward(g, torch.randn(1, 4), torch.randn(1, 4),
                                                                         torch.zeros(1, 3), "l2"), "grad_loss"),
}


@pytest.mark.parametrize("op", sorted(UPSTREAM_SHAPE_CALLS))
@pytest.mark.parametrize("shape", [(), (1, 1)], ids=str)
def test_private_backward_refuses_an_upstream_gradient_of_another_shape(op, shape):
    call, name = UPSTREAM_SHAPE_CALLS[op]
    with pytest.raises(RuntimeError, match=rf"{name} must have"):
        call(torch.ones(shape, **F32))
    assert call(torch.ones(1, **F32)).shape[0] == 1     # the forward output's shape [1] is accepted


def test_softmax_entropy_op_with_zero_classes_and_rows_left_raises():
    # [3, 0] logits returned 3 uninitialised entropies from the direct op call (ops.py already refused them)
    with pytest.raises(RuntimeError, match="at least one class"):
        OPS.softmax_entropy(torch.zeros(3, 0), 0.0)
    with pytest.raises(RuntimeError, match="at least one class"):
        OPS._softmax_entropy_backward(torch.ones(3), torch.zeros(3, 0), torch.zeros(0, 3), 0.0)
    h, stats = OPS.softmax_entropy(torch.zeros(0, 0), 0.0)      # nothing to compute: empty, as before
    assert h.shape == (0,) and stats.shape == (0, 3)


def test_device_error_codes_match_the_kernels_and_each_has_a_message():
    # csrc/cuda/kernel_utils.cuh and fcl_ext/device_errors.py keep one list of codes; a code the Python side does
    # not know would reach a user as "unknown error code".
    import re
    from pathlib import Path

    from fcl_ext import device_errors
    header = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "kernel_utils.cuh").read_text()
    enum = re.search(r"enum DeviceErrorCode[^{]*\{(.*?)\};", header, re.S).group(1)
    codes = {name: int(value) for name, value in re.findall(r"kErr(\w+)\s*=\s*(\d+)", enum)}
    assert codes.pop("None") == 0 and len(codes) >= 5
    for name, value in codes.items():
        python_name = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()  # TinyStdColumn -> TINY_STD_COLUMN
        assert getattr(device_errors, python_name) == value, name
        text = device_errors.describe(dict(code=value, op=3, index=1, value=0, bound=4, what=0, count=1))
        assert "unknown error code" not in text, name


def test_an_int_beyond_float_range_is_a_value_error_naming_the_argument():
    # float(10**400) raised a bare OverflowError that did not say which argument
    from fcl_ext import ops
    with pytest.raises(ValueError, match="eps must be a finite number"):
        ops.softmax_entropy(torch.randn(2, 3), eps=10 ** 400)
