"""fcl_ext.losses as torch.nn-style modules: every docstring example runs, reduction= where a
reduction exists (each value checked against the functional op / the reference), extra_repr shows
every setting, type hints, and bad settings raise errors that name the argument."""
import doctest
import inspect
import typing

import pytest
import torch
import torch.nn.functional as F

import fcl_ext
from fcl_ext import losses, ops, reference
from tests.testing import FLOAT_DTYPES, assert_close, make_logits

MODULES = [getattr(losses, name) for name in losses.__all__]
WITH_REDUCTION = [losses.SoftmaxEntropy, losses.GradientCompensatedBCELoss, losses.RelationDistillationLoss,
                  losses.GLFCLoss, losses.DualDomainDistillationLoss]


def test_every_module_is_listed():
    defined = {name for name, obj in vars(losses).items()
               if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == losses.__name__}
    assert defined == set(losses.__all__)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_has_formula_shapes_and_a_running_example(module):
    doc = module.__doc__
    assert ".. math::" in doc and "Shape:" in doc and "Example::" in doc
    finder = doctest.DocTestFinder(recurse=False)
    tests = [t for t in finder.find(module, module.__name__, globs={"torch": torch, "fcl_ext": fcl_ext,
                                                                    **vars(losses)}) if t.examples]
    assert tests, f"{module.__name__} has no >>> example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        torch.manual_seed(0)
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_type_hints_on_init_and_forward(module):
    for fn in (module.__init__, module.forward):
        hints = typing.get_type_hints(fn)
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs")]
        assert set(params) <= set(hints), f"{module.__name__}.{fn.__name__} lacks hints for " \
                                          f"{set(params) - set(hints)}"
        assert "return" in hints


@pytest.mark.parametrize("module", WITH_REDUCTION, ids=lambda m: m.__name__)
def test_reduction_argument(module):
    assert inspect.signature(module).parameters["reduction"].default == "mean"
    with pytest.raises(ValueError, match="reduction"):
        module(reduction="batchmean")
    assert "reduction='sum'" in repr(module(reduction="sum"))


def test_cross_correlation_has_no_reduction():
    # a function of the batch's correlation matrix, not a sum over samples
    assert "reduction" not in inspect.signature(losses.CrossCorrelationLoss).parameters


@pytest.mark.parametrize("module, expected", [
    (losses.SoftmaxEntropy(eps=1e-5), ["reduction='mean'", "eps=1e-05"]),
    (losses.GLFCLoss(0.25, 0.75, reduction="none"), ["gc_weight=0.25", "rd_weight=0.75", "reduction='none'"]),
    (losses.CrossCorrelationLoss.fccl(), ["off_diag_weight=0.0051", "off_diag_target=-1.0", "unbiased=True",
                                          "eps=0.0"]),
    (losses.DualDomainDistillationLoss(temperature=2.0, reduction="sum"),
     ["temperature=2.0", "ce_weight=1.0", "intra_weight=1.0", "inter_weight=1.0", "temperature_squared=False",
      "reduction='sum'"]),
], ids=lambda x: type(x).__name__ if isinstance(x, torch.nn.Module) else "")
def test_extra_repr_shows_every_setting(module, expected):
    text = repr(module)
    for item in expected:
        assert item in text, text


# ---- GLFCLoss reductions ---------------------------------------------------------------------

