"""The CUDA kernel compiles and links, both ways users get it: ``setup.py`` with FORCE_CUDA=1 and
the JIT build on first CUDA use, each with ``CUDA_HOME`` unset (the toolkit is found as users
without it get it found). Needs the CUDA toolkit (nvcc), not a GPU; skipped without it.

To keep this quick, only one architecture is compiled (TORCH_CUDA_ARCH_LIST, default sm_90),
setup.py builds only its CUDA extension, and the two builds run at the same time, each in its
own process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from panoptic_segformer.layers import _extension, ms_deform_attn_op

ROOT = Path(__file__).resolve().parents[2]
FIND_TOOLKIT = (
    "import json; from panoptic_segformer.layers import _extension; "
    "print(json.dumps(_extension.find_cuda_toolkit()))"
)
JIT_BUILD = (
    "import sys; from panoptic_segformer.layers import _extension; "
    "print(_extension.build_extension(build_directory=sys.argv[1]).__file__)"
)
# setup.py, run by setuptools as pip runs it, building only the CUDA extension it defines (the
# CPU extension is what the package's own install built, and the kernels register on it)
SETUP_PY_CUDA_ONLY = """
import runpy, sys, setuptools
setup = setuptools.setup
def cuda_extension_only(**kwargs):
    kwargs["ext_modules"] = [e for e in kwargs["ext_modules"] if e.name == "panoptic_segformer._C"]
    assert kwargs["ext_modules"], "setup.py defines no CUDA extension"
    return setup(**kwargs)
setuptools.setup = cuda_extension_only
sys.argv = ["setup.py", "-q", "build_ext", "--build-lib", sys.argv[1], "--build-temp", sys.argv[2]]
runpy.run_path("setup.py", run_name="__main__")
"""


def assert_is_the_extension(path, name):
    """In a fresh process (so nothing loaded earlier counts): loading the library at ``path`` (the
    Python module ``name``) registers CUDA kernels for both operators, which the CPU extension
    defines."""
    script = f"""
