"""COCO panoptic test-dev: the dataset without ground truth, the submission writer (zip of a
json and PNGs in COCO's panoptic results format) and ``train_net.py --eval-only`` writing it.

The generated COCO panoptic sample (tests/coco_panoptic_sample.py) stands in for test-dev: a
DETECTRON2_DATASETS folder whose ``coco/test2017`` is the sample's images, with an image-info json
listing them.
"""

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from skips import require, require_detectron2

require_detectron2()
require("panopticapi", "the submission writer needs panopticapi installed")

from d2_helpers import CONFIGS, PERMISSIVE, ROOT, TINY, lay_out_test_dev, make_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from panopticapi.evaluation import pq_compute  # noqa: E402
from panopticapi.utils import rgb2id  # noqa: E402
from PIL import Image  # noqa: E402

from panoptic_segformer.d2.data import (  # noqa: E402
    load_panoptic_json,
    register_all_coco_panoptic_test,
)
from panoptic_segformer.d2.evaluation import (  # noqa: E402
    COCOPanopticSubmissionWriter,
    check_panoptic_dataset,
    describe_segments,
)

sys.path.insert(0, str(ROOT))
from panoptic_segformer.d2.engine import train as train_net

NAME = "coco_2017_test-dev_panoptic"
CONFIG = CONFIGS[0].parent / "r50.yaml"
SUBMISSION = "panoptic_test-dev2017_PanopticSegFormer_results"


def unregister():
    if NAME in DatasetCatalog.list():
        DatasetCatalog.remove(NAME)
        MetadataCatalog.remove(NAME)


@pytest.fixture
def register_under():
    """Registers test-dev under the given root; afterwards, registers it as the config does
    (under $DETECTRON2_DATASETS; the config registers once per process, tests/test_imports.py
    checks that it does)."""
    unregister()
    yield lambda root: register_all_coco_panoptic_test(str(root))
    unregister()
    register_all_coco_panoptic_test(os.getenv("DETECTRON2_DATASETS", "datasets"))


def test_test_dev_has_images_only_and_val_metadata(tmp_path, register_under, coco_panoptic_sample):
    root = lay_out_test_dev(tmp_path, coco_panoptic_sample)
    register_under(root)
    images = root / "coco" / "test2017"
    assert DatasetCatalog.get(NAME) == [
        {
            "file_name": str(images / "000000142238.jpg"),
            "image_id": 142238,
            "height": 427,
            "width": 640,
        },
        {
            "file_name": str(images / "000000439180.jpg"),
            "image_id": 439180,
            "height": 360,
            "width": 640,
        },
    ]
    meta = MetadataCatalog.get(NAME)
    val = MetadataCatalog.get("coco_2017_val_panoptic")  # detectron2's "standard" metadata
    for key in (
        "thing_classes",
        "stuff_classes",
        "thing_colors",
        "stuff_colors",
        "thing_dataset_id_to_contiguous_id",
        "stuff_dataset_id_to_contiguous_id",
        "ignore_label",
        "label_divisor",
    ):
        assert meta.get(key) == val.get(key), key
    assert meta.evaluator_type == "coco_panoptic_submission"
    assert meta.submission_split == "test-dev2017"
    assert meta.image_root == str(images)
    # no ground truth for the evaluators to find
    for key in ("panoptic_json", "panoptic_root", "json_file", "sem_seg_root"):
        assert meta.get(key, None) is None, key


def test_missing_json_is_named_on_get(tmp_path, register_under):
    register_under(tmp_path)
    register_under(tmp_path / "elsewhere")  # already registered: left alone
    missing = tmp_path / "coco" / "annotations" / "image_info_test-dev2017.json"
    with pytest.raises(FileNotFoundError, match=f"Image-info json {re.escape(str(missing))}"):
        DatasetCatalog.get(NAME)


def test_describe_segments_measures_the_id_map():
    ids = np.array(
        [
            [0, 0, 5, 5, 5, 0],
            [7, 7, 5, 5, 5, 0],
            [7, 0, 0, 0, 0, 0],
            [70000, 70000, 70000, 0, 0, 0],
        ]
    )
    listed = [
        {"id": 7, "category_id": 92, "score": 0.5},
        {"id": 9, "category_id": 3},  # no pixel: left out
        {"id": 5, "category_id": 1},
        {"id": 70000, "category_id": 200},
    ]
    assert describe_segments(ids, listed, "a.png") == [
        {"id": 7, "category_id": 92, "iscrowd": 0, "area": 3, "bbox": [0, 1, 2, 2]},
        {"id": 5, "category_id": 1, "iscrowd": 0, "area": 6, "bbox": [2, 0, 3, 2]},
        {"id": 70000, "category_id": 200, "iscrowd": 0, "area": 3, "bbox": [0, 3, 3, 1]},
    ]
    with pytest.raises(ValueError, match=r"a.png has pixels of segment ids \[70000\]"):
        describe_segments(ids, listed[:3], "a.png")


