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
    # glfc_loss with old logits (C_old = C/2) and half the classes old; the main CPU shape first.
    "glfc_loss": {
        "cpu": [(f"N={n},C={c}", dict(N=n, C=c)) for n, c in
                ((1024, 1000), (128, 100), (128, 1000), (1024, 100), (8192, 100), (8192, 1000))],
        "cuda": [(f"N={n},C={c}", dict(N=n, C=c)) for n in (128, 1024, 8192) for c in (100, 1000)],
        "smoke": [("N=8,C=6", dict(N=8, C=6))],
    },
    # GLFC's LeNet encoder: P = 85036 parameters per gradient; ~60 gradients per task change.
    "gradient_matching_loss": {
        "cpu": [("K=60,P=85036", dict(K=60, P=85036)), ("K=6,P=85036", dict(K=6, P=85036)),
                ("K=1024,P=1000", dict(K=1024, P=1000))],
        "cuda": [("K=60,P=85036", dict(K=60, P=85036)), ("K=600,P=85036", dict(K=600, P=85036)),
                 ("K=1024,P=1000", dict(K=1024, P=1000))],
        "smoke": [("K=3,P=17", dict(K=3, P=17))],
    },
    # Two-loop recursion: D = 3*32*32 pixels, a full history of M = 100 pairs.
    "lbfgs_direction": {
        "cpu": [("K=6,M=100,D=3072", dict(K=6, M=100, D=3072)), ("K=60,M=100,D=3072", dict(K=60, M=100, D=3072))],
        "cuda": [("K=60,M=100,D=3072", dict(K=60, M=100, D=3072))],
        "smoke": [("K=2,M=3,D=11", dict(K=2, M=3, D=11))],
    },
    # Whole reconstructions, batched vs the sequential per-problem torch.optim.LBFGS loop.
    # The sequential K=60 run is long on a CPU (~60 x 250 x 20 closures): the CPU list uses
    # 20 steps and K in {1, 6}; FCL_EXT_BENCH_RECONSTRUCT_FULL=1 adds K=60 (see the bench file).
    "reconstruct": {
        "cpu": [("K=1,steps=20", dict(K=1, steps=20)), ("K=6,steps=20", dict(K=6, steps=20))],
        "cpu_full": [("K=60,steps=20", dict(K=60, steps=20)), ("K=6,steps=250", dict(K=6, steps=250)),
                     ("K=60,steps=250", dict(K=60, steps=250))],
        # On the GPU the sequential loop runs only at K=6 x 20 steps (minutes otherwise); gpu-check's summary
        # extrapolates it to K=60 x 250 (labelled as such) against the measured batched run.
        "cuda": [("K=6,steps=20", dict(K=6, steps=20)), ("K=60,steps=250", dict(K=60, steps=250))],
        "smoke": [("K=2,steps=2", dict(K=2, steps=2, image_size=8, classes=5))],
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