def glfc_inputs(dtype, n=16, c=8, c_old=5, seed=0):
    logits = make_logits((n, c), dtype, seed=seed, requires_grad=True)
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    return logits, labels, torch.arange(3), make_logits((n, c_old), dtype, seed=seed + 1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_old", [True, False])
def test_glfc_loss_reductions(dtype, with_old):
    logits, labels, old_classes, old_logits = glfc_inputs(dtype)
    old_logits = old_logits if with_old else None
    per_sample = losses.GLFCLoss(0.3, 0.7, reduction="none")(logits, labels, old_classes, old_logits)
    gc = reference.gradient_compensated_bce(logits, labels, old_classes, reduction="none")
    expected = 0.3 * gc + 0.7 * reference.relation_distillation_bce(logits, labels, old_logits, reduction="none") \
        if with_old else gc
    assert per_sample.shape == (16,)
    assert_close(per_sample, expected, dtype)
    mean = losses.GLFCLoss(0.3, 0.7)(logits, labels, old_classes, old_logits)
    total = losses.GLFCLoss(0.3, 0.7, reduction="sum")(logits, labels, old_classes, old_logits)
    assert_close(mean, expected.mean(), dtype)
    assert_close(total, expected.sum(), dtype)
    grad_out = torch.randn(16, dtype=dtype, generator=torch.Generator().manual_seed(3))
    assert_close(torch.autograd.grad(per_sample, logits, grad_out)[0],
                 torch.autograd.grad(expected, logits, grad_out, retain_graph=True)[0], dtype)
    assert_close(torch.autograd.grad(total, logits)[0], torch.autograd.grad(expected.sum(), logits)[0], dtype)


def test_glfc_loss_none_returns_the_weights_of_the_fused_path():
    logits, labels, old_classes, old_logits = glfc_inputs(torch.float64)
    _, w_none = losses.GLFCLoss(reduction="none")(logits, labels, old_classes, old_logits, return_weights=True)
    _, w_mean = losses.GLFCLoss()(logits, labels, old_classes, old_logits, return_weights=True)
    assert_close(w_none, w_mean)


# ---- DualDomainDistillationLoss reductions ---------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("temperature, squared", [(1.0, False), (2.5, True)])
def test_dual_distillation_reductions(dtype, temperature, squared):
    logits = make_logits((12, 7), dtype, seed=4, requires_grad=True)
    labels = torch.randint(0, 7, (12,), generator=torch.Generator().manual_seed(4))
    intra, inter = make_logits((12, 7), dtype, seed=5), make_logits((12, 7), dtype, seed=6)
    kw = dict(temperature=temperature, ce_weight=0.5, intra_weight=0.7, inter_weight=1.3, temperature_squared=squared)
    per_sample = losses.DualDomainDistillationLoss(reduction="none", **kw)(logits, labels, intra, inter)
    # nn.CrossEntropyLoss(reduction="none") + per-row nn.KLDivLoss terms
    log_q = F.log_softmax(logits / temperature, dim=1)
    scale = temperature ** 2 if squared else 1.0
    expected = 0.5 * F.cross_entropy(logits, labels, reduction="none")
    for teacher, weight in ((intra, 0.7), (inter, 1.3)):
        p = F.softmax(teacher / temperature, dim=1)
        expected = expected + weight * scale * F.kl_div(log_q, p, reduction="none").sum(1)
    assert per_sample.shape == (12,) and per_sample.dtype == dtype
    assert_close(per_sample, expected, dtype)
    mean = losses.DualDomainDistillationLoss(**kw)(logits, labels, intra, inter)
    assert_close(mean, reference.dual_distillation_loss(logits, labels, intra, inter, **kw), dtype)
    assert_close(mean, expected.mean(), dtype)
    total = losses.DualDomainDistillationLoss(reduction="sum", **kw)(logits, labels, intra, inter)
    assert_close(total, expected.sum(), dtype)
    grad_out = torch.randn(12, dtype=dtype, generator=torch.Generator().manual_seed(5))
    assert_close(torch.autograd.grad(per_sample, logits, grad_out)[0],
                 torch.autograd.grad(expected, logits, grad_out)[0], dtype)


def test_dual_distillation_none_validates_like_the_op():
    with pytest.raises(ValueError, match="intra_logits"):
        losses.DualDomainDistillationLoss(reduction="none")(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                                                            torch.randn(4, 2))
    with pytest.raises(ValueError, match="labels"):
        losses.DualDomainDistillationLoss(reduction="none")(torch.randn(4, 3), torch.zeros(4))


def test_nan_in_nan_out_for_the_unfused_reductions():
    logits, labels, old_classes, old_logits = glfc_inputs(torch.float64)
    bad = logits.detach().clone()
    bad[2, 1] = float("nan")
    out = losses.GLFCLoss(reduction="none")(bad, labels, old_classes, old_logits)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()
    out = losses.DualDomainDistillationLoss(reduction="none")(bad, labels, old_logits.new_zeros(16, 8))
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


def test_module_defaults_match_the_functional_defaults():
    logits, labels, old_classes, old_logits = glfc_inputs(torch.float64)
    assert torch.equal(losses.GLFCLoss()(logits, labels, old_classes, old_logits),
                       ops.glfc_loss(logits, labels, old_classes, old_logits))
    a, b = make_logits((10, 4), seed=9), make_logits((10, 4), seed=10)
    assert torch.equal(losses.CrossCorrelationLoss()(a, b), ops.cross_correlation_loss(a, b))


# ---- torch.compile -------------------------------------------------------------------------------

def compile_cases():
    logits, labels, old_classes, old_logits = glfc_inputs(torch.float32)
    logits = logits.detach().requires_grad_(True)
    a, b = make_logits((16, 8), torch.float32, seed=11), make_logits((16, 8), torch.float32, seed=12)
    teacher = make_logits((16, 8), torch.float32, seed=13)
    return [
        (losses.SoftmaxEntropy(reduction="none", eps=1e-5), (logits,)),
        (losses.GradientCompensatedBCELoss(), (logits, labels, old_classes)),
        (losses.RelationDistillationLoss(reduction="sum"), (logits, labels, old_logits)),
        (losses.GLFCLoss(), (logits, labels, old_classes, old_logits)),
        (losses.GLFCLoss(reduction="none"), (logits, labels, old_classes, old_logits)),
        (losses.CrossCorrelationLoss.barlow_twins(), (a.requires_grad_(True), b)),
        (losses.DualDomainDistillationLoss(), (logits, labels, teacher, teacher)),
        (losses.DualDomainDistillationLoss(reduction="none"), (logits, labels, teacher)),
    ]


@pytest.mark.parametrize("case", range(len(compile_cases())))
def test_modules_compile_without_graph_breaks(case):
    module, inputs = compile_cases()[case]
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")  # raises on a graph break
    out, expected = compiled(*inputs), module(*inputs)
    assert_close(out, expected, torch.float32)
