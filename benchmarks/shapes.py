"""The one place benchmark shapes live. Each op lists (label, kwargs) per device.

`smoke` shapes are what `make test` runs with --benchmark-disable: tiny, to prove the
harness works without spending CI time.
"""

SHAPES = {
    "softmax_entropy": {
        "cpu": [("B=1024,C=1000", dict(B=1024, C=1000)), ("B=4096,C=100", dict(B=4096, C=100)),
                ("B=256,C=10", dict(B=256, C=10))],
        "cuda": [("B=1024,C=1000", dict(B=1024, C=1000)), ("B=65536,C=1000", dict(B=65536, C=1000)),
                 ("B=16384,C=100", dict(B=16384, C=100))],
        "smoke": [("B=8,C=5", dict(B=8, C=5))],
    },
    # FCCL collaborative loss (B = 512 public batch, K = classes; target detached) and Barlow Twins
    # (projector width D, both views trained). The big Barlow Twins shapes are CUDA-only.
    "cross_correlation": {
        "cpu": [("fccl B=512,K=10", dict(B=512, K=10, form="fccl")),
                ("fccl B=512,K=65", dict(B=512, K=65, form="fccl")),
                ("barlow B=256,D=2048", dict(B=256, K=2048, form="barlow"))],
        "cuda": [("fccl B=512,K=10", dict(B=512, K=10, form="fccl")),
                 ("fccl B=512,K=65", dict(B=512, K=65, form="fccl")),
                 ("barlow B=256,D=2048", dict(B=256, K=2048, form="barlow")),
                 ("barlow B=2048,D=2048", dict(B=2048, K=2048, form="barlow")),
                 ("barlow B=256,D=8192", dict(B=256, K=8192, form="barlow")),
                 ("barlow B=2048,D=8192", dict(B=2048, K=8192, form="barlow"))],
        "smoke": [("fccl B=6,K=3", dict(B=6, K=3, form="fccl")), ("barlow B=6,D=5", dict(B=6, K=5, form="barlow"))],
    },
    # FCCL local objective: N private samples, C classes, both teachers.
    "dual_distillation": {
        "cpu": [(f"N={n},C={c}", dict(N=n, C=c)) for n in (512, 4096) for c in (10, 65, 1000)],
        "cuda": [(f"N={n},C={c}", dict(N=n, C=c)) for n in (512, 4096) for c in (10, 65, 1000)],
        "smoke": [("N=6,C=5", dict(N=6, C=5))],
    },
}


def shapes_for(op: str, device: str, smoke: bool):
    table = SHAPES[op]
    return table["smoke"] if smoke else table[device]
