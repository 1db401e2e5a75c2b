"""Where the time of a small fused-op call goes: the kernels alone against the whole autograd call.

    python -m benchmarks.call_overhead [--threads N]

For the CPU shapes where the fused op is not faster than torch.compile (docs/perf/NOTES.md), prints the
median of: the forward op alone (torch.ops.fcl_ext.*), its private backward op alone, the public
function's forward + torch.autograd.grad, and the same through torch.compile of the reference. The
difference between the third and the sum of the first two is the per-call cost of the Python wrapper and
the torch.library autograd layer, which a compiled graph does not pay.
"""
import argparse
import statistics
import time

import torch

import fcl_ext
from fcl_ext import ops, reference


def median_us(fn, seconds=0.5, min_calls=30):
    for _ in range(5):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def grad_of(fn, x):
    def call():
        torch.autograd.grad(fn(x).sum(), [x])
    return call


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for B, C, eps in ((256, 10, 0.0), (256, 10, 1e-5), (4096, 100, 1e-5)):
        x = torch.randn(B, C, generator=g)
        _, stats = torch.ops.fcl_ext.softmax_entropy(x, eps)
        go = torch.ones(B)
        out.append((f"softmax_entropy B={B},C={C},eps={eps:g}", x,
                    lambda x, eps=eps: torch.ops.fcl_ext.softmax_entropy(x, eps),
                    lambda x=x, go=go, stats=stats, eps=eps: torch.ops.fcl_ext._softmax_entropy_backward(go, x, stats, eps),
                    lambda x, eps=eps: ops.softmax_entropy(x, eps=eps, reduction="sum"),
                    lambda x, eps=eps: reference.softmax_entropy(x, eps=eps, reduction="sum")))
    for N, C in ((512, 65), (4096, 10)):
        s, t1, t2 = (torch.randn(N, C, generator=g) for _ in range(3))
        y = torch.randint(0, C, (N,), generator=g)
        loss, stats = torch.ops.fcl_ext.dual_distillation_loss(s, y, t1, t2, 1.0, 1.0, 1.0, 1.0)[:2]
        out.append((f"dual_distillation N={N},C={C}", s,
                    lambda s, y=y, t1=t1, t2=t2: torch.ops.fcl_ext.dual_distillation_loss(s, y, t1, t2, 1.0, 1.0, 1.0, 1.0),
                    lambda s=s, y=y, t1=t1, t2=t2, loss=loss, stats=stats: torch.ops.fcl_ext._dual_distillation_backward(
                        torch.ones_like(loss), s, y, t1, t2, stats, 1.0, 1.0, 1.0, 1.0),
                    lambda s, y=y, t1=t1, t2=t2: ops.dual_distillation_loss(s, y, t1, t2),
                    lambda s, y=y, t1=t1, t2=t2: reference.dual_distillation_loss(s, y, t1, t2)))
    for metric in ("cosine", "l2"):
        gr, tg = torch.randn(1024, 1000, generator=g), torch.randn(1024, 1000, generator=g)
        _, stats = torch.ops.fcl_ext.gradient_matching_loss(gr, tg, metric)
        out.append((f"gradient_matching {metric} K=1024,P=1000", gr,
                    lambda x, tg=tg, metric=metric: torch.ops.fcl_ext.gradient_matching_loss(x, tg, metric),
                    lambda gr=gr, tg=tg, stats=stats, metric=metric: torch.ops.fcl_ext._gradient_matching_loss_backward(
                        torch.ones(1024), gr, tg, stats, metric),
                    lambda x, tg=tg, metric=metric: ops.gradient_matching_loss(x, tg, metric=metric),
                    lambda x, tg=tg, metric=metric: reference.gradient_matching_loss(x, tg, metric=metric)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fcl_ext {fcl_ext.info().get('version', '')}")
    print("| case | fwd kernel | bwd kernel | ours fwd+bwd | wrapper + autograd | compiled fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for name, x, fwd_op, bwd_op, ours, ref in cases():
        leaf = x.clone().requires_grad_()
        torch._dynamo.reset()
        compiled = torch.compile(ref, dynamic=False)
        k_f, k_b = median_us(lambda: fwd_op(x)), median_us(bwd_op)
        whole, comp = median_us(grad_of(ours, leaf)), median_us(grad_of(compiled, leaf))
        print(f"| {name} | {k_f:.1f} µs | {k_b:.1f} µs | {whole:.1f} µs | {whole - k_f - k_b:.1f} µs | {comp:.1f} µs |")


if __name__ == "__main__":
    main()
