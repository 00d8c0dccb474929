"""Installs panoptic_segformer and compiles its kernels when it can.

* The CUDA deformable-attention kernel is built here when a GPU is visible (and nvcc found) or
  when FORCE_CUDA=1; otherwise the package installs without it and builds it on first CUDA use
  (JIT).
* The CPU extension is built whenever a C++ compiler is found: it defines the deformable-attention
  operator (``panoptic_segformer::ms_deform_attn``) with its CPU kernels; without a compiler it
  is built on first use, or the operator's PyTorch path runs.

Install with ``pip install --no-build-isolation -e ".[detectron2,test]"`` so the build (ours and
detectron2's) sees the installed torch.
"""

import importlib.util
import os
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_constant(path: str, name: str) -> str:
    """The string constant ``name = "..."`` of a package file, read without importing it."""
    text = (ROOT / path).read_text()
    return re.search(rf'^{name} = "([^"]+)"', text, re.M).group(1)


def load_build_helpers():
    """panoptic_segformer/layers/_extension.py, loaded by path (it imports no torch at top)."""
    path = ROOT / "panoptic_segformer" / "layers" / "_extension.py"
    spec = importlib.util.spec_from_file_location("_panoptic_segformer_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension(torch, helpers):
    """The CUDA kernels of the deformable-attention operator, or None when they are left to JIT."""
    from torch.utils.cpp_extension import CUDAExtension

    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if not (force or torch.cuda.is_available()):
        print("panoptic_segformer: no GPU visible; the CUDA kernel will be built on first CUDA use")
        return None
    home, reason = helpers.find_cuda_toolkit()
    if home is None:
        if force:
            raise RuntimeError(f"FORCE_CUDA=1 but {reason}")
        print(f"panoptic_segformer: {reason}; the CUDA kernel will be built on first CUDA use")
        return None
    helpers.use_cuda_toolkit(home)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = helpers.DEFAULT_ARCH_LIST
    sources = [os.path.relpath(p, ROOT) for p in helpers.source_paths()]
    return CUDAExtension(
        "panoptic_segformer._C", sources=sources, extra_compile_args=helpers.compile_args()
    )


def cpu_extension(helpers):
    """The CPU extension (the deformable-attention operator and its CPU kernels), or None without
    a C++ compiler (the package then builds it on first use if
    one appears, or runs the PyTorch paths)."""
    from torch.utils.cpp_extension import CppExtension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"panoptic_segformer: no C++ compiler ({compiler}); skipping the CPU kernel")
        return None
    sources = [os.path.relpath(p, ROOT) for p in helpers.cpu_source_paths()]
    return CppExtension(
        "panoptic_segformer._cpu",
        sources=sources,
        extra_compile_args=helpers.cpu_compile_args(),
        extra_link_args=helpers.cpu_link_args(),
    )


def get_extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            raise RuntimeError(
                "FORCE_CUDA=1 needs torch installed first (and --no-build-isolation)"
            )
        return [], {}
    helpers = load_build_helpers()
    extensions = [e for e in (cuda_extension(torch, helpers), cpu_extension(helpers)) if e]
    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()
# timm's oldest release with what the Swin / PVTv2 backbones use, and the one the tests need
# (they build on the meta device); both are explained in panoptic_segformer/modeling/backbone.py.
BACKBONE = "panoptic_segformer/modeling/backbone.py"
TIMM_MIN_VERSION = read_constant(BACKBONE, "TIMM_MIN_VERSION")
TIMM_TEST_MIN_VERSION = read_constant(BACKBONE, "TIMM_FACTORY_KWARGS_MIN_VERSION")

setup(
    name="panoptic_segformer",
    version=read_constant("panoptic_segformer/__init__.py", "__version__"),
    description="Panoptic SegFormer (CVPR 2022) for detectron2",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "configs", "demo")),
    package_data={
        "panoptic_segformer.layers": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h"],
        # the ONNX Runtime operator, built on first use (deploy/ort_ops.py)
        "panoptic_segformer.deploy": ["csrc/*.cpp"],
    },
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "scipy", "ninja"],
    extras_require={
        # OpenCV: the demo's and the Boundary PQ reference's tests
        "test": ["pytest>=7", f"timm>={TIMM_TEST_MIN_VERSION}", "fvcore", "opencv-python-headless"],
        # training, evaluation and the demo; neither is on PyPI, so both come from their
        # repositories (detectron2 builds against the installed torch: --no-build-isolation)
        "detectron2": [
            "detectron2 @ git+https://github.com/facebookresearch/detectron2.git",
            "panopticapi @ git+https://github.com/cocodataset/panopticapi.git",
            "opencv-python-headless",
        ],
        "timm": [f"timm>={TIMM_MIN_VERSION}"],
        "benchmark": ["fvcore"],
        "robustness": ["imagecorruptions"],
        # tools/deploy: ONNX export (torch.onnx's exporter writes through onnxscript) and ONNX
        # Runtime; the versions tested (docs/deployment.md)
        "deploy": ["onnx>=1.23", "onnxruntime>=1.32", "onnxscript>=0.7"],
        # tools/submit.py: training on SLURM, requeued and resumed on preemption
        "cluster": ["submitit>=1.5"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
