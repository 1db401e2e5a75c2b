"""Phase timing of a round, and the cost projection of a whole run (`fcl-ext estimate`).

    with profiling.phase("local_training"):     # anywhere in a method; nested phases are timed on their own
        ...
    times = profiling.pop_round()               # {phase: seconds} since the last pop (the runner stores it
                                                # as record["phase_times_s"] in metrics.json)

A phase longer than `LOG_AFTER_S` prints one line to stderr when it ends, progress bars or not, so a long
round shows what it is doing. Phase names used by the trainers:

    local_training        a selected client's local update (all epochs)
    refresh               an unselected client's refresh (entropy pass, herding when its signal fires)
    entropy, herding      the parts of both (inside local_training / refresh)
    prototype_encoding    a client's perturbed prototypes and their gradients (GLFC)
    proxy_reconstruction  the proxy server's reconstruction and old-model choice (GLFC)
    aggregation           FedAvg of the updates
    evaluation            the global model on the test set
"""
from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections import defaultdict

__all__ = ["phase", "pop_round", "add", "peak_rss_mb", "LOG_AFTER_S", "format_table", "TOP_LEVEL"]

LOG_AFTER_S = 10.0

_local = threading.local()


def _totals() -> dict:
    if not hasattr(_local, "totals"):
        _local.totals = defaultdict(float)
        _local.counts = defaultdict(int)
    return _local.totals


@contextlib.contextmanager
def phase(name: str, detail: str = ""):
    totals = _totals()
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        totals[name] += took
        _local.counts[name] += 1
        if took >= LOG_AFTER_S:
            print(f"[phase] {name}{' ' + detail if detail else ''}: {took:.1f} s", file=sys.stderr, flush=True)


def add(times: dict, counts: dict = None) -> None:
    """Merge phase times measured elsewhere (a worker process) into this process's totals."""
    totals = _totals()
    for name, seconds in times.items():
        totals[name] += seconds
        _local.counts[name] += (counts or {}).get(name, 1)


def pop_round(with_counts: bool = False):
    """The phase totals since the last call (and reset them)."""
    totals = _totals()
    out, counts = {k: round(v, 4) for k, v in totals.items()}, dict(_local.counts)
    totals.clear()
    _local.counts.clear()
    return (out, counts) if with_counts else out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and of finished children) in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def format_table(rows: list, header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# the phases that do not overlap (the others are parts of them); their sum is the round's cost
TOP_LEVEL = ("local_training", "refresh", "proxy_reconstruction", "aggregation", "evaluation", "other")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory mapped (glibc only; returns whether it applied).

    glibc hands every block over its mmap threshold (at most 32 MiB) to a fresh mmap and unmaps it on free,
    so each training step's activations (a ResNet-18 batch of 128 at 32x32 holds 33.5 MiB tensors) are
    mapped and page-faulted anew: 576k minor faults per step, 5.1 s of kernel time against 16.6 s of
    user time over 3 steps (docs/performance.md). Taking them from the heap and not trimming it makes the memory reused:
    27k faults, 0.2 s; the peak resident memory grows (1.66 -> 1.96 GB there). Values are unchanged."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
