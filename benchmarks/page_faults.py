"""Minor page faults and kernel time of ResNet-18 SGD steps, with and without run.keep_freed_memory.

    python -m benchmarks.page_faults default     # glibc's defaults
    python -m benchmarks.page_faults keep        # profiling.keep_freed_memory() first
"""
import resource
import sys

import torch
import torch.nn.functional as F

from python_api import profiling
from python_api.models import build_model


def main(mode: str, steps: int = 3) -> None:
    if mode == "keep":
        assert profiling.keep_freed_memory(), "mallopt is not available here"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet18", 100, width=64, in_channels=3)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 100, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        out = model(x)
        out = out if torch.is_tensor(out) else out[0]
        loss = F.cross_entropy(out[:, :100], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    step()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    losses = [step() for _ in range(steps)]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{mode}: {(r1.ru_minflt - r0.ru_minflt) / steps:.0f} minor faults/step, system {r1.ru_stime - r0.ru_stime:.2f} s, "
          f"user {r1.ru_utime - r0.ru_utime:.2f} s over {steps} steps, peak RSS {r1.ru_maxrss // 1024} MB, "
          f"last loss {losses[-1]!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default")
