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
}


def shapes_for(op: str, device: str, smoke: bool):
    table = SHAPES[op]
    return table["smoke"] if smoke else table[device]
