"""Batched gradient-matching reconstruction (fcl_ext.reconstruct): the encoder, per-sample
gradients, iDLG label recovery, BatchedLBFGS == torch.optim.LBFGS per problem, NaN
isolation, and a real-image reconstruction."""
import math

import pytest
import torch
import torch.nn.functional as F

from fcl_ext.reconstruct import (BatchedLBFGS, LeNetEncoder, encode_gradients, parameter_layout,
                                 per_sample_gradients, psnr, reconstruct_from_gradients,
                                 reconstruct_sequential_reference, recover_labels, split_gradients)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Latency-bound small ops: a second OpenMP thread only adds spin-waits on a shared CI box.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def small_problem(k, *, image_size=8, classes=5, channels=3, seed=0, dtype=torch.float64):
    enc = LeNetEncoder(channels, image_size, classes, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    images = torch.rand(k, channels, image_size, image_size, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (k,), generator=gen)
    return enc, images, labels, encode_gradients(enc, images, labels)


def relative_error(a, b):
    return ((a - b).flatten(2).norm(dim=2) / b.flatten(2).norm(dim=2)).max().item()


# ---- encoder and gradients ---------------------------------------------------------

def test_lenet_matches_glfc_shapes_and_init():
    enc = LeNetEncoder(seed=3)
    shapes = [tuple(p.shape) for p in enc.parameters()]
    assert shapes == [(12, 3, 5, 5), (12,), (12, 12, 5, 5), (12,), (12, 12, 5, 5), (12,), (100, 768), (100,)]
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    for p in enc.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5
        assert p.std() > 0.2  # U(-0.5, 0.5) has std 0.289, default init would be far smaller
    same = LeNetEncoder(seed=3)
    other = LeNetEncoder(seed=4)
    assert all(torch.equal(a, b) for a, b in zip(enc.parameters(), same.parameters()))
    assert not torch.equal(enc.fc.weight, other.fc.weight)


def test_lenet_generalises_sizes_and_classes():
    enc = LeNetEncoder(1, 28, 10)
    assert enc.fc.in_features == 12 * 7 * 7
    assert enc(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    enc = LeNetEncoder(3, (64, 48), 200)
    assert enc(torch.rand(1, 3, 64, 48)).shape == (1, 200)
    with pytest.raises(ValueError, match="num_classes"):
        LeNetEncoder(3, 32, 0)


@pytest.mark.parametrize("image_size", [8, 15, 32])
def test_encode_gradients_match_per_sample_autograd(image_size):
    enc, images, labels, grads = small_problem(4, image_size=image_size, classes=7)
    params = list(enc.parameters())
    for k in range(4):
        loss = F.cross_entropy(enc(images[k:k + 1]), labels[k:k + 1])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(grads[k], expected, rtol=1e-10, atol=1e-12)
    # the hand-written, double-differentiable version gives the same numbers
    torch.testing.assert_close(per_sample_gradients(enc, images, labels), grads, rtol=1e-10, atol=1e-12)
    layout = parameter_layout(enc)
    assert layout[-1].stop == grads.shape[1]
    blocks = split_gradients(grads, enc)
    assert [tuple(b.shape[1:]) for b in blocks] == [tuple(p.shape) for p in params]


def test_per_sample_gradients_are_twice_differentiable():
    enc, images, labels, target = small_problem(2, image_size=8, classes=4)
    x = images.clone().requires_grad_(True)

    def f(x):
        return (per_sample_gradients(enc, x, labels) - target).pow(2).sum()

    assert torch.autograd.gradcheck(f, (x,), atol=1e-6)


def test_recover_labels_is_exact_on_encoder_gradients():
    enc = LeNetEncoder(seed=0)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(24, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 100, (24,), generator=gen)
    grads = encode_gradients(enc, images, labels)
    assert torch.equal(recover_labels(grads, enc), labels)
    assert torch.equal(recover_labels(split_gradients(grads, enc)), labels)
    with pytest.raises(ValueError, match="encoder"):
        recover_labels(grads)


# ---- BatchedLBFGS == torch.optim.LBFGS, problem by problem -----------------------------

def separable_objective(coeffs):
    """Problem k: f_k(x) = sum a_k (x - c_k)^2 + b_k sum (x - c_k)^4 + sin(x) . w_k (non-quadratic)."""
    a, b, c, w = coeffs

    def one(x, k):
        z = x - c[k]
        return (a[k] * z.pow(2)).sum() + b[k] * z.pow(4).sum() + (torch.sin(x) * w[k]).sum()

    def batched(x_rows, idx):
        x = x_rows.detach().requires_grad_(True)
        z = x - c[idx]
        loss = (a[idx] * z.pow(2)).sum(1) + b[idx, None].mul(z.pow(4)).sum(1) + (torch.sin(x) * w[idx]).sum(1)
        gx, = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), gx
    return one, batched


def make_coeffs(k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(k, d, generator=gen, dtype=torch.float64) * 2 + 0.1
    b = torch.rand(k, generator=gen, dtype=torch.float64) * 0.1
    c = torch.randn(k, d, generator=gen, dtype=torch.float64)
    w = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return a, b, c, w


def torch_lbfgs_run(one, x0, k, steps, **kw):
    x = x0[k].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], **kw)

    def closure():
        opt.zero_grad()
        loss = one(x, k)
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(x.detach().clone())
    return torch.stack(out), opt.state[x]


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kw", [dict(lr=1.0, max_iter=20, history_size=100),
                                dict(lr=0.1, max_iter=5, history_size=3),  # ring buffer wraps
                                dict(lr=0.5, max_iter=2, history_size=4)])  # max_eval == max_iter break
