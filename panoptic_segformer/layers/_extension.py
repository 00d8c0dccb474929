"""Building and loading the package's optional compiled extensions.

Two extensions, each compiled at install time by ``setup.py`` when it can be, and otherwise on
first use with ``torch.utils.cpp_extension.load`` (JIT), so users never run a separate build
step; the callers fall back to PyTorch operations where neither works:

* ``panoptic_segformer._cpu``, built at install time whenever a C++ compiler is found: the
  operator ``panoptic_segformer::ms_deform_attn (multi-scale deformable attention: its definition and
  its CPU kernels, ``csrc/ms_deform_attn_op.cpp`` and ``csrc/ms_deform_attn_cpu.cpp``).
* ``panoptic_segformer._C``: the operator's CUDA kernels (``csrc/ms_deform_attn_cuda.cu``), built
  at install time when a GPU (or ``FORCE_CUDA=1``) is present. It registers kernels for the
  operator the CPU extension defines, so that one is always loaded first.

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
SOURCES = ("cuda_module.cpp", "ms_deform_attn_checks.cpp", "ms_deform_attn_cuda.cu")
JIT_NAME = "panoptic_segformer_msda"
CPU_SOURCES = (
    "cpu_module.cpp",
    "cpu_features.cpp",
    "ms_deform_attn_op.cpp",
    "ms_deform_attn_checks.cpp",
    "ms_deform_attn_cpu.cpp",
)
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
    installed: str,
    build: Callable[[], ModuleType],
    what: str,
    after_load: Optional[Callable[[], None]] = None,
) -> Tuple[Optional[ModuleType], Optional[str]]:
    """The extension built at install time, else a JIT build; the outcome is cached, so a failed
    build is attempted once per process. ``after_load`` runs once, after a successful load."""
    if installed in _loaded:
        return _loaded[installed]
    try:
        module = importlib.import_module(installed)
    except ImportError as e:
        logger.info("%s not built at install time (%s); building it now (JIT)", what, e)
        try:
            module = build()
        except (ImportError, OSError, RuntimeError) as e:
            reason = f"the {what} could not be built: {e}"
            logger.warning("%s", reason)
            _loaded[installed] = None, reason
            return _loaded[installed]
    if after_load is not None:
        try:
            after_load()
        except (AttributeError, RuntimeError) as e:  # e.g. a PyTorch without these APIs
            reason = f"the {what} loaded but could not be set up: {e}"
            logger.warning("%s", reason)
            _loaded[installed] = None, reason
            return _loaded[installed]
    _loaded[installed] = module, None
    return _loaded[installed]


def _register_operator_python_parts() -> None:
    # the operator's fake implementation and autograd formula (imported here, not at the top:
    # setup.py loads this file without the package)
    from panoptic_segformer.layers.ms_deform_attn_op import register_python_parts

    register_python_parts()


def load_cpu_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CPU extension (the
    deformable-attention operator and its CPU kernels) is unavailable. Tries the
    extension built at install time, then a JIT build, once per process."""
    return _load_once(
        "panoptic_segformer._cpu",
        build_cpu_extension,
        "CPU extension (deformable-attention operator)",
        after_load=_register_operator_python_parts,
    )


def load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CUDA kernels of multi-scale
    deformable attention are unavailable. Loads the CPU extension first (it defines the operator
    the CUDA kernels are registered for), then the CUDA extension built at install time, then a
    JIT build, once per process."""
    cpu, reason = load_cpu_extension()
    if cpu is None:
        return None, f"the operator is not defined: {reason}"
    return _load_once("panoptic_segformer._C", build_extension, "CUDA deformable-attention kernel")
