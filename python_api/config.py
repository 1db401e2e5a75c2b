"""Dataclass configs, YAML presets (package data) and dotted command-line overrides.

Every method describes its settings as a tree of dataclasses (see `methods/glfc/config.py`). This
module turns YAML presets and `key.sub=value` overrides into such a tree, strictly: an unknown key or
a value of the wrong type raises `ConfigError` naming the key, listing the valid ones.

    cfg = load_config(GLFCConfig, "glfc-demo", ["client.local_epochs=2", "run.seed=1"])
    save_config(cfg, "run/config.yaml")        # the resolved config, reloadable with load_config
    to_dict(cfg)                                # plain dict (YAML/JSON-safe)

Sections shared by every method: `RunConfig` (seed, device, progress, checkpointing) and
`DataConfig` (dataset name, root, image size, class order, augmentation). A method config is a
dataclass with at least the fields `method: str`, `run: RunConfig`, `data: DataConfig`; it may define
`validate(self)` that raises `ConfigError` for inconsistent settings, and a classmethod
`prepare_dict(data) -> data` that expands settings groups before the dataclass is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

__all__ = [
    "ConfigError", "RunConfig", "DataConfig", "AugmentConfig",
    "load_config", "from_dict", "to_dict", "apply_overrides", "parse_override",
    "save_config", "list_presets", "preset_path", "read_yaml_source",
]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class RunConfig:
    """Run-wide settings shared by every method."""
    seed: int = 2021
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    threads: int = 0                   # torch intra-op threads; 0 = leave torch's default
    deterministic: bool = True         # cudnn.deterministic, no benchmark autotuning
    progress: bool = True              # tqdm bars over rounds and clients
    checkpoint_every: int = 1          # rounds between checkpoints (the last round is always saved)
    keep_checkpoints: int = 1          # round checkpoints kept on disk besides `last.pt`
    max_rounds: Optional[int] = None   # stop after this many rounds (a partial run; resume continues)
    keep_freed_memory: bool = True     # glibc: large blocks from the heap, freed memory kept mapped (no page-fault
                                       # storm; results unchanged, peak memory higher; profiling.keep_freed_memory)
    workers: int = 1                   # in-process engine: a send's clients in this many worker processes
    client_rng: str = "sequential"     # sequential (the global RNG runs through the clients in order, as the
                                       # reference) | streams (each client's randomness from a stream derived
                                       # from (seed, round, client, message kind); needed by workers > 1)
    on_nonfinite: str = "stop"         # a non-finite loss or update: stop (naming round, client, term; the last
                                       # good checkpoint stays) | skip_client (leave that update out, logged)


@dataclass
class AugmentConfig:
    """On-device training augmentation (the reference's train transform)."""
    crop_padding: int = 4              # RandomCrop(image_size, padding) with zero padding; 0 = off
    hflip: bool = True                 # RandomHorizontalFlip(0.5)
    brightness: float = 63 / 255       # ColorJitter(brightness=b): factor ~ U[1-b, 1+b]; 0 = off


@dataclass
class DataConfig:
    """Which dataset, where it lives, how it is shaped and normalised."""
    dataset: str = "bundled_digits"    # bundled_digits | synthetic | cifar100 | mini_imagenet | tiny_imagenet
    root: str = "data"                 # directory holding the dataset files (see python_api/data)
    image_size: int = 32               # images are resized once at load time to this square size
    class_order: str = "natural"       # natural (label order, the reference) | seed (shuffled by run.seed)
    download: bool = False             # allow torchvision to download CIFAR-100 into root
    mean: tuple = CIFAR100_MEAN        # Normalize constants; the reference uses CIFAR-100's for every set
    std: tuple = CIFAR100_STD
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train_per_class: Optional[int] = None   # folder datasets: first N images per class train, rest test
    test_per_class: Optional[int] = None    # folder datasets and cifar100: cap on test images per class (the first
                                            # N of each class; a cost cut for smoke tests, null = all)
    num_classes: Optional[int] = None       # synthetic only: number of classes (others: from the data)
    samples_per_class: int = 60             # synthetic only: images per class (train + test)
    cache: bool = True                      # folder datasets: cache decoded tensors under root/.fcl_ext_cache
    partition: str = "classes"              # FCIL client data: classes (GLFC: each client draws classes of the task)
                                            # | dirichlet (TARGET/LANDER: fixed clients, Dir(beta) class proportions)
    beta: float = 0.5                       # dirichlet only: concentration (TARGET/LANDER use 0.5)
    dirichlet_min_samples: int = 1          # dirichlet only: redraw until every client holds this many per task


# ---- (de)serialisation ------------------------------------------------------------

def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists/scalars (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotation; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            # Items of a list of sections are named as overrides address them: participants.1.width
            items = [_coerce(v, args[0], f"{key}.{i}" if dataclasses.is_dataclass(args[0]) else f"{key}[{i}]")
                     if args else v for i, v in enumerate(value)]
            return tuple(items) if (tp is tuple or origin is tuple) else list(items)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _unknown_key_error(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}; valid keys in "
                       f"'{prefix.rstrip('.') or cls.__name__}': {', '.join(names)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (partial) dict; missing keys keep their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(cls, key, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a dataclass without defaults
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is parsed as YAML ('x=[1,2]', 'y=null', 'z=true')."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return key, value


def _list_item_class(tp):
    """The dataclass D of a `list[D]` annotation, else None."""
    if typing.get_origin(tp) is list:
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _set_path(node_cls, node: dict, parts: list, value: Any, prefix: str, key: str) -> None:
    """Set node[parts...] = value, checking every step against `node_cls` (did-you-mean on unknown keys).

    A `list[Dataclass]` field (FCCL's participants) takes an index or `*` (every item) as its next part:
    `participants.1.local_epochs=5`, `participants.*.local_epochs=5`."""
    part, rest = parts[0], parts[1:]
    fields = {f.name: f for f in dataclasses.fields(node_cls)}
    if part not in fields:
        raise _unknown_key_error(node_cls, part, prefix)
    if not rest:
        node[part] = value
        return
    hint = typing.get_type_hints(node_cls)[part]
    item_cls = _list_item_class(hint)
    if item_cls is not None:
        items = node.get(part)
        if items is None:   # not in the file: start from the dataclass default
            f = fields[part]
            items = to_dict(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        if not isinstance(items, list):
            raise ConfigError(f"{prefix}{part}: expected a list, got {items!r}")
        items = [dict(to_dict(item)) if isinstance(item, dict) or dataclasses.is_dataclass(item) else item
                 for item in items]
        selector = rest[0]
        if selector == "*":
            chosen = range(len(items))
        elif selector.lstrip("-").isdigit() and 0 <= int(selector) < len(items):
            chosen = [int(selector)]
        else:
            raise ConfigError(f"'{key}': '{prefix}{part}' is a list of {len(items)}; after '{prefix}{part}.' "
                              f"give an index 0..{len(items) - 1} or '*' (every item), got {selector!r}")
        if len(rest) < 2:
            raise ConfigError(f"'{key}': name a key inside the item, e.g. '{prefix}{part}.{selector}."
                              f"{dataclasses.fields(item_cls)[0].name}=...'")
        for index in chosen:
            if not isinstance(items[index], dict):
                raise ConfigError(f"{prefix}{part}.{index}: expected a mapping, got {items[index]!r}")
            _set_path(item_cls, items[index], rest[1:], value, f"{prefix}{part}.{index}.", key)
        node[part] = items
        return
    if not dataclasses.is_dataclass(hint):
        raise ConfigError(f"'{prefix}{part}' is a value, not a section: cannot set '{key}'")
    child = node.get(part)
    child = dict(child) if isinstance(child, dict) else {}
    node[part] = child
    _set_path(hint, child, rest, value, prefix + part + ".", key)


def apply_overrides(cls, data: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys in a config dict, checking each path against the dataclass `cls`."""
    data = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_path(cls, data, key.split("."), value, "", key)
    return data


# ---- presets and files ---------------------------------------------------------------

def _preset_dir():
    return resources.files("python_api") / "configs"


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package (without .yaml)."""
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str):
    return _preset_dir() / f"{name}.yaml"


def read_yaml_source(source: Optional[Union[str, os.PathLike]]) -> dict:
    """A preset name ('glfc-demo') or a YAML path -> dict. None -> {} (all defaults)."""
    if source is None:
        return {}
    text = None
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    else:
        preset = preset_path(str(source))
        if not preset.is_file():
            raise ConfigError(f"no preset named {str(source)!r} and no such file; "
                              f"presets: {', '.join(list_presets())}")
        text = preset.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config {str(source)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(source)!r} must be a mapping at the top level")
    return data


def load_config(cls, source=None, overrides: Sequence[str] = ()):
    """Preset name or YAML path, then dotted overrides -> validated dataclass `cls`."""
    data = read_yaml_source(source)
    data = apply_overrides(cls, data, overrides)
    expected = getattr(cls, "METHOD", None)
    if expected is not None and data.get("method", expected) != expected:
        raise ConfigError(f"method: config {str(source)!r} is for method {data['method']!r}, "
                          f"not {expected!r}")
    prepare = getattr(cls, "prepare_dict", None)   # a method's settings groups (e.g. GLFC `quirks`)
    if prepare is not None:
        data = prepare(data)
    cfg = from_dict(cls, data)
    run = getattr(cfg, "run", None)
    if run is not None and getattr(run, "client_rng", "sequential") not in ("sequential", "streams"):
        raise ConfigError(f"run.client_rng: expected sequential or streams, got {run.client_rng!r}")
    if run is not None and getattr(run, "workers", 1) < 1:
        raise ConfigError(f"run.workers: must be >= 1, got {run.workers}")
    if run is not None and getattr(run, "workers", 1) > 1 and run.client_rng != "streams":
        raise ConfigError("run.workers > 1 needs run.client_rng=streams (with the sequential RNG a client's "
                          "randomness depends on the clients before it, so they cannot run in parallel)")
    if run is not None and run.on_nonfinite not in ("stop", "skip_client"):
        raise ConfigError(f"run.on_nonfinite: expected stop or skip_client, got {run.on_nonfinite!r}")
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML (reloadable with load_config(cls, path))."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
