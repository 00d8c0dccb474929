"""Building and loading the optional CUDA extension of multi-scale deformable attention.

The extension is compiled at install time when a GPU (or ``FORCE_CUDA=1``) is present, and
otherwise on first CUDA use with ``torch.utils.cpp_extension.load`` (JIT), so users never run a
separate build step. ``setup.py`` reads :data:`SOURCES` and :func:`compile_args` from here so the
two builds cannot drift apart. Nothing here imports the extension at package import time.
"""

import contextlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ms_deform_attn.cpp", "ms_deform_attn_cuda.cu")
JIT_NAME = "panoptic_segformer_msda"
# Architectures compiled when no GPU is visible to pick from (CUDA 12 and 13 both support
# these); override with TORCH_CUDA_ARCH_LIST as for any PyTorch extension.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"

_extension: Optional[ModuleType] = None
_unavailable_reason: Optional[str] = None


def source_paths() -> List[str]:
    """Absolute paths of the extension's C++/CUDA sources."""
    return [str(CSRC_DIR / name) for name in SOURCES]


def compile_args() -> Dict[str, List[str]]:
    """Compiler flags, as ``extra_compile_args`` of a ``CUDAExtension``."""
    # No --use_fast_math: the kernel must match the PyTorch path to float32 precision.
    return {"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}


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


def load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CUDA kernel is unavailable.

    Tries the extension built at install time, then a JIT build. The outcome is cached, so a
    failed build is attempted once per process.
    """
    global _extension, _unavailable_reason
    if _extension is not None or _unavailable_reason is not None:
        return _extension, _unavailable_reason
    try:
        from panoptic_segformer import _C

        _extension = _C
        return _extension, None
    except ImportError as e:
        logger.info("CUDA extension not built at install time (%s); building it now (JIT)", e)
    try:
        _extension = build_extension()
    except (ImportError, OSError, RuntimeError) as e:
        _unavailable_reason = f"the CUDA kernel could not be built: {e}"
        logger.warning("multi-scale deformable attention: %s", _unavailable_reason)
    return _extension, _unavailable_reason
