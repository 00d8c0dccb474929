"""The ONNX Runtime custom operator ``panoptic_segformer::MSDeformAttn``: its ONNX schema, and the
shared library that runs it, built on first use.

An ONNX file exported with ``--ort-custom-op`` holds deformable attention as one node of this
operator (``onnx_ops.ms_deform_attn_ort_op``) instead of one ``GridSample`` per level; ONNX
Runtime runs it with the PyTorch CPU kernel's own loop (``deploy/csrc/ms_deform_attn_ort.cpp``).
Such a file needs the library registered with the session's options: :func:`register` builds it
(once per source and compiler, into :func:`cache_dir`) and registers it.

Building needs a C++ compiler and ONNX Runtime's C header ``onnxruntime_c_api.h``, which the
onnxruntime wheel does not ship: point ``ORT_INCLUDE_DIR`` (or ``include_dir``) at the
``include`` folder of the ONNX Runtime release of your version (any release >= 1.17 serves; the
operator asks for API version 17), e.g. from
https://github.com/microsoft/onnxruntime/releases (``onnxruntime-linux-x64-<version>.tgz``).
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

__all__ = [
    "DOMAIN",
    "INCLUDE_ENV",
    "OPERATOR",
    "LibraryUnavailable",
    "build_library",
    "cache_dir",
    "find_headers",
    "register",
    "register_schema",
]

DOMAIN = "panoptic_segformer"
OPERATOR = "MSDeformAttn"
INCLUDE_ENV = "ORT_INCLUDE_DIR"
HEADER = "onnxruntime_c_api.h"
LIBRARY_NAME = "libpanoptic_segformer_ort_ops.so"

_PACKAGE = Path(__file__).resolve().parents[1]
SOURCE = _PACKAGE / "deploy" / "csrc" / "ms_deform_attn_ort.cpp"
KERNEL_DIR = _PACKAGE / "layers" / "csrc"  # the kernel's forward loop and arithmetic headers
# where the header sits under a folder one may point at: a release's include/, its root, a
# source checkout
_HEADER_SUBDIRS = (".", "include", "include/onnxruntime/core/session")
# -ffp-contract=off: no fused multiply-adds, as the PyTorch kernel (the same bits)
COMPILE_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-ffp-contract=off",
)


class LibraryUnavailable(RuntimeError):
    """The operator's library cannot be built here: no header, no compiler, or the build
    failed (the message says which and what to do)."""


def register_schema() -> None:
    """Registers the operator's schema with onnx (once), so the exporter and ``onnx.checker``
    know its inputs and types."""
    from onnx import defs

    if defs.has(OPERATOR, DOMAIN):
        return
    formal = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        OPERATOR,
        DOMAIN,
        1,
        doc="Multi-scale deformable attention (Deformable DETR), Panoptic SegFormer's kernel.",
        inputs=[
            formal("value", "T", "(N, S, M, D)"),
            formal("spatial_shapes", "tensor(int64)", "(L, 2), (H, W) per level"),
            formal("level_start_index", "tensor(int64)", "(L,)"),
            formal("sampling_locations", "T", "(N, Q, M, L, P, 2), normalised (x, y)"),
            formal("attention_weights", "T", "(N, Q, M, L, P)"),
        ],
        outputs=[formal("output", "T", "(N, Q, M * D)")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
    )
    defs.register_schema(schema)


def find_headers(include_dir: Optional[str] = None) -> Path:
    """The folder holding ONNX Runtime's ``onnxruntime_c_api.h``.

    Args:
        include_dir: a release's ``include`` folder (or the release, or a source checkout);
            None reads ``ORT_INCLUDE_DIR``.

    Raises:
        LibraryUnavailable: naming the folder searched (or the unset variable) and where to get
            the header.
    """
    given = include_dir or os.environ.get(INCLUDE_ENV)
    where = (
        "download the ONNX Runtime release of your version (any >= 1.17) from "
        "https://github.com/microsoft/onnxruntime/releases and point "
        f"{INCLUDE_ENV} at its include folder"
    )
    if not given:
        raise LibraryUnavailable(
            f"building the ONNX Runtime operator {DOMAIN}::{OPERATOR} needs ONNX Runtime's C "
            f"header {HEADER}, which the onnxruntime wheel does not ship; {where}"
        )
    for sub in _HEADER_SUBDIRS:
        folder = Path(given) / sub
        if (folder / HEADER).is_file():
            return folder.resolve()
    raise LibraryUnavailable(f"{given}: no {HEADER} there (nor under include/); {where}")


def cache_dir() -> Path:
    """Where built libraries are kept: ``$PANOPTIC_SEGFORMER_CACHE/ort_ops``, by default under
    ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    root = os.environ.get("PANOPTIC_SEGFORMER_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "panoptic_segformer")
    return Path(root) / "ort_ops"


def _sources() -> List[Path]:
    return [SOURCE, *sorted(KERNEL_DIR.glob("*.h"))]


def build_library(include_dir: Optional[str] = None, verbose: bool = False) -> str:
    """Builds the operator's shared library, unless a build of the same sources, header and
    compiler is already in :func:`cache_dir`, and returns its path.

    Args:
        include_dir: as in :func:`find_headers`.
        verbose: print the compiler command.

    Raises:
        LibraryUnavailable: no header (:func:`find_headers`), no C++ compiler (``$CXX``, else
            ``c++``), or the compiler failed (the message holds its output).
    """
    headers = find_headers(include_dir)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise LibraryUnavailable(
            f"building {DOMAIN}::{OPERATOR} needs a C++ compiler: {compiler!r} not found (set CXX)"
        )
    key = hashlib.sha256()
    for path in [*_sources(), headers / HEADER]:
        key.update(path.read_bytes())
    key.update(" ".join([compiler, *COMPILE_FLAGS]).encode())
    folder = cache_dir() / key.hexdigest()[:16]
    library = folder / LIBRARY_NAME
    if library.is_file():
        return str(library)
    folder.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: processes building at once never load a half
    # written file
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    command = [
        compiler,
        *COMPILE_FLAGS,
        f"-I{headers}",
        f"-I{KERNEL_DIR}",
        str(SOURCE),
        "-o",
        partial,
    ]
    if verbose:
        print(" ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(partial)
        raise LibraryUnavailable(
            f"building {DOMAIN}::{OPERATOR} failed ({' '.join(command)}):\n"
            f"{result.stderr[:4000]}"  # the first errors are the telling ones
        )
    os.replace(partial, library)
    return str(library)


def register(options, include_dir: Optional[str] = None) -> str:
    """Registers the operator with an ``onnxruntime.SessionOptions``, building it if needed.

    Returns:
        the library's path.
    """
    library = build_library(include_dir)
    options.register_custom_ops_library(library)
    return library
