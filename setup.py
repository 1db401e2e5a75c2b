"""Build fcl_ext._C with torch.utils.cpp_extension.

Install with the torch that is already there (no build isolation):

    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace      # incremental rebuild

Switches (environment):
    FCL_EXT_CUDA=0|1      0: CPU-only build; 1: CUDA required (error if no toolkit); unset: auto
    TORCH_CUDA_ARCH_LIST  defaults to the visible GPUs' archs, or 9.0 when none is visible
    MAX_JOBS              parallel compile jobs (ninja)
    FCL_EXT_DEBUG=1       -O0 -g
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # one line, as promised in the README
    sys.exit("fcl_ext: torch is not installed; install it first (e.g. `pip install torch==2.14.1`), "
             "then `pip install --no-build-isolation -e .`")


def log(msg):
    print(f"fcl_ext build: {msg}", flush=True)


def find_nvcc():
    """nvcc from CUDA_HOME, else PATH; resolve wrapper scripts to the real toolkit."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return Path(home, "bin", "nvcc"), Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
            nvcc = cand
            break
    if nvcc is None:
        return None, None
    nvcc = Path(nvcc).resolve()
    # A wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) hides the toolkit: read it.
    try:
        text = nvcc.read_text(errors="ignore") if nvcc.stat().st_size < 4096 else ""
    except OSError:
        text = ""
    for token in text.replace('"', " ").split():
        if token.endswith("/bin/nvcc") and Path(token).exists():
            nvcc = Path(token).resolve()
            break
    return nvcc, nvcc.parent.parent


def decide_cuda():
    """Return (use_cuda, reason, cuda_home)."""
    switch = os.environ.get("FCL_EXT_CUDA", "").strip()
    if switch == "0":
        return False, "FCL_EXT_CUDA=0", None
    if torch.version.cuda is None:
        if switch == "1":
            sys.exit("fcl_ext: FCL_EXT_CUDA=1 but the installed torch is a CPU build "
                     f"({torch.__version__}); install a CUDA build of torch")
        return False, f"torch {torch.__version__} is a CPU build", None
    nvcc, home = find_nvcc()
    if nvcc is None:
        if switch == "1":
            sys.exit("fcl_ext: FCL_EXT_CUDA=1 but no nvcc was found; set CUDA_HOME to the CUDA toolkit")
        return False, "no nvcc found (set CUDA_HOME, or FCL_EXT_CUDA=0 to silence)", None
    return True, f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and nvcc is {nvcc}", home


def nvidia_wheel_includes():
    """Headers of torch's nvidia-* pip wheels (cublas_v2.h, cusparse.h, ...) missing from slim toolkits."""
    dirs = []
    for base in sys.path:
        root = Path(base, "nvidia")
        if root.is_dir():
            dirs += sorted(str(p) for p in root.glob("*/include") if p.is_dir())
            dirs += sorted(str(p) for p in root.glob("cu*/include") if p.is_dir())
    return sorted(set(dirs))


def openmp_flags():
    """Follow torch's own parallel backend, as pytorch_scatter does."""
    config = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" in config and sys.platform != "darwin":
        return ["-fopenmp"], ["-fopenmp"], True
    return [], [], False


def cpu_vector_flags():
    """Compile the CPU kernels' at::vec loops for AVX2+FMA when the build machine has them.

    FCL_EXT_CPU_VEC=0 builds portable scalar-ISA code (at::vec falls back to its generic path).
    """
    if os.environ.get("FCL_EXT_CPU_VEC", "1") == "0":
        return [], "generic (FCL_EXT_CPU_VEC=0)"
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return [], "generic (no /proc/cpuinfo)"
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "AVX2"
    return [], "generic (no AVX2 on the build machine)"


def build_extensions():
    use_cuda, reason, cuda_home = decide_cuda()
    log(f"torch {torch.__version__} (cuda {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"CUDA kernels: {'ON' if use_cuda else 'OFF'} ({reason})")

    cxx_omp, link_omp, openmp = openmp_flags()
    log(f"OpenMP: {'on' if openmp else 'off'} (follows torch's parallel backend)")

    vec_flags, cpu_vec = cpu_vector_flags()
    log(f"CPU SIMD: {cpu_vec}")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    debug = os.environ.get("FCL_EXT_DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += cxx_omp + vec_flags  # the C++ standard is left to torch (C++17 before 2.10, C++20 after)
    extra = {"cxx": cxx}
    include_dirs = [str(ROOT / "csrc" / "include")]
    arch_list = ""
    if use_cuda:
        os.environ.setdefault("CUDA_HOME", str(cuda_home))
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch guessed before we could tell it
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"CUDA_HOME={os.environ['CUDA_HOME']}, TORCH_CUDA_ARCH_LIST={arch_list}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["cxx"] = extra["cxx"] + ["-DFCL_EXT_WITH_CUDA"]
        # No --use_fast_math: it flushes denormals, approximates division and sqrt and maps exp/log to the
        # short-range intrinsics (error growing with |x|); the kernels are memory-bound, so the exact math
        # costs no time and keeps CUDA within the CPU twin's tolerances (and NaN in -> NaN out).
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + [
            "-DFCL_EXT_WITH_CUDA", "--expt-relaxed-constexpr",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
        include_dirs += nvidia_wheel_includes()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}; {len(sources)} sources")

    write_build_info(use_cuda, arch_list, openmp, reason, cpu_vec)
    return [ext_cls(
        name="fcl_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=link_omp,
    )]


def write_build_info(use_cuda, arch_list, openmp, reason, cpu_vec):
    info = {
        "version": VERSION,
        "torch_built": torch.__version__,
        "torch_cuda_built": torch.version.cuda,
        "cuda_kernels": bool(use_cuda),
        "cuda_reason": reason,
        "arch_list": arch_list,
        "openmp": bool(openmp),
        "cpu_simd": cpu_vec,
    }
    path = ROOT / "fcl_ext" / "_build_info.py"
    text = "# Written by setup.py; records what this build compiled.\nBUILD_INFO = " + repr(info) + "\n"
    if not path.exists() or path.read_text() != text:  # keep mtime stable for incremental builds
        path.write_text(text)


def ext_modules():
    # `make` installs the package editable with FCL_EXT_SKIP_EXT=1 and compiles with
    # `build_ext --inplace`: pip's editable build uses a throw-away build dir and would
    # recompile everything (minutes with CUDA) on every install.
    if os.environ.get("FCL_EXT_SKIP_EXT") == "1":
        log("FCL_EXT_SKIP_EXT=1: Python packages only; build the extension with build_ext --inplace")
        return []
    return build_extensions()


setup(
    name="fcl_ext",
    version=VERSION,
    packages=find_packages(include=["fcl_ext", "fcl_ext.*", "python_api", "python_api.*"]),
    ext_modules=ext_modules(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
