"""The worked replacements in examples/: each runs, and each matches the code it replaces.

- barlow_twins_step: fcl_ext's loss == the official Barlow Twins loss lines (values, gradients,
  and a few training steps), == lightly's BarlowTwinsLoss when lightly is installed;
- class_incremental_glfc: RelationDistillationLoss == iCaRL's BCE line; the three-line GLFCLoss
  loop == the same loop with GLFC.py's loss lines transcribed;
- privacy_audit: batched reconstruction == the one-LBFGS-per-image DLG loop, labels recovered;
- compiled_step: no graph breaks, fullgraph compile == eager.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fcl_ext
from tests.testing import assert_close, make_logits

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"fcl_ext_examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def barlow():
    return load_example("barlow_twins_step")


@pytest.fixture(scope="module")
def incremental():
    return load_example("class_incremental_glfc")


@pytest.fixture(scope="module")
def audit():
    return load_example("privacy_audit")


@pytest.fixture(scope="module")
def compiled():
    return load_example("compiled_step")


def test_every_example_is_covered():
    assert {p.stem for p in EXAMPLES.glob("*.py")} == {"barlow_twins_step", "class_incremental_glfc",
                                                       "privacy_audit", "compiled_step"}


# ---- Barlow Twins ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_barlow_twins_loss_equals_official_lines(barlow, dtype):
    z1 = make_logits((48, 12), dtype, seed=1, requires_grad=True)
    z2 = (z1.detach() + make_logits((48, 12), dtype, seed=2, scale=1.0)).requires_grad_(True)
    ours = fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=0.0051)(z1, z2)
    official = barlow.OfficialBarlowTwinsLoss(12, batch_size=48, lambd=0.0051).to(dtype)(z1, z2)
    assert_close(ours, official, dtype)
    for g, r in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(official, (z1, z2))):
        assert_close(g, r, dtype)


def test_barlow_twins_training_steps_equal_official(barlow):
    ours, model = barlow.train(fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=0.0051), steps=4,
                               dtype=torch.float64)
    official, official_model = barlow.train(barlow.OfficialBarlowTwinsLoss(16, 64, lambd=0.0051).double(), steps=4,
                                            dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(official), rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), official_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert ours[0] != ours[-1]  # the model did train


def test_barlow_twins_equals_lightly_when_installed():
    lightly_loss = pytest.importorskip("lightly.loss")
    z1 = make_logits((40, 10), seed=3, requires_grad=True)
    z2 = (z1.detach() * 0.5 + make_logits((40, 10), seed=4, scale=1.0)).requires_grad_(True)
    ours = fcl_ext.losses.CrossCorrelationLoss.barlow_twins(lambd=5e-3)(z1, z2)
    theirs = lightly_loss.BarlowTwinsLoss(lambda_param=5e-3)(z1, z2)
    assert_close(ours, theirs)
    for g, r in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(theirs, (z1, z2))):
        assert_close(g, r)


def test_barlow_main_runs(barlow, capsys):
    ours, official = barlow.main(["--steps", "2", "--batch-size", "32"])
    assert len(ours) == 2 and "official" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(official), rtol=1e-4, atol=1e-6)


# ---- class-incremental loop ------------------------------------------------------------------

def glfc_code_loss(logits, labels, old_classes, old_logits):
    """GLFC.py:189-245 transcribed (specs/glfc.md 1.2-1.3): w_i = G_i / mean(G over i's group),
    G = |sigmoid(o_y) - 1| detached; L_GC = mean over N C of w * BCE; 0.5 L_GC + 0.5 L_RD."""
    c = logits.shape[1]
    target = F.one_hot(labels, c).to(logits.dtype)
    g = (torch.sigmoid(logits.detach()).gather(1, labels[:, None]).squeeze(1) - 1).abs()
    w = torch.ones_like(g)
    if len(old_classes):
        old = torch.isin(labels, old_classes)
        for group in (old, ~old):
            if group.any():
                w[group] = g[group] / g[group].mean()
    loss_gc = (w[:, None] * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).mean()
    if old_logits is None:
        return loss_gc
    target_rd = target.clone()
    target_rd[:, :old_logits.shape[1]] = torch.sigmoid(old_logits)
    return 0.5 * loss_gc + 0.5 * F.binary_cross_entropy_with_logits(logits, target_rd)


def test_relation_distillation_is_the_icarl_line(incremental):
    logits = make_logits((20, 6), seed=5, requires_grad=True)
    labels = torch.randint(0, 6, (20,), generator=torch.Generator().manual_seed(0))
    old_logits = make_logits((20, 4), seed=6)
    ours = fcl_ext.losses.RelationDistillationLoss()(logits, labels, old_logits)
    icarl = incremental.icarl_loss(logits, labels, old_logits)
    assert_close(ours, icarl)
    assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(icarl, logits)[0])
    # first task (no exemplars, no old model): GLFC's loss is iCaRL's plain BCE
    first = fcl_ext.losses.GLFCLoss()(logits, labels, torch.tensor([], dtype=torch.long), None)
    assert_close(first, incremental.icarl_loss(logits, labels, None))


def test_glfc_loss_equals_the_glfc_code_lines(incremental):
    logits = make_logits((24, 6), seed=7, requires_grad=True)
    labels = torch.randint(0, 6, (24,), generator=torch.Generator().manual_seed(1))
    old_classes = torch.tensor([0, 1, 2, 3])
    old_logits = make_logits((24, 4), seed=8)
    ours = fcl_ext.losses.GLFCLoss()(logits, labels, old_classes, old_logits)
    ref = glfc_code_loss(logits, labels, old_classes, old_logits)
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def test_three_line_switch_trains_like_the_glfc_code(incremental):
    ours = incremental.train("glfc", epochs=3, dtype=torch.float64)
    ref = incremental.train("glfc", epochs=3, dtype=torch.float64, criterion=glfc_code_loss)
    assert ours["accuracy"] == ref["accuracy"]
    for p, q in zip(ours["model"].parameters(), ref["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    icarl = incremental.train("icarl", epochs=3, dtype=torch.float64)
    assert not torch.equal(icarl["model"].fc.weight, ours["model"].fc.weight)  # a different loss indeed


def test_class_incremental_main_runs(incremental, capsys):
    incremental.main(["--epochs", "2"])
    out = capsys.readouterr().out
    assert "icarl" in out and "glfc" in out


# ---- privacy audit ---------------------------------------------------------------------------

def test_audit_equals_the_dlg_loop(audit):
    x, y = audit.private_images(3)
    model = audit.own_model(x, y, steps=5)
    init = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    report = audit.audit(model, x, y, steps=3, max_iter=5, init=init)
    loop = audit.audit_one_by_one(model, x, y, init, steps=3, max_iter=5)
    assert torch.equal(report["labels"], y)  # recovered from the gradients (iDLG)
    assert ((report["images"] - loop).norm() / loop.norm()).item() < 1e-6


def test_audit_flags_leaking_images(audit, capsys):
    report = audit.main(["--images", "2", "--steps", "8"])
    assert report["psnr"].shape == (2,) and torch.isfinite(report["psnr"]).all()
    # a float64 LeNet leaks its single-sample gradients: the audit says so
    assert report["leaks"].all(), report["psnr"]
    assert "LEAKS" in capsys.readouterr().out


# ---- torch.compile ---------------------------------------------------------------------------

def test_compiled_step_has_no_graph_breaks(compiled):
    assert compiled.graph_breaks() == 0


def test_compiled_step_equals_eager(compiled):
    torch._dynamo.reset()
    eager, eager_model = compiled.train(False, steps=2)
    fused, fused_model = compiled.train(True, steps=2, backend="aot_eager")  # fullgraph=True inside
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    for p, q in zip(fused_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_with_inductor(compiled):
    torch._dynamo.reset()
    eager, _ = compiled.train(False, steps=2)
    fused, _ = compiled.train(True, steps=2, backend="inductor")
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-4, atol=1e-5)
