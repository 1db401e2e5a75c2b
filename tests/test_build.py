"""The build's two paths: the CUDA-enabled build (what the suite runs against, compiled
wherever torch is a CUDA build and nvcc exists) and a CPU-only FCL_EXT_CUDA=0 build made
from a copy of the sources in a temp dir, imported in a fresh interpreter."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fcl_ext

ROOT = Path(__file__).resolve().parents[1]


def test_info_reports_the_build():
    info = fcl_ext.info()
    for key in ("version", "torch_built", "torch_running", "cuda_kernels", "arch_list", "openmp"):
        assert key in info
    assert info["torch_running"] == torch.__version__
    assert info["torch_built"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda_kernels"]:
        assert info["arch_list"], "a CUDA build records its arch list"


def test_cuda_build_when_toolkit_present():
    """Where torch is a CUDA build and nvcc exists, the suite's build compiled the .cu files."""
    if torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("FCL_EXT_CUDA") == "0":
        pytest.skip("torch is a CPU build or no nvcc: nothing to compile for CUDA")
    assert fcl_ext.info()["cuda_kernels"], "torch is CUDA and nvcc exists, but the build has no CUDA kernels"


def _copy_sources(dst: Path):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    shutil.copytree(ROOT / "fcl_ext", dst / "fcl_ext",
                    ignore=shutil.ignore_patterns("_C*.so", "_build_info.py", "__pycache__"))
    shutil.copytree(ROOT / "python_api", dst / "python_api", ignore=shutil.ignore_patterns("__pycache__"))


def test_cpu_only_build(tmp_path):
    """FCL_EXT_CUDA=0 builds, imports, runs an op, and names the build when given CUDA."""
    _copy_sources(tmp_path)
    env = dict(os.environ, FCL_EXT_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "CUDA kernels: OFF (FCL_EXT_CUDA=0)" in build.stdout
    script = (
        "import json, torch, fcl_ext\n"
        "from fcl_ext import _registrations\n"
        "x = torch.randn(4, 6, dtype=torch.float64)\n"
        "h = fcl_ext.ops.softmax_entropy(x, reduction='none')\n"
        "r = fcl_ext.reference.softmax_entropy(x, reduction='none')\n"
        "guards = _registrations._CUDA_GUARDS\n"
        "try:\n"
        "    guards['fcl_ext::softmax_entropy'](x, 0.0)\n"
        "    msg = ''\n"
        "except RuntimeError as e:\n"
        "    msg = str(e)\n"
        "print(json.dumps({'info': fcl_ext.info(), 'file': fcl_ext.__file__, 'diff': (h - r).abs().max().item(),\n"
        "                  'guarded': sorted(guards) == sorted(_registrations._ALL_OPS), 'msg': msg}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path)), out["file"]
    assert out["info"]["cuda_kernels"] is False
    assert out["diff"] < 1e-12
    assert out["guarded"], "every op needs a CUDA guard in a CPU-only build"
    assert "no CUDA kernels" in out["msg"] and "softmax_entropy" in out["msg"]
