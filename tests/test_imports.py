"""Importing works and is free of effects: every module imports first, alone, in a fresh
interpreter (the model core and deployment without detectron2), no dataset is registered and no
json read at import, and the package works beside another project that registers the same
names."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADE_NAMES = ("ade20k_panoptic_train", "ade20k_panoptic_val")
TAKEN = "is already registered; leaving it as it is"

needs_detectron2 = pytest.mark.skipif(
    importlib.util.find_spec("detectron2") is None, reason="needs detectron2"
)


def run_python(code: str, env: Dict[str, str], tmp_path: Path, args: Sequence[str] = ()) -> str:
    """Runs ``code`` with ``args`` in a fresh interpreter (with ``tmp_path`` then the repository
    first on the path); returns its stdout and stderr, or fails the test with them."""
    path = [str(tmp_path), str(ROOT), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))]
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


# The detectron2 layer: the modules that need detectron2. Every other module (the operator, the
# model core, deployment, the utilities) imports without it.
NEEDS_DETECTRON2 = {
    "panoptic_segformer.d2.backbone",
    "panoptic_segformer.d2.checkpoint",
    "panoptic_segformer.d2.class_info",
    "panoptic_segformer.d2.config",
    "panoptic_segformer.d2.data",
    "panoptic_segformer.d2.data.builtin",
    "panoptic_segformer.d2.data.coco_panoptic",
    "panoptic_segformer.d2.data.dataset_mapper",
    "panoptic_segformer.d2.data.subset",
    "panoptic_segformer.d2.data.train_loader",
    "panoptic_segformer.d2.engine.launch",
    "panoptic_segformer.d2.engine.preemption",
    "panoptic_segformer.d2.engine.train",
    "panoptic_segformer.d2.evaluation",
    "panoptic_segformer.d2.evaluation.boundary",
    "panoptic_segformer.d2.evaluation.instances",
    "panoptic_segformer.d2.evaluation.submission",
    "panoptic_segformer.d2.exported_predictor",
    "panoptic_segformer.d2.meta_arch",
    "panoptic_segformer.d2.predictor",
    "panoptic_segformer.d2.registration",
    "panoptic_segformer.d2.solver",
}


def package_modules():
    """Every module of the package, found on disk (finding them by importing would import
    them)."""
    names = []
    for path in sorted((ROOT / "panoptic_segformer").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


# third-party libraries slow to import, imported once before the children
THIRD_PARTY = ["numpy", "scipy.optimize", "torch", "torchvision", "onnx", "onnxscript", "timm"]

# Imports the third-party libraries once (none imports the package, so none can hide a cycle in
# it), then each module of the package in a forked child in which no module of the package is
# imported yet. Prints "<module> <exit status>" per module; a child prints its traceback.
IMPORT_EACH_FIRST = """
import importlib, os, sys, traceback
preload, modules = sys.argv[1].split(","), sys.argv[2:]
for name in filter(None, preload):
    try:
        importlib.import_module(name)
    except ImportError:  # an optional library: the modules that need it say so below
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "panoptic_segformer"]
for module in modules:
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            importlib.import_module(module)
        except BaseException as e:
            print(f"{module}: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    print(module, os.waitstatus_to_exitcode(status), flush=True)
"""


def import_each_first(modules, preload, tmp_path, env=None):
    """``{module: exit status}`` of importing each of ``modules`` first, and the output."""
    output = run_python(IMPORT_EACH_FIRST, env or {}, tmp_path, args=[",".join(preload), *modules])
    words = (line.split(" ") for line in output.splitlines())
    statuses = {w[0]: int(w[1]) for w in words if len(w) == 2 and w[0] in modules}
    return statuses, output


def test_package_modules_are_found():
    modules = package_modules()
    assert "panoptic_segformer" in modules
    assert "panoptic_segformer.modeling.postprocessing.mask_wise" in modules
    assert NEEDS_DETECTRON2 < set(modules)


@needs_detectron2
def test_every_module_imports_first_in_a_fresh_interpreter(tmp_path):
    # the data <-> evaluation cycle failed here: "cannot import name 'SUBMISSION_EVALUATOR_TYPE'
    # from partially initialized module 'panoptic_segformer.d2.evaluation'"
    modules = package_modules()
    detectron2 = ["config", "data", "engine", "evaluation", "modeling", "utils.visualizer"]
    preload = THIRD_PARTY + [f"detectron2.{name}" for name in detectron2]
    statuses, output = import_each_first(modules, preload, tmp_path)
    assert statuses == {m: 0 for m in modules}, output


def test_model_core_and_deployment_import_first_without_detectron2(tmp_path):
    # a detectron2 that cannot be imported, first on the path
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "__init__.py").write_text(
        "raise ImportError('detectron2 is unimportable in this test')\n"
    )
    modules = package_modules()
    statuses, output = import_each_first(modules, THIRD_PARTY, tmp_path)
    assert statuses == {m: int(m in NEEDS_DETECTRON2) for m in modules}, output
    # the stand-in is really in the way: the detectron2 layer fails on it, by name
    for module in NEEDS_DETECTRON2:
        assert f"{module}: ImportError: detectron2 is unimportable in this test" in output


def module_path(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(module: str, modules: Sequence[str]) -> Set[str]:
    """The package's modules that ``module`` imports anywhere in its code (at the top or inside a
    function: a lazy import closes a cycle too). ``from package import name`` counts as importing
    the submodule ``package.name`` when there is one, else the package."""
    is_package = module_path(module).name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(module_path(module).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {name for name in found if name in modules and name != module}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of nodes (first == last), or []."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    # e.g. data/builtin.py -> evaluation.py -> data/dataset_mapper.py -> data (its __init__
    # imports builtin), or layers/_extension.py -> layers/ms_deform_attn_op.py (inside a
    # function) -> layers/_extension.py
    modules = package_modules()
    graph = {module: imports_of(module, modules) for module in modules}
    assert (
        "panoptic_segformer.layers._extension"
        in graph["panoptic_segformer.layers.ms_deform_attn_op"]
    )
    assert find_cycle(graph) == []


# The package's folders are its layers, lowest first: a module imports only modules of its own
# layer or of lower ones (the package root, which only names the detectron2 layer's entry points
# lazily, is above them all).
LAYERS = ("utils", "layers", "modeling", "deploy", "d2")


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    if parts[1] not in LAYERS:  # the compiled extension: the operator's
        return LAYERS.index("layers")
    return LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    modules = package_modules()
    assert {m.split(".")[1] for m in modules if m.count(".")} == set(LAYERS)
    assert layer_of("panoptic_segformer.d2.config") == 4
    assert layer_of("panoptic_segformer.utils.safe_load") == 0


def test_no_upward_import_in_the_package():
    modules = package_modules()
    upward = sorted(
        f"{module} -> {name}"
        for module in modules
        for name in imports_of(module, modules)
        if layer_of(name) > layer_of(module)
    )
    assert upward == []


def test_the_config_is_a_leaf():
    # the config's keys import nothing of the package: registering the meta-architecture, the
    # backbone and the datasets is panoptic_segformer.d2.register()'s
    modules = package_modules()
    assert imports_of("panoptic_segformer.d2.config", modules) == set()
    # while the one call that registers imports what it registers
    assert imports_of("panoptic_segformer.d2.registration", modules) == {
        "panoptic_segformer.d2.backbone",
        "panoptic_segformer.d2.data.builtin",
        "panoptic_segformer.d2.meta_arch",
    }


def write_ade_val_json(root: Path) -> Path:
    """An ADE20K-layout val json with two categories under ``root``; returns its path."""
    path = root / "ADEChallengeData2016" / "ade20k_panoptic_val.json"
    path.parent.mkdir(parents=True)
    categories = [
        {"id": 1, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
        {"id": 8, "name": "bed", "isthing": 1, "color": [204, 5, 255]},
    ]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return path


@needs_detectron2
def test_importing_registers_no_dataset_and_reads_no_json(tmp_path):
    ade_json = write_ade_val_json(tmp_path / "datasets")
    output = run_python(
        f"""
        import sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        import panoptic_segformer
        from panoptic_segformer.d2 import checkpoint, config, data, evaluation, meta_arch, predictor
        from panoptic_segformer.d2.registration import register
        from detectron2.data import DatasetCatalog, MetadataCatalog
        ade_json = {str(ade_json)!r}
        names = ("ade20k_panoptic_val", "coco_2017_test-dev_panoptic")
        assert not any(name in DatasetCatalog.list() for name in names)
        assert ade_json not in opened
        from detectron2.config import get_cfg
        config.add_panoptic_segformer_config(get_cfg())
        assert not any(name in DatasetCatalog.list() for name in names)
        register()
        assert all(name in DatasetCatalog.list() for name in names)
        assert ade_json in opened
        print("classes", MetadataCatalog.get("ade20k_panoptic_val").stuff_classes)
        """,
        {"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
        tmp_path,
    )
    assert "classes ['wall', 'bed']" in output


# registers the ADE20K panoptic names at import, as Mask2Former does
OTHER_PROJECT = """
from detectron2.data import DatasetCatalog, MetadataCatalog

