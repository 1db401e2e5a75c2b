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
    reconstruction        the gradient matching itself (inside proxy_reconstruction)
    monitor_evaluation    the aggregated model on the proxy's monitor set (inside proxy_reconstruction)
    aggregation           FedAvg of the updates
    evaluation            the global model on the test set (GLFC); every participant on every test set (FCCL)
    public_alignment      FCCL: logits on the public batches and the collaborative (cross-correlation) steps
    distillation          FCCL: the two teachers' logits on the private data (inside local_training)

Sampling (`fcl-ext estimate`): inside `with sampling(n):` every loop wrapped in `batches(name, it, total)` (or
`loop(name, total)`) runs only its first n items, and records its time with the items run and the items a
full run has, so the estimate scales each loop to its full length (`pop_details()`). Outside it, nothing is
cut and the loops run as written.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections import defaultdict

__all__ = ["phase", "pop_round", "pop_details", "add", "peak_rss_mb", "LOG_AFTER_S", "format_table", "TOP_LEVEL",
           "sampling", "sample_limit", "loop", "batches", "stack", "nested_in", "ONE_TIME"]

LOG_AFTER_S = 10.0

_local = threading.local()
_sample_limit = None   # items per loop while an estimate samples (module-wide: forked workers inherit it)
_sample_min_s = 0.0    # ... and iterated loops go on past it until they have run this long (cheap items are noisy)
_sample_max_s = None   # ... but stop after any item once they have run this long (full-size items are slow)


def _totals() -> dict:
    if not hasattr(_local, "totals"):
        _local.totals = defaultdict(float)
        _local.counts = defaultdict(int)
        _local.paths = defaultdict(float)      # "local_training/entropy" -> seconds (nesting kept)
        _local.loops = {}                      # "refresh/entropy/batches" -> [seconds, items run, items in full,
                                               #   seconds of the loops' first items, loops timed item by item]
        _local.stack = []
    return _local.totals


@contextlib.contextmanager
def phase(name: str, detail: str = ""):
    totals = _totals()
    _local.stack.append(name)
    path = "/".join(_local.stack)
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        _local.stack.pop()
        totals[name] += took
        _local.counts[name] += 1
        _local.paths[path] += took
        if took >= LOG_AFTER_S:
            print(f"[phase] {name}{' ' + detail if detail else ''}: {took:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def sampling(items: int, min_seconds: float = 0.0, max_seconds: float = None):
    """Loops run only their first `items` items (and record how many a full run has) inside this block; an
    iterated loop (`batches`) goes on until it has also run `min_seconds`, so cheap items are timed over
    more of them, and stops after any item once it has run `max_seconds` (None: no such stop)."""
    global _sample_limit, _sample_min_s, _sample_max_s
    if items < 1:
        raise ValueError(f"sampling: items must be >= 1, got {items}")
    saved = _sample_limit, _sample_min_s, _sample_max_s
    _sample_limit, _sample_min_s, _sample_max_s = int(items), float(min_seconds), max_seconds
    try:
        yield
    finally:
        _sample_limit, _sample_min_s, _sample_max_s = saved


def stack() -> list:
    """The phases open now, outermost first (a worker process handles a message inside its sender's)."""
    _totals()
    return list(_local.stack)


@contextlib.contextmanager
def nested_in(phases: list):
    """Phases opened in this block are recorded as nested in `phases` (the sender's open phases)."""
    _totals()
    saved, _local.stack = _local.stack, list(phases)
    try:
        yield
    finally:
        _local.stack = saved


def sample_limit():
    """The items per loop while sampling, else None."""
    return _sample_limit


@contextlib.contextmanager
def loop(name: str, total: int):
    """Yields how many of a loop's `total` items to run (all unless sampling) and records the loop's time."""
    _totals()
    ran = total if _sample_limit is None else min(int(total), _sample_limit)
    path = "/".join(_local.stack + [name])
    start = time.perf_counter()
    try:
        yield ran
    finally:
        if _sample_limit is not None:
            _record_loop(path, time.perf_counter() - start, ran, total)


def _record_loop(path: str, seconds: float, ran: int, total: int, first: float = 0.0, timed: int = 0) -> None:
    entry = _local.loops.setdefault(path, [0.0, 0, 0, 0.0, 0])
    for i, value in enumerate((seconds, ran, int(total), first, timed)):
        entry[i] += value


def full_loop_seconds(seconds: float, ran: int, total: int, first: float = 0.0, timed: int = 0) -> tuple:
    """(a sampled loop's time at full length, its warm-up). Loops timed item by item (`timed` of them) are
    scaled by their later items; what their first items took beyond that is warm-up (the first forward of
    a shape, the first backward), paid once in a run, not per loop. Else: scaled as a whole, no warm-up."""
    if not ran:
        return 0.0, 0.0
    if timed and ran > timed:
        per_item = (seconds - first) / (ran - timed)
        return total * per_item, max(first - timed * per_item, 0.0)
    return seconds * total / ran, 0.0


def batches(name: str, iterable, total: int):
    """`iterable` (of `total` items) cut to its first items while sampling, timed as loop `name`."""
    if _sample_limit is None:
        yield from iterable
        return
    _totals()
    path = "/".join(_local.stack + [name])
    start, ran, first = time.perf_counter(), 0, None
    try:
        for item in iterable:
            took = time.perf_counter() - start
            if ran == 1:
                first = took
            if (ran >= _sample_limit and took >= _sample_min_s) or \
                    (ran and _sample_max_s is not None and took >= _sample_max_s):
                break
            ran += 1
            yield item
    finally:
        took = time.perf_counter() - start
        _record_loop(path, took, ran, total, took if first is None else first, 1 if ran else 0)


def add(times: dict, counts: dict = None, details: dict = None) -> None:
    """Merge phase times measured elsewhere (a worker process) into this process's totals."""
    totals = _totals()
    for name, seconds in times.items():
        totals[name] += seconds
        _local.counts[name] += (counts or {}).get(name, 1)
    for path, seconds in (details or {}).get("paths", {}).items():
        _local.paths[path] += seconds
    for path, entry in (details or {}).get("loops", {}).items():
        _record_loop(path, *entry)


def pop_round(with_counts: bool = False):
    """The phase totals since the last call (and reset them)."""
    totals = _totals()
    out, counts = {k: round(v, 4) for k, v in totals.items()}, dict(_local.counts)
    totals.clear()
    _local.counts.clear()
    return (out, counts) if with_counts else out


def pop_details() -> dict:
    """{"paths": seconds by nesting path, "loops": [seconds, run, full, first items' seconds, loops timed item
    by item] by path} since the last call (reset)."""
    _totals()
    out = {"paths": {k: round(v, 4) for k, v in _local.paths.items()},
           "loops": {k: [round(v[0], 4), v[1], v[2], round(v[3], 4), v[4]] for k, v in _local.loops.items()}}
    _local.paths.clear()
    _local.loops.clear()
    return out


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
TOP_LEVEL = ("local_training", "refresh", "public_alignment", "proxy_reconstruction", "aggregation", "evaluation",
             "other")


# phases paid once per client, not per round (a participant's construction and pretraining on first contact)
ONE_TIME = ("client_setup",)


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
