"""fcl_ext: fused C++/CUDA kernels for federated continual learning (GLFC, FCCL).

    import fcl_ext
    fcl_ext.ops.softmax_entropy(logits)          # functional API
    fcl_ext.losses.SoftmaxEntropy()(logits)      # nn.Module drop-ins
    fcl_ext.reference.softmax_entropy(logits)    # the same math in plain PyTorch
    fcl_ext.info()                               # what this build contains
    fcl_ext.check_device_errors()                # raise invalid inputs the CUDA kernels recorded
"""
import torch

try:
    from fcl_ext._build_info import BUILD_INFO as _BUILD_INFO
except ImportError as exc:  # pragma: no cover - only in a source tree that was never built
    raise ImportError(
        "fcl_ext is not built: run `pip install --no-build-isolation -e .` "
        "or `python setup.py build_ext --inplace` in the source tree") from exc


def _torch_release(version: str) -> str:
    return version.split("+")[0]


if _torch_release(_BUILD_INFO["torch_built"]) != _torch_release(torch.__version__):
    raise ImportError(
        f"fcl_ext was built against torch {_BUILD_INFO['torch_built']} but torch {torch.__version__} "
        "is installed; the C++ ABI differs. Rebuild with "
        "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`).")

from fcl_ext import _C  # noqa: E402,F401  (loads the library: registers torch.ops.fcl_ext.*)
from fcl_ext import _registrations  # noqa: E402,F401
from fcl_ext import losses, ops, reference  # noqa: E402
from fcl_ext.device_errors import DeviceInputError, check_device_errors  # noqa: E402

__version__ = _BUILD_INFO["version"]


def info() -> dict:
    """What this build contains: versions, CUDA kernels, arch list, OpenMP, CPU SIMD level."""
    return {
        "version": _BUILD_INFO["version"],
        "torch_built": _BUILD_INFO["torch_built"],
        "torch_running": torch.__version__,
        "cuda_kernels": _BUILD_INFO["cuda_kernels"],
        "cuda_reason": _BUILD_INFO["cuda_reason"],
        "arch_list": _BUILD_INFO["arch_list"],
        "openmp": _BUILD_INFO["openmp"],
        "cpu_simd": _BUILD_INFO.get("cpu_simd", "unknown"),
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["info", "ops", "losses", "reference", "check_device_errors", "DeviceInputError", "__version__"]
