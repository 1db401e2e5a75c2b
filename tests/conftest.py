import torch

from tests.testing import register_hypothesis_profiles

# Deterministic, small-thread-count runs: CI has 2 cores.
torch.manual_seed(0)

# Hypothesis profiles for the property tests (tests/testing.py): "fast" by default,
# FCL_EXT_HYPOTHESIS=large for the big run (tests/test_properties_large.py, -m slow).
register_hypothesis_profiles()
