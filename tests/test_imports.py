"""Importing is free of effects: the model core without detectron2, no dataset registered and no
json read at import, and the package beside another project that registers the same names."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADE_NAMES = ("ade20k_panoptic_train", "ade20k_panoptic_val")
TAKEN = "is already registered; leaving it as it is"

needs_detectron2 = pytest.mark.skipif(
    importlib.util.find_spec("detectron2") is None, reason="needs detectron2"
)


def run_python(code: str, env: Dict[str, str], tmp_path: Path) -> str:
    """Runs ``code`` in a fresh interpreter (with ``tmp_path`` then the repository first on the
    path); returns its stdout and stderr, or fails the test with them."""
    path = [str(tmp_path), str(ROOT), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))]
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_model_core_imports_without_detectron2(tmp_path):
    # a detectron2 that cannot be imported, first on the path
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "__init__.py").write_text(
        "raise ImportError('detectron2 is unimportable in this test')\n"
    )
    output = run_python(
        """
        import pkgutil, sys
        import panoptic_segformer.layers, panoptic_segformer.modeling
        names = []
        for package in (panoptic_segformer.layers, panoptic_segformer.modeling):
            for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                __import__(module.name)
                names.append(module.name)
        assert "detectron2" not in sys.modules
        print("imported", len(names), "modules")
        try:
            import panoptic_segformer.config
        except ImportError as e:
            print("the detectron2 layer:", e)
        """,
        {},
        tmp_path,
    )
    assert "imported" in output
    # the stand-in is really in the way: the detectron2 layer fails on it
    assert "the detectron2 layer: detectron2 is unimportable in this test" in output


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
        from panoptic_segformer import checkpoint, config, data, evaluation, meta_arch, predictor
        from detectron2.data import DatasetCatalog, MetadataCatalog
        ade_json = {str(ade_json)!r}
        names = ("ade20k_panoptic_val", "coco_2017_test-dev_panoptic")
        assert not any(name in DatasetCatalog.list() for name in names)
        assert ade_json not in opened
        from detectron2.config import get_cfg
        config.add_panoptic_segformer_config(get_cfg())
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
    ours = "from panoptic_segformer import config, data, evaluation, meta_arch, predictor"
    imports = [ours, "import other_project"]
    output = run_python(
        "\n".join(
            [
                "import logging",
                "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')",
                *(imports if ours_first else imports[::-1]),
                "from detectron2.config import get_cfg",
                "from detectron2.data import DatasetCatalog, MetadataCatalog",
                "config.add_panoptic_segformer_config(get_cfg())",
                "config.add_panoptic_segformer_config(get_cfg())",
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
