"""The shared fixtures in tests/conftest.py: order-independent global RNG inputs and thread count restored.
The tests run in file order; the second and third check what the first one left behind."""
import random

import torch

_SEEN: dict = {}


def test_a_test_that_draws_from_the_global_rngs_and_changes_threads():
    _SEEN["threads"] = torch.get_num_threads()
    _SEEN["draw"] = (torch.rand(3), random.random())
    torch.rand(1000)                           # moves the global stream on
    torch.set_num_threads(_SEEN["threads"] + 1)   # a change, whatever the count was (run.threads does this)


def test_the_next_test_gets_the_threads_back():
    assert "threads" in _SEEN and torch.get_num_threads() == _SEEN["threads"]


def test_the_next_test_draws_the_same_inputs():
    x, r = torch.rand(3), random.random()
    assert torch.equal(x, _SEEN["draw"][0]) and r == _SEEN["draw"][1]
