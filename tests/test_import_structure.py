"""Issue 14 item 6: the engine layer has no import circles, the methods import the message vocabulary
(python_api/messages.py) and no engine, and the runner finds engines by name without importing Flower.

The static check reads every `import` in python_api (module level and inside functions: a lazy import
is still a dependency) and looks for cycles; the dynamic checks import each module in a fresh
interpreter, in isolation, so an order that only works when something else was imported first fails."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python_api"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    """module name -> path, for every .py in python_api (the Flower app template included)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: dict) -> set:
    """python_api modules `path` imports anywhere in its code (`from a import b` counts as a.b when b is a
    module, else as a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict:
    known = _modules()
    return {name: _imports(path, name, known) for name, path in known.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_engine_messages_and_methods_have_no_import_circle():
    graph = _graph()
    assert "python_api.engine.runner" in graph and "python_api.messages" in graph
    layer = ("python_api.engine", "python_api.messages", "python_api.checkpoint", "python_api.methods")
    circles = [c for c in _cycles(graph) if any(m.startswith(layer) for m in c)]
    assert circles == [], f"import circles: {circles}"


def test_methods_import_no_engine_and_the_runner_no_flower_module():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("python_api.methods"):
            engine = sorted(d for d in deps if d.startswith("python_api.engine"))
            assert engine == [], f"{name} imports {engine}; methods use python_api.messages"
    assert not any(d.startswith("python_api.engine.flower") for d in graph["python_api.engine.runner"])
    assert not any(d.startswith("python_api.engine.flower") for d in graph["python_api.engine.registry"])


ENGINE_MODULES = sorted(m for m in _modules() if m.startswith(("python_api.engine", "python_api.messages"))
                        and ".app." not in m and not m.endswith(".app"))


def test_each_engine_module_imports_alone():
    """In one fresh interpreter (torch loaded once), each module imported with no python_api module loaded
    before it: an import that only works after some other module fails here."""
    code = ("import importlib, sys, torch\n"
            f"for module in {ENGINE_MODULES!r}:\n"
            "    for name in [m for m in sys.modules if m == 'python_api' or m.startswith('python_api.')]:\n"
            "        del sys.modules[name]\n"
            "    importlib.import_module(module)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert len(ENGINE_MODULES) > 10


# flwr made unimportable: a meta-path finder that refuses it (as on a machine without the extra)
_NO_FLWR = ("import sys\n"
            "class _Refuse:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'flwr' or name.startswith('flwr.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, _Refuse())\n")


def test_runner_registry_and_in_process_training_work_without_flwr(tmp_path):
    code = _NO_FLWR + (
        "from python_api.engine.runner import run_training\n"
        "from python_api.engine.registry import available_engines, get_engine\n"
        "assert 'python_api.engine.flower' not in sys.modules, 'the runner imported the Flower engine'\n"
        "assert get_engine('inprocess').transport is not None\n"
        "assert 'python_api.engine.flower' not in sys.modules\n"
        "print(available_engines())\n"
        "from python_api.config import ConfigError\n"
        "try:\n"
        "    run_training('glfc', None, engine='flower-sim')\n"
        "except ConfigError as exc:\n"
        "    assert 'Flower is not installed' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('flower-sim ran without flwr')\n"
        "try:\n"
        "    get_engine('carrier-pigeon')\n"
        "except ValueError as exc:\n"
        "    assert 'carrier-pigeon' in str(exc) and 'inprocess' in str(exc), exc\n"
        "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-2000:]
    assert "'flower-*'" in out.stdout and "'inprocess'" in out.stdout


def test_old_engine_base_location_still_names_the_same_classes():
    from python_api import messages
    from python_api.engine import base
    assert base.Message is messages.Message and base.Transport is messages.Transport
