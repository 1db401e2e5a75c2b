import torch

# Deterministic, small-thread-count runs: CI has 2 cores.
torch.manual_seed(0)