def read_submission(path):
    """The zip's json and its PNGs as id maps, by file name; checks the zip's layout."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        content = json.loads(archive.read(f"{SUBMISSION}.json"))
        pngs = {
            name.split("/", 1)[1]: rgb2id(np.asarray(Image.open(io.BytesIO(archive.read(name)))))
            for name in names
            if name.startswith(f"{SUBMISSION}/")
        }
    assert sorted(names) == sorted([f"{SUBMISSION}.json"] + [f"{SUBMISSION}/{n}" for n in pngs])
    return content, pngs


def write(outputs, output_dir):
    """Runs the writer of coco_2017_test-dev_panoptic on ``{image_id: (file name, panoptic_seg)}``,
    one image per ``process`` call; returns the zip's path."""
    writer = train_net.Trainer.build_evaluator(make_cfg(CONFIG), NAME, str(output_dir))
    writer.reset()
    for image_id, (file_name, panoptic_seg) in outputs.items():
        writer.process(
            [{"file_name": f"/images/{file_name}", "image_id": image_id}],
            [{"panoptic_seg": panoptic_seg}],
        )
    assert writer.evaluate() == {}
    return writer.zip_path


def test_writer_zips_json_and_pngs_in_coco_format(tmp_path):
    ids = torch.tensor(
        [
            [0, 0, 5, 5, 5, 0],
            [7, 7, 5, 5, 5, 0],
            [7, 7, 0, 0, 0, 0],
            [70000, 70000, 70000, 0, 0, 0],
        ],
        dtype=torch.int32,
    )
    # contiguous ids: person 0, car 2, banner 80, rug-merged 132 (COCO ids 1, 3, 92, 200)
    segments = [
        {"id": 5, "category_id": 0, "isthing": True, "score": 0.9},
        {"id": 7, "category_id": 80, "isthing": False, "score": 0.8},
        {"id": 9, "category_id": 2, "isthing": True, "score": 0.7},  # painted over: no pixel
        {"id": 70000, "category_id": 132, "isthing": False, "score": 0.6},
    ]
    empty = torch.zeros(3, 2, dtype=torch.int32)
    # image 20 comes first: the json is in image id order
    outputs = {20: ("b.jpg", (empty, [])), 10: ("a.jpg", (ids, segments))}
    zip_path = write(outputs, tmp_path)

    assert zip_path == str(tmp_path / f"{SUBMISSION}.zip")
    content, pngs = read_submission(zip_path)
    assert content == {
        "annotations": [
            {
                "image_id": 10,
                "file_name": "a.png",
                "segments_info": [
                    {"id": 5, "category_id": 1, "iscrowd": 0, "area": 6, "bbox": [2, 0, 3, 2]},
                    {"id": 7, "category_id": 92, "iscrowd": 0, "area": 4, "bbox": [0, 1, 2, 2]},
                    {
                        "id": 70000,
                        "category_id": 200,
                        "iscrowd": 0,
                        "area": 3,
                        "bbox": [0, 3, 3, 1],
                    },
                ],
            },
            {"image_id": 20, "file_name": "b.png", "segments_info": []},
        ]
    }
    assert pngs.keys() == {"a.png", "b.png"}
    np.testing.assert_array_equal(pngs["a.png"], ids.numpy())
    np.testing.assert_array_equal(pngs["b.png"], empty.numpy())
    # the same json and PNGs unzipped next to the zip
    assert json.loads((tmp_path / f"{SUBMISSION}.json").read_text()) == content
    unzipped = Image.open(tmp_path / SUBMISSION / "a.png")
    np.testing.assert_array_equal(rgb2id(np.asarray(unzipped)), ids.numpy())