def test_batched_lbfgs_equals_torch_lbfgs_per_problem(k, kw):
    d, steps = 9, 6
    coeffs = make_coeffs(k, d, seed=k)
    one, batched = separable_objective(coeffs)
    x0 = torch.randn(k, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    opt = BatchedLBFGS(x0, **kw)
    trajectory = []
    for _ in range(steps):
        opt.step(batched)
        trajectory.append(opt.x.clone())
    trajectory = torch.stack(trajectory, 1)  # [K, steps, D]
    for i in range(k):
        expected, state = torch_lbfgs_run(one, x0, i, steps, **kw)
        torch.testing.assert_close(trajectory[i], expected, rtol=1e-6, atol=1e-9)
        assert int(opt.n_iter[i]) == state["n_iter"]
        assert int(opt.func_evals[i]) == state["func_evals"]
        assert int(opt.hist_len[i]) == len(state["old_dirs"])


def test_batched_lbfgs_early_breaks_follow_torch():
    # Problems that converge at different speeds: tolerance breaks fire at different inner
    # iterations and steps; the converged ones must stay frozen exactly as torch's do.
    k, d = 4, 3
    a = torch.tensor([[1.0] * d, [1e-3] * d, [5.0] * d, [0.5] * d], dtype=torch.float64)
    coeffs = (a, torch.zeros(k, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64),
              torch.zeros(k, d, dtype=torch.float64))
    one, batched = separable_objective(coeffs)
    x0 = torch.randn(k, d, dtype=torch.float64)
    opt = BatchedLBFGS(x0, lr=1.0, max_iter=20, history_size=10)
    for _ in range(5):
        opt.step(batched)
    for i in range(k):
        expected, state = torch_lbfgs_run(one, x0, i, 5, lr=1.0, max_iter=20, history_size=10)
        torch.testing.assert_close(opt.x[i], expected[-1], rtol=1e-6, atol=1e-9)
        assert int(opt.func_evals[i]) == state["func_evals"]
        assert int(opt.n_iter[i]) == state["n_iter"]


def test_nan_problem_rolls_back_and_does_not_disturb_the_others():
    k, d = 3, 5
    coeffs = make_coeffs(k, d, seed=2)
    one, batched = separable_objective(coeffs)
    calls = {"n": 0}

    def poisoned(x_rows, idx):
        loss, grad = batched(x_rows, idx)
        calls["n"] += 1
        if calls["n"] > 6:  # problem 1 turns NaN in the middle of a step
            hit = idx == 1
            loss = torch.where(hit, torch.full_like(loss, math.nan), loss)
            grad = torch.where(hit[:, None], torch.full_like(grad, math.nan), grad)
        return loss, grad

    x0 = torch.randn(k, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    opt = BatchedLBFGS(x0, lr=0.5, max_iter=10, history_size=20)
    seen = []  # (loss, x) of problem 1 while it was finite
    original_evaluate = opt._evaluate

    def spy(objective, rows):
        bad = original_evaluate(objective, rows)
        if (rows == 1).any() and not opt.stopped[1]:
            seen.append((float(opt._loss[1]), opt.x[1].clone()))
        return bad

    opt._evaluate = spy
    for _ in range(4):
        opt.step(poisoned)
    assert bool(opt.stopped[1]) and not opt.stopped[0] and not opt.stopped[2]
    best_loss, best_x = min(seen, key=lambda item: item[0])
    assert torch.equal(opt.x[1], best_x)
    assert math.isclose(float(opt.best_loss[1]), best_loss)
    for i in (0, 2):
        expected, _ = torch_lbfgs_run(one, x0, i, 4, lr=0.5, max_iter=10, history_size=20)
        torch.testing.assert_close(opt.x[i], expected[-1], rtol=1e-6, atol=1e-9)


# ---- reconstruction ------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 8])
def test_reconstruction_equals_sequential_torch_lbfgs(k):
    enc, _, labels, grads = small_problem(k, image_size=8, classes=5, seed=k)
    x0 = torch.randn(k, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(steps=3, keep_last=2, init=x0, history_size=30)
    fast = reconstruct_from_gradients(enc, grads, **kw)
    slow = reconstruct_sequential_reference(enc, grads, **kw)
    assert fast.images.shape == (k, 2, 3, 8, 8)
    assert torch.equal(fast.labels, labels)  # recovered by iDLG
    assert relative_error(fast.images, slow.images) < 1e-6
    torch.testing.assert_close(fast.losses, slow.losses, rtol=1e-6, atol=1e-12)
    assert torch.equal(fast.func_evals, slow.func_evals)
    assert fast.losses.max() < reconstruct_from_gradients(enc, grads, **dict(kw, steps=1)).losses.max()


@pytest.mark.parametrize("metric", ["cosine"])
def test_reconstruction_cosine_and_adam_equal_sequential(metric):
    enc, _, labels, grads = small_problem(3, image_size=8, classes=5, seed=11)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(steps=2, keep_last=1, init=x0, labels=labels, history_size=10)
    fast = reconstruct_from_gradients(enc, grads, metric=metric, **kw)
    slow = reconstruct_sequential_reference(enc, grads, metric=metric, **kw)
    assert relative_error(fast.images, slow.images) < 1e-6
    fast = reconstruct_from_gradients(enc, grads, optimizer="adam", **dict(kw, steps=15))
    slow = reconstruct_sequential_reference(enc, grads, optimizer="adam", **dict(kw, steps=15))
    assert relative_error(fast.images, slow.images) < 1e-6
    torch.testing.assert_close(fast.losses, slow.losses, rtol=1e-6, atol=1e-12)


def test_reconstruction_nan_target_is_isolated():
    enc, _, labels, grads = small_problem(3, image_size=8, classes=5, seed=5)
    bad = grads.clone()
    bad[1, :10] = math.nan
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(steps=2, keep_last=1, init=x0, labels=labels, history_size=10)
    poisoned = reconstruct_from_gradients(enc, bad, **kw)
    clean = reconstruct_from_gradients(enc, grads, **kw)
    assert poisoned.stopped.tolist() == [False, True, False]
    assert torch.equal(poisoned.images[1, -1], x0[1])  # never had a finite loss: back to the start
    for i in (0, 2):
        torch.testing.assert_close(poisoned.images[i], clean.images[i], rtol=0, atol=0)


def digits(k, size=16):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    d = sklearn_datasets.load_digits()
    images = torch.tensor(d.images[:k], dtype=torch.float32)[:, None] / 16.0
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False), torch.tensor(d.target[:k])


def test_reconstructs_real_digits_from_their_gradients():
    # Measured on reconstruct_sequential_reference (same seeds, float32, 10 steps):
    # losses 9e-8 .. 2.5e-5, PSNR 27 .. 66 dB. Start: loss ~1e1, PSNR ~ -2 dB.
    images, labels = digits(4)
    enc = LeNetEncoder(1, 16, 10, seed=0)
    grads = encode_gradients(enc, images, labels)
    result = reconstruct_from_gradients(enc, grads, steps=10, keep_last=3,
                                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.labels, labels)
    assert result.images.shape == (4, 3, 1, 16, 16)
    assert result.losses.max() < 1e-4
    assert psnr(result.images[:, -1], images).min() > 20


@pytest.mark.slow
def test_reconstructs_real_digits_like_the_sequential_reference():
    images, labels = digits(4)
    enc = LeNetEncoder(1, 16, 10, seed=0)
    grads = encode_gradients(enc, images, labels)
    kw = dict(steps=25, keep_last=1)
    fast = reconstruct_from_gradients(enc, grads, generator=torch.Generator().manual_seed(0), **kw)
    slow = reconstruct_sequential_reference(enc, grads, generator=torch.Generator().manual_seed(0), **kw)
    assert fast.losses.max() < 1e-6 and slow.losses.max() < 1e-6
    assert psnr(fast.images[:, -1], images).min() > 40


def test_reconstruct_arguments():
    enc, _, labels, grads = small_problem(2, image_size=8, classes=5)
    with pytest.raises(ValueError, match="optimizer"):
        reconstruct_from_gradients(enc, grads, optimizer="sgd")
    with pytest.raises(ValueError, match="metric"):
        reconstruct_from_gradients(enc, grads, metric="l1")
    with pytest.raises(ValueError, match="target_grads"):
        reconstruct_from_gradients(enc, grads[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        reconstruct_from_gradients(enc, grads, labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="init"):
        reconstruct_from_gradients(enc, grads, init=torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="init"):
        reconstruct_from_gradients(enc, grads, init="zeros")
    # list-of-layers target, float32 encoder with a float64 target (encoder is not mutated)
    enc32 = LeNetEncoder(3, 8, 5, seed=0)
    out = reconstruct_from_gradients(enc32, split_gradients(grads, enc), steps=1, keep_last=5,
                                     init="uniform", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 3, 8, 8) and out.images.dtype == torch.float64
    assert next(enc32.parameters()).dtype == torch.float32


def test_psnr():
    a = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert torch.isinf(psnr(a, a)).all()
    b = a + 0.1
    torch.testing.assert_close(psnr(b, a), torch.full((2,), 20.0, dtype=torch.float64))
    assert psnr(b.unsqueeze(1).expand(2, 5, 3, 4, 4), a.unsqueeze(1)).shape == (2, 5)
    torch.testing.assert_close(psnr(b * 255, a * 255, data_range=255.0), psnr(b, a))
