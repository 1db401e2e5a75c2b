"""Fuzz of direct torch.ops.fcl_ext.* calls, forward and private backward ops (issue 17).

Anyone can call these ops, so each must raise ValueError/TypeError/RuntimeError/IndexError
naming the bad argument, never crash. Each case starts from a valid call of one op and breaks
one argument (shape, dtype, values, a hyperparameter). A crash (segfault, abort) kills the
process, so tests/properties.py:run_op_fuzz runs this in a subprocess and reports the last
"CASE" line printed before the call.

    python -c "from tests.op_fuzz import main; main('entropy', 'fast')"
"""
import json
import math
import re
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fcl_ext  # noqa: F401  (registers torch.ops.fcl_ext)
from tests.testing import register_hypothesis_profiles

OPS = torch.ops.fcl_ext
ALLOWED = (ValueError, TypeError, RuntimeError, IndexError)
NAN = float("nan")


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _other_shape(draw, shape):
    """A shape that differs from `shape`: one size changed, a dim added, or a dim dropped."""
    shape = list(shape)
    kind = draw(st.sampled_from(["resize", "add", "drop"] if shape else ["add"]))
    if kind == "resize":
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.sampled_from([s for s in (0, 1, shape[i] + 1, shape[i] + 3, 2 * shape[i] + 2)
                                         if s != shape[i]]))
    elif kind == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(2, 3)))
    else:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    return tuple(shape)


def _reshaped(draw, t):
    shape = _other_shape(draw, t.shape)
    return torch.zeros(shape, dtype=t.dtype) if not t.dtype.is_floating_point else _randn(*shape, dtype=t.dtype)


# Each family: draw -> (op name, args, index of the broken argument, names that may denote it).
# A broken argument is one of: another shape, a wrong dtype, out-of-range values, a bad float.

def _entropy(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 7))
    logits = _randn(rows, cols, dtype=dtype)
    eps = draw(st.sampled_from([0.0, 1e-5]))
    entropy, stats = OPS.softmax_entropy(logits, eps)
    if draw(st.booleans()):
        args = [logits, eps]
        which = draw(st.sampled_from(["logits_dtype", "eps"]))
        if which == "logits_dtype":
            args[0] = logits.to(torch.int64)
            return "softmax_entropy", args, ("logits",)
        args[1] = draw(st.sampled_from([-1.0, NAN, -math.inf]))
        return "softmax_entropy", args, ("eps",)
    args = [torch.ones_like(entropy), logits, stats, eps]
    which = draw(st.sampled_from(["grad_entropy", "logits", "stats", "stats_dtype", "eps"]))
    if which == "stats_dtype":
        args[2] = stats.to(torch.float64 if dtype == torch.float32 else torch.float32)
        return "_softmax_entropy_backward", args, ("stats",)
    if which == "eps":
        args[3] = draw(st.sampled_from([-1.0, NAN]))
        return "_softmax_entropy_backward", args, ("eps",)
    i = ["grad_entropy", "logits", "stats"].index(which)
    args[i] = _reshaped(draw, args[i])
    if which == "logits" and args[1].dim() >= 1 and args[1].shape[:-1] == logits.shape[:-1] and args[1].shape[-1]:
        # only the class count changed: the saved stats do not record C, so that call is valid; change the rows
        args[1] = _randn(rows + draw(st.integers(1, 3)), cols, dtype=dtype)
    # logits of another shape disagree with the other two: naming either is clear
    names = {"grad_entropy": ("grad_entropy", "grad"), "logits": ("logits", "grad_entropy", "stats")}
    return "_softmax_entropy_backward", args, names.get(which, (which,))


def _labels(draw, n, c):
    return torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.int64)


def _bad_labels(draw, labels, c):
    kind = draw(st.sampled_from(["range", "negative", "float", "shape"]))
    if kind == "range" and labels.numel():
        bad = labels.clone()
        bad[draw(st.integers(0, labels.numel() - 1))] = c + draw(st.integers(0, 5))
        return bad
    if kind == "negative" and labels.numel():
        bad = labels.clone()
        bad[draw(st.integers(0, labels.numel() - 1))] = -draw(st.integers(1, 5))
        return bad
    if kind == "float":
        return labels.double()
    return _reshaped(draw, labels)