def test_ground_truth_written_as_submission_scores_pq_100(tmp_path, coco_panoptic_sample):
    # the sample's annotations as the "model's" outputs (contiguous ids): panopticapi, the
    # server's evaluation, reads the submission back as exactly the ground truth
    sample = coco_panoptic_sample
    meta = MetadataCatalog.get(NAME)
    records = load_panoptic_json(
        str(sample / "panoptic.json"),
        str(sample / "images"),
        str(sample / "panoptic"),
        thing_dataset_id_to_contiguous_id=meta.thing_dataset_id_to_contiguous_id,
        stuff_dataset_id_to_contiguous_id=meta.stuff_dataset_id_to_contiguous_id,
    )
    outputs = {}
    for record in records:
        ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
        segments = [
            {k: s[k] for k in ("id", "category_id", "isthing")} for s in record["segments_info"]
        ]
        name = os.path.basename(record["file_name"])
        outputs[record["image_id"]] = (name, (torch.from_numpy(ids.astype(np.int32)), segments))
    zip_path = write(outputs, tmp_path / "out")

    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "unzipped")
    results = pq_compute(
        str(sample / "panoptic.json"),
        str(tmp_path / "unzipped" / f"{SUBMISSION}.json"),
        gt_folder=str(sample / "panoptic"),
        pred_folder=str(tmp_path / "unzipped" / SUBMISSION),
    )
    # the categories of the sample: person, car, dog and chair; sky, grass, wall and floor
    for part, categories in (("All", 8), ("Things", 4), ("Stuff", 4)):
        assert results[part]["pq"] == pytest.approx(1.0), part
        assert results[part]["n"] == categories, part


def test_evaluation_of_test_dev_is_the_writer_alone(tmp_path):
    cfg = make_cfg(CONFIG, "TEST.SUBMISSION_NAME", "psf-r50")
    writer = train_net.Trainer.build_evaluator(cfg, NAME, str(tmp_path))
    assert type(writer) is COCOPanopticSubmissionWriter
    assert writer.zip_path == str(tmp_path / "panoptic_test-dev2017_psf-r50_results.zip")
    cfg.MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON = False
    with pytest.raises(ValueError, match=f"'{NAME}' has no ground truth.*PANOPTIC_ON"):
        train_net.Trainer.build_evaluator(cfg, NAME, str(tmp_path))
    with pytest.raises(ValueError, match=f"'{NAME}' has no ground truth"):
        check_panoptic_dataset(NAME)  # tools that score (eval_robustness) refuse it by name
    with pytest.raises(ValueError, match="submission name 'psf_r50' must be letters"):
        COCOPanopticSubmissionWriter(NAME, str(tmp_path), "psf_r50")
    with pytest.raises(ValueError, match="'coco_2017_val_panoptic' has no submission_split"):
        COCOPanopticSubmissionWriter("coco_2017_val_panoptic", str(tmp_path), "psf")


def test_train_net_eval_only_writes_the_submission(tmp_path, coco_panoptic_sample):
    # docs/getting_started.md's command on a tiny random model that paints segments, in two
    # processes (gloo): each predicts one image, the main process writes both
    torch.manual_seed(0)
    weights = tmp_path / "init.pth"
    torch.save({"model": build_model(make_cfg(CONFIG, *TINY)).state_dict()}, weights)
    output_dir = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "train_net.py"), "--config-file", str(CONFIG), "--eval-only",
        "--num-gpus", "2",
        *TINY, *PERMISSIVE,
        # above most of the untrained masks' values: several segments per image, out of 10
        # thing and 53 stuff candidates (the merging of more takes seconds on the CPU)
        "MODEL.PANOPTIC_SEGFORMER.TEST.MASK_THRESHOLD", "1.0",
        "MODEL.PANOPTIC_SEGFORMER.TEST.MAX_DETECTIONS", "10",
        "MODEL.WEIGHTS", str(weights),
        "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False",
        "DATASETS.TEST", f"('{NAME}',)",
        "INPUT.MIN_SIZE_TEST", "160",
        "INPUT.MAX_SIZE_TEST", "256",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    datasets = lay_out_test_dev(tmp_path / "datasets", coco_panoptic_sample)
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets)}
    run = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]

    zip_path = output_dir / "inference" / NAME / f"{SUBMISSION}.zip"
    assert f"written to {zip_path}" in run.stdout + run.stderr
    content, pngs = read_submission(zip_path)
    annotations = content["annotations"]
    assert [a["image_id"] for a in annotations] == [142238, 439180]
    assert pngs.keys() == {"000000142238.png", "000000439180.png"}
    panoptic = json.loads((coco_panoptic_sample / "panoptic.json").read_text())
    coco_ids = {c["id"] for c in panoptic["categories"]}
    for annotation, size in zip(annotations, [(427, 640), (360, 640)]):
        ids = pngs[annotation["file_name"]]
        assert ids.shape == size  # the original image's size
        segments = annotation["segments_info"]
        assert len(segments) > 1
        assert {s["id"] for s in segments} == set(np.unique(ids).tolist()) - {0}
        assert {s["category_id"] for s in segments} <= coco_ids
        assert sum(s["area"] for s in segments) == int((ids > 0).sum())
