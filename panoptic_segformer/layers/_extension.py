"""Building and loading the package's optional compiled extensions.

Two extensions, each compiled at install time by ``setup.py`` when it can be, and otherwise on
first use with ``torch.utils.cpp_extension.load`` (JIT), so users never run a separate build
step; the callers fall back to PyTorch operations where neither works:

* ``panoptic_segformer._C``: the CUDA kernel of multi-scale deformable attention, built at
  install time when a GPU (or ``FORCE_CUDA=1``) is present.
* ``panoptic_segformer._cpu``: the fused CPU kernel of the merging's mask statistics
  (``csrc/mask_statistics.cpp``), built at install time whenever a C++ compiler is found.

``setup.py`` reads the sources and compiler flags from here so the two builds cannot drift
apart. Nothing here imports an extension at package import time.
"""

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cuda.cu")
JIT_NAME = "panoptic_segformer_msda"
CPU_SOURCES = ("cpu_module.cpp", "mask_statistics.cpp")
CPU_JIT_NAME = "panoptic_segformer_cpu"
# Architectures compiled when no GPU is visible to pick from (CUDA 12 and 13 both support
# these); override with TORCH_CUDA_ARCH_LIST as for any PyTorch extension.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"

# extension name -> (module, None) or (None, why it is unavailable), once tried
_loaded: Dict[str, Tuple[Optional[ModuleType], Optional[str]]] = {}


def source_paths() -> List[str]:
    """Absolute paths of the CUDA extension's C++/CUDA sources."""
    return [str(CSRC_DIR / name) for name in SOURCES]


def cpu_source_paths() -> List[str]:
    """Absolute paths of the CPU extension's C++ sources."""
    return [str(CSRC_DIR / name) for name in CPU_SOURCES]


def compile_args() -> Dict[str, List[str]]:
    """Compiler flags of the CUDA extension, as ``extra_compile_args`` of a ``CUDAExtension``."""
    # No --use_fast_math: the kernel must match the PyTorch path to float32 precision.
    return {"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}


def _openmp_flags() -> List[str]:
    # at::parallel_for runs its loop on PyTorch's OpenMP threads only when the extension is
    # compiled with OpenMP (GCC on Linux; elsewhere it runs serially, still correct)
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cpu_compile_args() -> List[str]:
    """Compiler flags of the CPU extension. The kernels' results must not depend on the build or
    the CPU: no -ffast-math or -march, and no contraction of a multiply and an add into one
    rounding (GCC and Clang fuse them by default wherever the target has FMA instructions)."""
    return ["-O3", "-ffp-contract=off", *_openmp_flags()]


def cpu_link_args() -> List[str]:
    """Linker flags of the CPU extension."""
    return _openmp_flags()


def cuda_toolkit_home() -> Optional[str]:
    """The CUDA toolkit PyTorch would build with, or None when it has no ``bin/nvcc``."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return CUDA_HOME
    return None


@contextlib.contextmanager
def default_arch_list() -> Iterator[None]:
    """Sets TORCH_CUDA_ARCH_LIST to :data:`DEFAULT_ARCH_LIST` when unset and no GPU is visible.

    PyTorch derives the architectures from the visible GPUs and fails when there are none.
    """
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    try:
        yield
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]


def build_extension(build_directory: Optional[str] = None, verbose: bool = False) -> ModuleType:
    """Compiles and loads the extension with ``torch.utils.cpp_extension.load``.

    Args:
        build_directory: where to build; PyTorch's extension cache by default.
        verbose: print the compiler's commands and output.

    Raises:
        RuntimeError: when the CUDA toolkit is missing or the build fails.
    """
    from torch.utils.cpp_extension import load

    if cuda_toolkit_home() is None:
        raise RuntimeError(
            "no CUDA toolkit found (no bin/nvcc under CUDA_HOME); set CUDA_HOME to build the "
            "multi-scale deformable attention kernel"
        )
    args = compile_args()
    with default_arch_list():
        return load(
            name=JIT_NAME,
            sources=source_paths(),
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args["nvcc"],
            build_directory=build_directory,
            verbose=verbose,
        )


def build_cpu_extension(build_directory: Optional[str] = None, verbose: bool = False) -> ModuleType:
    """Compiles and loads the CPU extension with ``torch.utils.cpp_extension.load``.

    Args:
        build_directory: where to build; PyTorch's extension cache by default.
        verbose: print the compiler's commands and output.

    Raises:
        RuntimeError: when the build fails (e.g. no C++ compiler).
    """
    from torch.utils.cpp_extension import load

    return load(
        name=CPU_JIT_NAME,
        sources=cpu_source_paths(),
        extra_cflags=cpu_compile_args(),
        extra_ldflags=cpu_link_args(),
        build_directory=build_directory,
        verbose=verbose,
    )


def _load_once(
    installed: str, build: Callable[[], ModuleType], what: str
) -> Tuple[Optional[ModuleType], Optional[str]]:
    """The extension built at install time, else a JIT build; the outcome is cached, so a failed
    build is attempted once per process."""
    if installed in _loaded:
        return _loaded[installed]
    try:
        _loaded[installed] = importlib.import_module(installed), None
        return _loaded[installed]
    except ImportError as e:
        logger.info("%s not built at install time (%s); building it now (JIT)", what, e)
    try:
        _loaded[installed] = build(), None
    except (ImportError, OSError, RuntimeError) as e:
        reason = f"the {what} could not be built: {e}"
        logger.warning("%s", reason)
        _loaded[installed] = None, reason
    return _loaded[installed]


def load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CUDA kernel of multi-scale
    deformable attention is unavailable. Tries the extension built at install time, then a JIT
    build, once per process."""
    return _load_once("panoptic_segformer._C", build_extension, "CUDA deformable-attention kernel")


def load_cpu_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CPU mask-statistics kernel
    is unavailable. Tries the extension built at install time, then a JIT build, once per
    process."""
    return _load_once("panoptic_segformer._cpu", build_cpu_extension, "CPU mask-statistics kernel")