def _glfc(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    c_old = draw(st.integers(0, c))
    logits, labels = _randn(n, c, dtype=dtype), _labels(draw, n, c)
    mask = torch.arange(c) < draw(st.integers(0, c))
    old = _randn(n, c_old, dtype=dtype, seed=1) if draw(st.booleans()) else None
    gcw, rdw = (1.0, 0.0) if old is None else (0.5, 0.5)
    per_sample, weights, _ = OPS.glfc_loss(logits, labels, mask, old, gcw, rdw)
    if draw(st.booleans()):
        args = [logits, labels, mask, old, gcw, rdw]
        which = draw(st.sampled_from(["labels", "old_class_mask", "old_class_mask_dtype", "old_logits", "gc_weight",
                                      "logits_dtype"]))
        if which == "labels":
            args[1] = _bad_labels(draw, labels, c)
        elif which == "old_class_mask":
            args[2] = _reshaped(draw, mask)
        elif which == "old_class_mask_dtype":
            args[2] = mask.long()
        elif which == "old_logits":
            args[3] = _randn(*_other_shape(draw, (n, c_old)), dtype=dtype)
            if args[3].dim() == 2 and args[3].shape[0] == n and args[3].shape[1] <= c:
                args[3] = _randn(n, c + 1, dtype=dtype)
        elif which == "gc_weight":
            args[4] = draw(st.sampled_from([NAN, -1.0]))
        else:
            args[0] = logits.to(torch.int32)
        return "glfc_loss", args, (which.replace("_dtype", ""),)
    args = [torch.ones_like(per_sample), logits, labels, old, weights, gcw, rdw]
    which = draw(st.sampled_from(["grad_per_sample_loss", "labels", "weights", "weights_dtype", "old_logits"]))
    if which == "labels":
        args[2] = _bad_labels(draw, labels, c)
    elif which == "weights_dtype":
        args[4] = weights.to(torch.float64 if weights.dtype == torch.float32 else torch.float32)
    elif which == "old_logits":
        args[3] = _randn(n + 1, c_old + 1, dtype=dtype)
    else:
        i = {"grad_per_sample_loss": 0, "weights": 4}[which]
        args[i] = _reshaped(draw, args[i])
    names = (which.replace("_dtype", ""),) + (("grad",) if which == "grad_per_sample_loss" else ())
    return "_glfc_loss_backward", args, names


def _cross_correlation(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    b_rows, ka, kb = draw(st.integers(2, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    a, b = _randn(b_rows, ka, dtype=dtype), _randn(b_rows, kb, dtype=dtype, seed=1)
    unbiased, eps = draw(st.booleans()), draw(st.sampled_from([1e-5, 1e-3]))
    from_loss = draw(st.booleans())
    if from_loss:
        b = _randn(b_rows, ka, dtype=dtype, seed=1)
        loss, matrix, stats_a, stats_b = OPS.cross_correlation_loss(a, b, 0.1, -1.0, unbiased, eps, True)
        grad = torch.ones_like(loss)
    else:
        matrix, stats_a, stats_b = OPS.cross_correlation_matrix(a, b, unbiased, eps)
        grad, matrix = torch.ones_like(matrix), stats_a.new_empty((0,))
    if draw(st.integers(0, 3)) == 0:
        which = draw(st.sampled_from(["a", "b", "eps"]))
        args = [a, b, unbiased, eps]
        if which == "eps":
            args[3] = draw(st.sampled_from([NAN, -1.0]))
            return "cross_correlation_matrix", args, ("eps",)
        i = "ab".index(which)
        args[i] = args[i][:1] if draw(st.booleans()) else args[i].to(torch.int64)
        return "cross_correlation_matrix", args, (which, "batch")
    args = [grad, a, b, stats_a, stats_b, matrix, unbiased, 0.1, -1.0, from_loss, True, True]
    choices = ["grad", "stats_a", "stats_b", "stats_a_dtype"] + (["matrix"] if from_loss else [])
    which = draw(st.sampled_from(choices))
    if which == "stats_a_dtype":
        args[3] = stats_a.to(torch.float64 if stats_a.dtype == torch.float32 else torch.float32)
        return "_cross_correlation_backward", args, ("stats_a",)
    i = {"grad": 0, "stats_a": 3, "stats_b": 4, "matrix": 5}[which]
    args[i] = _reshaped(draw, args[i])
    return "_cross_correlation_backward", args, (which,)


def _dual(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    logits, labels = _randn(n, c, dtype=dtype), _labels(draw, n, c)
    intra = _randn(n, c, dtype=dtype, seed=1) if draw(st.booleans()) else None
    inter = _randn(n, c, dtype=dtype, seed=2) if draw(st.booleans()) else None
    temperature = draw(st.sampled_from([1.0, 2.0]))
    loss, stats = OPS.dual_distillation_loss(logits, labels, intra, inter, temperature, 1.0, 1.0, 1.0)
    if draw(st.booleans()):
        args = [logits, labels, intra, inter, temperature, 1.0, 1.0, 1.0]
        which = draw(st.sampled_from(["labels", "intra_logits", "temperature", "ce_weight", "logits_dtype"]))
        if which == "labels":
            args[1] = _bad_labels(draw, labels, c)
        elif which == "intra_logits":
            args[2] = _randn(*_other_shape(draw, (n, c)), dtype=dtype)
        elif which == "temperature":
            args[4] = draw(st.sampled_from([0.0, -1.0, NAN]))
        elif which == "ce_weight":
            args[5] = draw(st.sampled_from([NAN, -1.0]))
        else:
            args[0] = logits.to(torch.int64)
        names = {"intra_logits": ("intra_logits", "teacher")}.get(which, (which.replace("_dtype", ""),))
        return "dual_distillation_loss", args, names
    args = [torch.ones_like(loss), logits, labels, intra, inter, stats, temperature, 1.0, 1.0, 1.0]
    which = draw(st.sampled_from(["grad_loss", "labels", "stats", "stats_dtype", "inter_logits"]))
    if which == "labels":
        args[2] = _bad_labels(draw, labels, c)
    elif which == "stats_dtype":
        args[5] = stats.to(torch.float64 if stats.dtype == torch.float32 else torch.float32)
    elif which == "inter_logits":
        args[4] = _randn(*_other_shape(draw, (n, c)), dtype=dtype)
    else:
        i = {"grad_loss": 0, "stats": 5}[which]
        args[i] = _reshaped(draw, args[i])
    names = {"inter_logits": ("inter_logits", "teacher"), "grad_loss": ("grad_loss", "grad")}.get(
        which, (which.replace("_dtype", ""),))
    return "_dual_distillation_backward", args, names


def _matching(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    k, p = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    g, t = _randn(k, p, dtype=dtype), _randn(k, p, dtype=dtype, seed=1)
    metric = draw(st.sampled_from(["l2", "cosine"]))
    loss, stats = OPS.gradient_matching_loss(g, t, metric)
    if draw(st.integers(0, 2)) == 0:
        args = [g, t, metric]
        which = draw(st.sampled_from(["target_grads", "metric", "grads"]))
        if which == "target_grads":
            args[1] = _reshaped(draw, t)
        elif which == "metric":
            args[2] = draw(st.sampled_from(["L2", "", "cos"]))
        else:
            args[0] = g.to(torch.int64)
        return "gradient_matching_loss", args, (which,)
    args = [torch.ones_like(loss), g, t, stats, metric]
    which = draw(st.sampled_from(["grad_loss", "target_grads", "stats", "stats_dtype", "metric"]))
    if which == "stats_dtype":
        args[3] = stats.to(torch.float64 if stats.dtype == torch.float32 else torch.float32)
    elif which == "metric":
        args[4] = "manhattan"
    else:
        i = {"grad_loss": 0, "target_grads": 2, "stats": 3}[which]
        args[i] = _reshaped(draw, args[i])
    names = {"grad_loss": ("grad_loss", "grad")}.get(which, (which.replace("_dtype", ""),))
    return "_gradient_matching_loss_backward", args, names


def _lbfgs(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    k, m, d = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    args = [_randn(k, d, dtype=dtype), _randn(k, m, d, dtype=dtype, seed=1), _randn(k, m, d, dtype=dtype, seed=2),
            _randn(k, m, dtype=dtype, seed=3), torch.full((k,), m, dtype=torch.int64), torch.ones(k, dtype=dtype),
            torch.zeros(k, dtype=torch.int64)]
    names = ["grad", "s_hist", "y_hist", "rho", "hist_len", "h_diag", "hist_start"]
    which = draw(st.sampled_from(names + ["hist_len_values", "hist_start_values", "hist_len_dtype"]))
    if which == "hist_len_values":
        args[4] = args[4].clone()
        args[4][draw(st.integers(0, k - 1))] = draw(st.sampled_from([-1, m + 1, m + 7]))
        return "lbfgs_direction", args, ("hist_len",)
    if which == "hist_start_values":
        args[6] = args[6].clone()
        args[6][draw(st.integers(0, k - 1))] = draw(st.sampled_from([-1, m, m + 3]))
        return "lbfgs_direction", args, ("hist_start",)
    if which == "hist_len_dtype":
        args[4] = args[4].to(torch.int32)
        return "lbfgs_direction", args, ("hist_len",)
    i = names.index(which)
    args[i] = _reshaped(draw, args[i])
    # grad, s_hist and y_hist fix K, M and D for the others: a mismatch may be reported on any of them
    return "lbfgs_direction", args, tuple(names) if which in ("grad", "s_hist", "y_hist") else (which,)


FAMILIES = {"entropy": _entropy, "glfc": _glfc, "cross_correlation": _cross_correlation, "dual_distillation": _dual,
            "gradient_matching": _matching, "lbfgs": _lbfgs}


def _describe(op, args):
    def one(a):
        if isinstance(a, torch.Tensor):
            text = f"{str(a.dtype)[6:]}{list(a.shape)}"
            if not a.dtype.is_floating_point and a.numel() and a.numel() <= 8:
                text += f"={a.tolist()}"
            return text
        return repr(a)
    return f"{op}({', '.join(one(a) for a in args)})"


# Float hyperparameters a direct call may accept (a NaN weight giving a NaN loss is NaN in -> NaN out);
# if it raises, the message must still name the argument.
MAY_ACCEPT = {"gc_weight", "ce_weight"}


def fuzz_family(family: str) -> int:
    """Run the fuzz of one family under the loaded profile; raises on the first bad outcome."""
    counts = {"cases": 0}

    @given(st.data())
    def fuzz(data):
        op, args, names = data.draw(st.composite(lambda draw: FAMILIES[family](draw))())
        text = _describe(op, args)
        print("CASE", text, flush=True)
        counts["cases"] += 1
        try:
            getattr(OPS, op)(*args)
        except ALLOWED as err:
            message = str(err)
            assert any(re.search(rf"\b{re.escape(n)}\b", message) for n in names), (
                f"{text}: {type(err).__name__} does not name {names}: {message[:300]}")
        else:
            if not MAY_ACCEPT.intersection(names):
                raise AssertionError(f"{text}: accepted; expected an error naming {names}")

    fuzz()
    return counts["cases"]


def main(families, profile: str = "fast") -> None:
    """Fuzz each family in turn; one line per family: "FAMILY START name", then "FAMILY OK name
    {json}" or "FAMILY FAIL name {json}". A crash leaves START as the family's last line."""
    register_hypothesis_profiles()
    settings.load_profile(profile)
    for family in ([families] if isinstance(families, str) else families):
        print("FAMILY START", family, flush=True)
        try:
            cases = fuzz_family(family)
        except Exception as err:  # report and go on with the next family
            lines = [line for line in str(err).splitlines() if line.strip()]
            print("FAMILY FAIL", family, json.dumps({"error": f"{type(err).__name__}: {lines[0] if lines else ''}"}),
                  flush=True)
        else:
            print("FAMILY OK", family, json.dumps({"cases": cases}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:-1] or ["entropy"], sys.argv[-1] if len(sys.argv) > 1 else "fast")
