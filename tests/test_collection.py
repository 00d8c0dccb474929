"""Without any one of the optional dependencies, the suite collects without errors: every test
module that needs the missing library skips with its reason instead of failing at import.

Each dependency is hidden in turn (``tests/hidden_modules.py``: unimportable, and
``importlib.util.find_spec`` finds nothing, as on a machine without it) while the whole suite is
collected. Hiding one library at a time matters: a module guarded for detectron2 but not for
OpenCV fails only where detectron2 is present and OpenCV is not.
"""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# the optional libraries the package or its tests import (setup.py's extras, detectron2 and fvcore,
# which detectron2 needs too, panopticapi)
OPTIONAL = (
    "cv2",
    "detectron2",
    "fvcore",
    "imagecorruptions",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "panopticapi",
    "submitit",
    "timm",
)

# Imports the libraries every test module needs once, then collects the suite in forked children,
# two at a time, each with one library hidden; prints "<library> <pytest's exit code> <found by
# find_spec once hidden>" per library, and the end of pytest's report where that is not "0 False".
COLLECT_WITHOUT_EACH = """
import importlib.util, os, sys, tempfile
import numpy, PIL.Image, pytest, scipy.optimize, torch, torchvision
for name in ("ml_dtypes", "matplotlib.pyplot", "pycocotools.mask", "iopath", "omegaconf", "tabulate"):
    try:  # what the optional libraries import, never one of them
        __import__(name)
    except ImportError:
        pass
sys.path.insert(0, {tests!r})
from hidden_modules import hide

def collect_without(library, log):
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    hide([library])
    found = importlib.util.find_spec(library) is not None
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", {tests!r}])
    print(f"{{library}} {{int(code)}} {{found}}", flush=True)
    os._exit(0)

libraries, running, logs = sys.argv[1:], {{}}, {{}}
while libraries or running:
    while libraries and len(running) < 2:
        library = libraries.pop(0)
        logs[library] = tempfile.TemporaryFile("w+")
        pid = os.fork()
        if pid == 0:
            collect_without(library, logs[library])
        running[pid] = library
    pid, _ = os.wait()
    running.pop(pid)
for library, log in logs.items():
    log.seek(0)
    lines = log.read().splitlines() or [f"{{library}} none"]
    print(lines[-1])
    if lines[-1] != f"{{library}} 0 False":  # the end of pytest's report: the errors
        print(f"--- without {{library}}:", *lines[-40:], sep="\\n", file=sys.stderr)
"""


def test_the_suite_collects_without_each_optional_dependency():
    installed = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(COLLECT_WITHOUT_EACH.format(tests=str(TESTS))),
            *installed,
        ],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    # exit code 0: collected without errors (2 would be "interrupted: errors during collection");
    # False: the library really was hidden
    assert results == {name: "0 False" for name in installed}, done.stderr
