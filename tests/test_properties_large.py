"""The property modules again with the "large" hypothesis profile (random, 300 examples per
test; tests/testing.py) — the big fuzz, under -m slow. Each module runs in its own pytest so
that the profile applies to it alone."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(p.name for p in (ROOT / "tests").glob("test_properties_*.py") if p.name != pathlib.Path(__file__).name)


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_property_module_with_large_profile(module):
    env = dict(os.environ, FCL_EXT_HYPOTHESIS="large", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{module}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:]
