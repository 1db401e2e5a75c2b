"""Engine payloads <-> Flower records, exactly (bit for bit).

A method payload (python_api/messages.py) is a tree of dicts / lists / tuples of tensors, numpy
arrays, numbers, strings, bools and None. `pack(tree)` splits it into

    skeleton   JSON text: the tree with every tensor replaced by {"__t": index, ...}
    arrays     an ArrayRecord: str(index) -> Array (numpy .npy bytes, no pickle)

and `unpack` puts it back together on the receiver's device. Dict keys keep their types (int client
ids stay ints), tuples stay tuples (random.getstate() needs them). bfloat16 travels as its int16 bits.
Nothing is pickled: a receiver never executes what a sender wrote.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

__all__ = ["pack", "unpack", "to_record_dict", "from_record_dict", "PayloadTypeError"]

_NUMPY_INCOMPATIBLE = {torch.bfloat16: torch.int16}


class PayloadTypeError(TypeError):
    pass


def _encode(obj: Any, arrays: list, path: str):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        entry = {"__t": len(arrays)}
        if t.dtype in _NUMPY_INCOMPATIBLE:
            entry["dtype"] = str(t.dtype).removeprefix("torch.")
            t = t.view(_NUMPY_INCOMPATIBLE[t.dtype])
        arrays.append(t.cpu().contiguous().numpy())
        return entry
    if isinstance(obj, np.ndarray):
        arrays.append(np.ascontiguousarray(obj))
        return {"__n": len(arrays) - 1}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__f": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, arrays, f"{path}.{k}") for k, v in obj.items()}
        return {"__d": [[_encode(k, arrays, path), _encode(v, arrays, f"{path}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple": [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Size):
        return {"__tuple": list(obj)}
    raise PayloadTypeError(f"payload{path}: {type(obj).__name__} cannot travel between engine processes "
                           "(tensors, arrays, numbers, strings, lists, tuples and dicts only)")


def _decode(obj: Any, arrays: list, device):
    if isinstance(obj, list):
        return [_decode(v, arrays, device) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__t" in obj:
        t = torch.from_numpy(arrays[obj["__t"]])
        if "dtype" in obj:
            t = t.view(getattr(torch, obj["dtype"]))
        return t.to(device) if device is not None else t
    if "__n" in obj:
        return arrays[obj["__n"]]
    if "__f" in obj:
        return float(obj["__f"])
    if "__tuple" in obj:
        return tuple(_decode(v, arrays, device) for v in obj["__tuple"])
    if "__d" in obj:
        return {_decode(k, arrays, device): _decode(v, arrays, device) for k, v in obj["__d"]}
    return {k: _decode(v, arrays, device) for k, v in obj.items()}


def pack(tree: Any) -> tuple[str, list]:
    """(skeleton JSON, list of numpy arrays)."""
    arrays: list = []
    skeleton = _encode(tree, arrays, "")
    return json.dumps(skeleton, separators=(",", ":")), arrays


def unpack(skeleton: str, arrays: list, device=None) -> Any:
    return _decode(json.loads(skeleton), arrays, device)


# ---------------------------------------------------------------------------- Flower records
def to_record_dict(tree: Any, meta: dict, prefix: str = "fcl") -> "RecordDict":
    """A RecordDict with `<prefix>.arrays` (ArrayRecord) and `<prefix>.meta` (ConfigRecord: meta + skeleton)."""
    from flwr.app import RecordDict
    record = RecordDict()
    add_to_record_dict(record, tree, meta, prefix)
    return record


def add_to_record_dict(record, tree: Any, meta: dict, prefix: str, _packed=None) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord
    skeleton, arrays = _packed if _packed is not None else pack(tree)
    array_record = ArrayRecord()
    for i, a in enumerate(arrays):
        array_record[str(i)] = Array.from_numpy_ndarray(a)
    record[f"{prefix}.arrays"] = array_record
    record[f"{prefix}.meta"] = ConfigRecord({**meta, "skeleton": skeleton, "num_arrays": len(arrays)})


def has_records(record, prefix: str) -> bool:
    return f"{prefix}.meta" in record


def from_record_dict(record, prefix: str = "fcl", device=None) -> tuple[Any, dict]:
    """(tree, meta) from a RecordDict written by to_record_dict / add_to_record_dict."""
    meta = dict(record[f"{prefix}.meta"])
    array_record = record[f"{prefix}.arrays"]
    arrays = [array_record[str(i)].numpy() for i in range(int(meta.pop("num_arrays")))]
    return unpack(meta.pop("skeleton"), arrays, device), meta