import importlib.util, torch
from panoptic_segformer.layers import ms_deform_attn_op
assert ms_deform_attn_op.load_cpu_extension()[0] is not None
for op in ("ms_deform_attn", "ms_deform_attn_backward"):
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("panoptic_segformer::" + op, "CUDA")
spec = importlib.util.spec_from_file_location({name!r}, {str(path)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for op in ("ms_deform_attn", "ms_deform_attn_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("panoptic_segformer::" + op, "CUDA"), op
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)


class Build:
    """A build running in its own process, its output going to a file."""

    def __init__(self, command, env, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "build.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)

    def wait(self) -> str:
        """The build's output; fails the test with it when the build failed."""
        code = self.process.wait(timeout=1200)
        output = self.log.read_text()
        assert code == 0, output[-5000:]
        return output


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The JIT build and the setup.py build, started together with CUDA_HOME (and CUDA_PATH)
    unset; skips with the reason when no toolkit is found that way."""
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0", MAX_JOBS="2")
    found = subprocess.run(
        [sys.executable, "-c", FIND_TOOLKIT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    home, reason = json.loads(found.stdout.splitlines()[-1])
    if home is None:
        pytest.skip(f"with CUDA_HOME unset: {reason}")
    jit, setup = tmp_path_factory.mktemp("jit"), tmp_path_factory.mktemp("setup_py")
    setup_py = [sys.executable, "-c", SETUP_PY_CUDA_ONLY, str(setup / "lib"), str(setup / "tmp")]
    running = {
        "jit": Build([sys.executable, "-c", JIT_BUILD, str(jit)], env, jit),
        "setup.py": Build(setup_py, {**env, "FORCE_CUDA": "1"}, setup),
    }
    yield running
    for build in running.values():
        if build.process.poll() is None:
            build.process.kill()
            build.process.wait()


def test_jit_build(builds):
    output = builds["jit"].wait()
    library = Path(output.splitlines()[-1])
    assert library.parent == builds["jit"].folder
    assert_is_the_extension(library, _extension.JIT_NAME)


def test_setup_py_build_with_force_cuda(builds):
    builds["setup.py"].wait()
    (library,) = (builds["setup.py"].folder / "lib" / "panoptic_segformer").glob("_C*.so")
    assert_is_the_extension(library, "panoptic_segformer._C")


@pytest.fixture
def toolkits(tmp_path, monkeypatch):
    """A folder with only an ``nvcc`` wrapper script (as ``/usr/local/bin/nvcc`` here, which
    makes PyTorch take ``/usr/local`` for the toolkit) and a toolkit with the CUDA runtime; no
    CUDA_HOME or CUDA_PATH set."""
    wrapper, toolkit = tmp_path / "local", tmp_path / "cuda"
    for folder in (wrapper / "bin", toolkit / "bin", toolkit / "lib64"):
        folder.mkdir(parents=True)
    (wrapper / "bin" / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (toolkit / "bin" / "nvcc").write_text("")
    (toolkit / "lib64" / "libcudart.so.13").write_text("")
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(wrapper))
    return str(wrapper), str(toolkit)


def test_a_wrapper_nvcc_outside_the_toolkit_is_passed_over(toolkits, monkeypatch):
    wrapper, toolkit = toolkits
    monkeypatch.setattr(_extension, "USUAL_CUDA_HOME", toolkit)
    assert _extension.find_cuda_toolkit() == (toolkit, "")
    with _extension.cuda_toolkit(toolkit):  # what the builds compile and link with
        assert cpp_extension.CUDA_HOME == os.environ["CUDA_HOME"] == toolkit
        assert cpp_extension._join_cuda_home("lib64") == os.path.join(toolkit, "lib64")
    assert cpp_extension.CUDA_HOME == wrapper and "CUDA_HOME" not in os.environ


def test_no_toolkit_with_the_runtime_says_where_it_looked(toolkits, monkeypatch, tmp_path):
    wrapper, _ = toolkits
    monkeypatch.setattr(_extension, "USUAL_CUDA_HOME", str(tmp_path / "absent"))
    home, reason = _extension.find_cuda_toolkit()
    assert home is None
    assert f"{wrapper}: bin/nvcc but no CUDA runtime library (libcudart)" in reason
    assert f"{tmp_path / 'absent'}: no bin/nvcc" in reason
    assert reason.endswith("set CUDA_HOME to the toolkit's folder")
    with pytest.raises(RuntimeError, match="cannot build the multi-scale deformable attention"):
        _extension.build_extension()


def test_cuda_home_is_taken_as_given(toolkits, monkeypatch):
    wrapper, toolkit = toolkits
    monkeypatch.setattr(_extension, "USUAL_CUDA_HOME", toolkit)
    monkeypatch.setenv("CUDA_HOME", wrapper)  # the user's choice: not replaced by a guess
    home, reason = _extension.find_cuda_toolkit()
    assert home is None and reason.startswith(f"no CUDA toolkit found ({wrapper}: bin/nvcc but")
    monkeypatch.setenv("CUDA_HOME", toolkit)
    assert _extension.find_cuda_toolkit() == (toolkit, "")


def test_a_loaded_extension_that_cannot_be_set_up_is_reported_unavailable(monkeypatch):
    # e.g. the operator's Python parts cannot be registered with this PyTorch: the extension then
    # counts as unavailable (callers take the PyTorch path), with the reason, once per process
    monkeypatch.setattr(ms_deform_attn_op, "_loaded", {})
    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("no register_fake here")

    for _ in range(2):
        module, reason = ms_deform_attn_op._load_once(
            "json", None, "test extension", after_load=fail
        )
        assert module is None
        assert reason == "the test extension loaded but could not be set up: no register_fake here"
    assert calls == [1]
