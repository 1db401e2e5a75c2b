"""`make demo`: show the build, time a fused op against its reference, then run the
trainers' offline demo presets (when they are installed) and print their tables."""
import importlib
import json
import sys
import time

import torch

import fcl_ext


def _median_time(fn, repeats=20):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def ops_demo():
    print("fcl_ext build:")
    print(json.dumps(fcl_ext.info(), indent=2))
    torch.manual_seed(0)
    logits = (torch.randn(1024, 1000) * 3).requires_grad_()

    def fused():
        return torch.autograd.grad(fcl_ext.ops.softmax_entropy(logits, eps=1e-5), logits)

    def reference():
        return torch.autograd.grad(fcl_ext.reference.softmax_entropy(logits, eps=1e-5), logits)

    diff = (fcl_ext.ops.softmax_entropy(logits, reduction="none", eps=1e-5)
            - fcl_ext.reference.softmax_entropy(logits, reduction="none", eps=1e-5)).abs().max().item()
    t_fused, t_ref = _median_time(fused), _median_time(reference)
    print(f"\nsoftmax_entropy (eps=1e-5) on a [1024, 1000] batch, forward+backward on the CPU:")
    print(f"  fcl_ext {t_fused * 1e3:.2f} ms, reference {t_ref * 1e3:.2f} ms, "
          f"ratio {t_fused / t_ref:.2f}x, max |diff| {diff:.2e}")


def trainer_demos():
    try:
        cli = importlib.import_module("python_api.cli")
    except ImportError:
        print("\n(the trainers are not part of this build yet)")
        return 0
    rc = 0
    for method, preset in (("glfc", "glfc-demo"), ("fccl", "fccl-demo")):
        print(f"\n=== fcl-ext train {method} --config {preset} ===", flush=True)
        try:
            cli.main(["train", method, "--config", preset])
        except SystemExit as exc:  # argparse / trainer errors
            if exc.code:
                print(f"{method} demo failed: {exc}", file=sys.stderr)
                rc = 1
    return rc


def main():
    ops_demo()
    sys.exit(trainer_demos())


if __name__ == "__main__":
    main()
