"""The CUDA kernel compiles and links, both ways users get it: ``setup.py`` with FORCE_CUDA=1 and
the JIT build on first CUDA use. Needs the CUDA toolkit (nvcc), not a GPU; skipped without it.

Only one architecture is compiled (TORCH_CUDA_ARCH_LIST, default sm_90) to keep this quick.
"""

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


def assert_is_the_extension(path, name):
    """In a fresh process (so nothing loaded earlier counts): loading the library at ``path`` (the
    Python module ``name``) registers CUDA kernels for both operators, which the CPU extension
    defines."""
    script = f"""
import importlib.util, torch
from panoptic_segformer.layers import _extension
assert _extension.load_cpu_extension()[0] is not None
for op in ("ms_deform_attn", "ms_deform_attn_backward"):
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("panoptic_segformer::" + op, "CUDA")
spec = importlib.util.spec_from_file_location({name!r}, {str(path)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for op in ("ms_deform_attn", "ms_deform_attn_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("panoptic_segformer::" + op, "CUDA"), op
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)


@needs_nvcc
def test_jit_build(tmp_path, one_arch):
    module = _extension.build_extension(build_directory=str(tmp_path))
    assert Path(module.__file__).parent == tmp_path
    assert_is_the_extension(module.__file__, module.__name__)


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
    assert_is_the_extension(library, "panoptic_segformer._C")


def test_a_loaded_extension_that_cannot_be_set_up_is_reported_unavailable(monkeypatch):
    # e.g. the operator's Python parts cannot be registered with this PyTorch: the extension then
    # counts as unavailable (callers take the PyTorch path), with the reason, once per process
    monkeypatch.setattr(_extension, "_loaded", {})
    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("no register_fake here")

    for _ in range(2):
        module, reason = _extension._load_once("json", None, "test extension", after_load=fail)
        assert module is None
        assert reason == "the test extension loaded but could not be set up: no register_fake here"
    assert calls == [1]
