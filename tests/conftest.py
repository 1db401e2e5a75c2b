import os

import torch
from hypothesis import HealthCheck, settings

# Deterministic, small-thread-count runs: CI has 2 cores.
torch.manual_seed(0)

# Property tests (tests/test_properties_*.py) take their example counts from a profile:
# "fast" (default, part of `make test`: derandomized, a few dozen examples per test) or
# "large" (FCL_EXT_HYPOTHESIS=large; tests/test_properties_large.py runs every property module
# with it under -m slow). Tests with their own @settings keep theirs.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("fast", max_examples=12, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_HEALTH)
settings.register_profile("large", max_examples=300, deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("FCL_EXT_HYPOTHESIS", "fast"))