for name in ("ade20k_panoptic_train", "ade20k_panoptic_val"):
    DatasetCatalog.register(name, lambda: [{"file_name": "other_project.jpg"}])
    MetadataCatalog.get(name).set(registered_by="other_project")
"""


@needs_detectron2
@pytest.mark.parametrize("ours_first", [True, False], ids=["ours_first", "other_first"])
def test_another_project_registering_the_same_names(tmp_path, ours_first):
    (tmp_path / "other_project.py").write_text(OTHER_PROJECT)
    ours = "from panoptic_segformer.d2 import config, data, evaluation, meta_arch, predictor, registration"
    imports = [ours, "import other_project"]
    output = run_python(
        "\n".join(
            [
                "import logging",
                "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')",
                *(imports if ours_first else imports[::-1]),
                "from detectron2.config import get_cfg",
                "from detectron2.data import DatasetCatalog, MetadataCatalog",
                "registration.register()",
                "registration.register()",
                "for name in ('ade20k_panoptic_train', 'ade20k_panoptic_val'):",
                "    print(name, MetadataCatalog.get(name).registered_by, DatasetCatalog.get(name))",
                "print('test-dev', MetadataCatalog.get('coco_2017_test-dev_panoptic').evaluator_type)",
            ]
        ),
        {"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
        tmp_path,
    )
    for name in ADE_NAMES:
        # the other project's registration is kept, and said so once
        assert f"{name} other_project [{{'file_name': 'other_project.jpg'}}]" in output
        assert output.count(f"dataset {name!r} {TAKEN}") == 1
    assert "test-dev coco_panoptic_submission" in output


MAX_LINES = 400  # a file a reader takes in at once


def test_no_file_of_the_package_is_longer_than_max_lines():
    sources = [
        p
        for p in (ROOT / "panoptic_segformer").rglob("*")
        if p.suffix in {".py", ".cpp", ".cu", ".h"}
    ]
    assert len(sources) > 60
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sources}
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}
