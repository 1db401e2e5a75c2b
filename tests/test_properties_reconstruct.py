"""Property-based tests of fcl_ext.reconstruct's building blocks (issue 17): for random
encoders (image size, channels, classes, seed) and images, the batched per-sample gradients
equal autograd's one sample at a time (float64 at 1e-12), iDLG recovers every label, and the
argument checks name the bad argument. Example counts: the hypothesis profile."""
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fcl_ext import reconstruct
from tests.properties import assert_like_twin, assert_rejected, fast_examples, tensor


@st.composite
def encoder_and_images(draw):
    channels, size, classes = draw(st.integers(1, 3)), draw(st.integers(4, 10)), draw(st.integers(2, 10))
    encoder = reconstruct.LeNetEncoder(channels, size, classes, seed=draw(st.integers(0, 2 ** 16))).double()
    k = draw(st.integers(1, 3))
    images = tensor((k, channels, size, size), scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
                    seed=draw(st.integers(0, 2 ** 16)))
    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=k, max_size=k)))
    return encoder, images, labels


@fast_examples(4)
@given(case=encoder_and_images())
def test_batched_gradients_equal_autograd_per_sample(case):
    encoder, images, labels = case
    flat = reconstruct.encode_gradients(encoder, images, labels)
    layered = reconstruct.per_sample_gradients(encoder, images, labels)
    rows = []
    for x, y in zip(images, labels):
        loss = F.cross_entropy(encoder(x[None]), y[None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(encoder.parameters()))]))
    expected = torch.stack(rows)
    assert_like_twin(flat, expected, torch.float64, cond=10.0, what="encode_gradients")
    assert_like_twin(layered, expected, torch.float64, cond=10.0, what="per_sample_gradients")
    # iDLG: only the true class's fc-weight-gradient row sums below zero (sigmoid features > 0)
    assert torch.equal(reconstruct.recover_labels(flat, encoder), labels)
    assert torch.equal(reconstruct.recover_labels(reconstruct.split_gradients(flat, encoder)), labels)


@fast_examples(4)
@given(case=encoder_and_images(), bad=st.sampled_from(["labels_range", "labels_float", "target_cols", "steps",
                                                       "keep_last", "lr", "metric", "init"]))
def test_invalid_reconstruction_arguments_name_the_argument(case, bad):
    encoder, images, labels = case
    target = reconstruct.encode_gradients(encoder, images, labels)
    kwargs = {"steps": 1, "keep_last": 1}
    args = [encoder, target, labels]
    name = bad.split("_")[0] if bad.startswith("labels") else bad
    if bad == "labels_range":
        args[2] = labels + encoder.num_classes
    elif bad == "labels_float":
        args[2] = labels.double()
    elif bad == "target_cols":
        args[1], name = target[:, :-1], "target_grads"
    else:
        kwargs[bad] = {"steps": 0, "keep_last": -1, "lr": float("nan"), "metric": "l1", "init": "zeros"}[bad]
    assert_rejected(lambda: reconstruct.reconstruct_from_gradients(*args, **kwargs), name, bad)
