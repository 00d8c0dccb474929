"""Building the package's optional compiled extensions (loading them is
:mod:`panoptic_segformer.layers.ms_deform_attn_op`'s).

Two extensions, each compiled at install time by ``setup.py`` when it can be, and otherwise on
first use with ``torch.utils.cpp_extension.load`` (JIT), so users never run a separate build
step; the callers fall back to PyTorch operations where neither works:

* ``panoptic_segformer._cpu``, built at install time whenever a C++ compiler is found: the
  operator ``panoptic_segformer::ms_deform_attn (multi-scale deformable attention: its definition
  and its CPU kernels, ``csrc/ms_deform_attn_op.cpp`` and ``csrc/ms_deform_attn_cpu.cpp``).
* ``panoptic_segformer._C``: the operator's CUDA kernels (``csrc/ms_deform_attn_cuda.cu``), built
  at install time when a GPU (or ``FORCE_CUDA=1``) is present. It registers kernels for the
  operator the CPU extension defines, so that one is always loaded first.

``setup.py`` loads this file by path (it imports nothing of the package, and torch only inside
functions) and reads the sources and compiler flags from here, so the two builds cannot drift
apart.
"""

import contextlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

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
# where CUDA toolkits install by default on Linux, tried when the folder PyTorch derives is none
USUAL_CUDA_HOME = "/usr/local/cuda"


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


def _cuda_runtime_missing(home: str) -> Optional[str]:
    """Why ``home`` is not a CUDA toolkit to build with, or None when it has ``bin/nvcc`` and the
    CUDA runtime library in one of the folders PyTorch links from."""
    root = Path(home)
    if not (root / "bin" / "nvcc").exists() and not (root / "bin" / "nvcc.exe").exists():
        return "no bin/nvcc"
    for folder in ("lib64", "lib", "lib/x64"):
        if any((root / folder).glob("libcudart.so*")) or (root / folder / "cudart.lib").exists():
            return None
    return "bin/nvcc but no CUDA runtime library (libcudart) in lib64/ or lib/"


def find_cuda_toolkit() -> Tuple[Optional[str], str]:
    """``(folder, "")`` of the CUDA toolkit to build with, or ``(None, why none)``.

    ``CUDA_HOME`` (or ``CUDA_PATH``) when set; otherwise the folder PyTorch derives (above the
    ``nvcc`` on PATH), else :data:`USUAL_CUDA_HOME`. A folder counts only when it holds ``nvcc``
    and the CUDA runtime: an ``nvcc`` on PATH can be a wrapper script outside the toolkit, and
    PyTorch would then link against the wrapper's folder (``cannot find -lcudart``).
    """
    from torch.utils import cpp_extension

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [explicit] if explicit else [cpp_extension.CUDA_HOME, USUAL_CUDA_HOME]
    problems = []
    for home in dict.fromkeys(c for c in candidates if c):
        problem = _cuda_runtime_missing(home)
        if problem is None:
            return home, ""
        problems.append(f"{home}: {problem}")
    where = "; ".join(problems) or "no nvcc on PATH"
    return None, f"no CUDA toolkit found ({where}); set CUDA_HOME to the toolkit's folder"


def use_cuda_toolkit(home: str) -> None:
    """Makes PyTorch's extension builder compile and link with the toolkit at ``home`` (it reads
    the folder it derived at import from ``torch.utils.cpp_extension.CUDA_HOME``)."""
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home


@contextlib.contextmanager
def cuda_toolkit(home: str) -> Iterator[None]:
    """:func:`use_cuda_toolkit` for the duration of a build, then PyTorch's own setting again."""
    from torch.utils import cpp_extension

    saved = cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME")
    use_cuda_toolkit(home)
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved[0]
        if saved[1] is None:
            del os.environ["CUDA_HOME"]
        else:
            os.environ["CUDA_HOME"] = saved[1]


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

    home, reason = find_cuda_toolkit()
    if home is None:
        raise RuntimeError(f"cannot build the multi-scale deformable attention kernel: {reason}")
    args = compile_args()
    with cuda_toolkit(home), default_arch_list():
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
