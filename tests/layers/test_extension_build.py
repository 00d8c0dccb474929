"""The CUDA kernel compiles and links, both ways users get it: ``setup.py`` with FORCE_CUDA=1 and
the JIT build on first CUDA use. Needs the CUDA toolkit (nvcc), not a GPU; skipped without it.

Only one architecture is compiled (TORCH_CUDA_ARCH_LIST, default sm_90) to keep this quick.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from panoptic_segformer.layers import _extension

ROOT = Path(__file__).resolve().parents[2]
needs_nvcc = pytest.mark.skipif(
    _extension.cuda_toolkit_home() is None or torch.version.cuda is None,
    reason="needs the CUDA toolkit (nvcc under CUDA_HOME) and a CUDA build of torch",
)


@pytest.fixture
def one_arch(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0")


def assert_is_the_extension(module):
    assert callable(module.ms_deform_attn_forward) and callable(module.ms_deform_attn_backward)
    # The bindings' own checks run before any CUDA call, so they work without a GPU.
    cpu = torch.zeros(1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="value must be a CUDA tensor, got cpu"):
        module.ms_deform_attn_forward(
            cpu,
            torch.ones(1, 2, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 1, 1, 1, 1, 2),
            torch.zeros(1, 1, 1, 1, 1),
        )


@needs_nvcc
def test_jit_build(tmp_path, one_arch):
    module = _extension.build_extension(build_directory=str(tmp_path))
    assert Path(module.__file__).parent == tmp_path
    assert_is_the_extension(module)


@needs_nvcc
def test_setup_py_build_with_force_cuda(tmp_path, one_arch):
    env = {**os.environ, "FORCE_CUDA": "1", "MAX_JOBS": "2"}
    subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    (library,) = (tmp_path / "lib" / "panoptic_segformer").glob("_C*.so")
    spec = importlib.util.spec_from_file_location("panoptic_segformer._C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert_is_the_extension(module)
