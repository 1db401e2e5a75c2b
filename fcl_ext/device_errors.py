"""Input errors found by the CUDA kernels, raised without a host sync on the hot path.

Some inputs can only be checked by looking at their values: class labels outside [0, C)
(glfc_loss and its GC-BCE / RD forms, dual_distillation_loss), a batch-constant column or a
column with a NaN or infinite entry with eps == 0 (cross_correlation_*), an L-BFGS history
index outside its buffer (lbfgs_direction).
On the CPU the kernels raise at once. On CUDA, raising would need a device-to-host copy on
every call (stalling the stream and breaking CUDA-graph capture), and a device-side assert
would poison the whole CUDA context. So the CUDA kernels instead

  * write NaN where the bad input is used (the row's loss and gradient, the direction), and
  * record the first such error (and a count) in a small per-device buffer.

`check_device_errors()` reads that buffer (one sync), clears it and raises
`DeviceInputError` naming the op, the argument, the index and the bad value. Call it where a
sync is cheap: at the end of an epoch or round, after a validation pass, in tests. The
buffer keeps the first error until it is checked; work on other streams must be synchronised
first. Call it once before capturing a CUDA graph (it allocates the buffer outside capture).
"""
import torch

__all__ = ["DeviceInputError", "check_device_errors", "take_device_errors"]

# Keep in sync with csrc/cuda/kernel_utils.cuh.
_SLOTS = ("code", "op", "index", "value", "bound", "what", "count")
_OPS = {1: "glfc_loss", 2: "dual_distillation_loss", 3: "cross_correlation", 4: "lbfgs_direction"}
LABEL_RANGE, CONSTANT_COLUMN, HISTORY_RANGE, NAN_COLUMN, TINY_STD_COLUMN = 1, 2, 3, 4, 5


class DeviceInputError(RuntimeError):
    """An invalid input that a CUDA kernel recorded (its outputs there are NaN)."""

    def __init__(self, message, record):
        super().__init__(message)
        self.record = record


def _cuda_devices(device):
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return []
        return [device if device.index is not None else torch.device("cuda", torch.cuda.current_device())]
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []  # no CUDA work has run in this process, so nothing can have been recorded
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _has_cuda_kernels():
    import fcl_ext
    return fcl_ext.info()["cuda_kernels"]


def take_device_errors(device=None):
    """Read and clear the recorded errors: a list of dicts (one per device with an error)."""
    if not _has_cuda_kernels():
        return []
    found = []
    for dev in _cuda_devices(device):
        raw = torch.ops.fcl_ext._take_device_errors(torch.empty(0, device=dev)).tolist()
        record = dict(zip(_SLOTS, raw))
        if record["code"] != 0:
            record["device"] = str(dev)
            found.append(record)
    return found


def describe(record) -> str:
    """The error message for one record from take_device_errors()."""
    op = _OPS.get(record["op"], f"op #{record['op']}")
    code, index, value, bound = record["code"], record["index"], record["value"], record["bound"]
    if code == LABEL_RANGE:
        what = f"labels[{index}] = {value} is outside the valid class range [0, {bound})"
        effect = "that row's loss and gradient are NaN"
    elif code == CONSTANT_COLUMN:
        what = (f"column {index} of {'ab'[record['what']]} is constant over the batch (zero variance), so "
                "standardising it divides by zero; pass eps > 0 (e.g. eps=1e-5) to allow constant columns")
        effect = "the matrix entries and loss that use it are NaN"
    elif code == NAN_COLUMN:
        what = (f"NaN in column {index} of {'ab'[record['what']]} (a NaN or infinite entry makes its variance NaN), "
                "so the correlation would be NaN")
        effect = "the matrix entries and loss that use it are NaN"
    elif code == TINY_STD_COLUMN:
        what = (f"column {index} of {'ab'[record['what']]} varies, but its standard deviation is so small that 1/std "
                "overflows the accumulation type; pass eps > 0 or compute in float64")
        effect = "the matrix entries and loss that use it are NaN"
    elif code == HISTORY_RANGE:
        name = "hist_start" if record["what"] == 1 else "hist_len"
        limit = f"[0, {bound})" if record["what"] == 1 else f"[0, {bound}]"
        what = f"{name}[{index}] = {value} is outside {limit} (M = {bound} history slots)"
        effect = "that problem's direction is NaN"
    else:
        what, effect = f"unknown error code {code} (index {index}, value {value}, bound {bound})", "outputs may be NaN"
    more = record["count"] - 1
    extra = f"; {more} more invalid input(s) were recorded since the last check" if more > 0 else ""
    return (f"fcl_ext: {op} on {record.get('device', 'cuda')}: {what} ({effect}){extra}. "
            "Recorded on the device and raised by fcl_ext.check_device_errors().")


def check_device_errors(device=None) -> None:
    """Raise DeviceInputError if a CUDA kernel recorded an invalid input since the last check.

    device: a CUDA device (or None: every device, if CUDA has been used). One host sync per
    device; clears what it reads. A no-op on the CPU and in builds without CUDA kernels.
    """
    records = take_device_errors(device)
    if records:
        raise DeviceInputError("\n".join(describe(r) for r in records), records[0])
