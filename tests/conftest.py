"""Shared fixtures: every test starts from the same global RNG state and leaves torch's thread count
as it found it, so a test's inputs do not depend on which tests ran before it, and a test (or a run it
starts: run.threads) does not leave the tests after it on one thread."""
import random

import numpy as np
import pytest
import torch

from tests.testing import register_hypothesis_profiles

SEED = 0


def seed_global_rngs(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def isolated_global_state():
    threads = torch.get_num_threads()
    seed_global_rngs()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for this test (tiny models run fastest so on a shared CPU); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Hypothesis profiles for the property tests (tests/testing.py): "fast" by default,
# FCL_EXT_HYPOTHESIS=large for the big run (tests/test_properties_large.py, -m slow).
register_hypothesis_profiles()
