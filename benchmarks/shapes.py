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
}


def shapes_for(op: str, device: str, smoke: bool):
    table = SHAPES[op]
    return table["smoke"] if smoke else table[device]
