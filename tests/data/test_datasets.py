"""Dataset registration: the COCO-panoptic sample, bad jsons, ADE20K layout (absent, synthetic)."""

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skips import require_detectron2

require_detectron2("dataset registration needs detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from panoptic_segformer.d2.data import (  # noqa: E402
    PanopticSegFormerDatasetMapper,
    metadata_from_categories,
    register_all_ade20k_panoptic,
    register_builtin_datasets,
    register_panoptic_dataset,
)

ADE_NAMES = ("ade20k_panoptic_train", "ade20k_panoptic_val")


@pytest.fixture
def sample(coco_panoptic_sample):
    return coco_panoptic_sample


@pytest.fixture
def unique_name():
    """A fresh dataset name, removed from both catalogs afterwards."""
    name = f"test_datasets_{uuid.uuid4().hex}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _unregister_ade():
    for name in ADE_NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


@pytest.fixture
def fresh_ade():
    """Lets a test register the ADE20K names itself; restores the usual registration."""
    _unregister_ade()
    yield
    _unregister_ade()
    register_all_ade20k_panoptic(os.getenv("DETECTRON2_DATASETS", "datasets"))


def test_register_sample_gives_standard_dicts(sample, unique_name):
    register_panoptic_dataset(
        unique_name,
        str(sample / "images"),
        str(sample / "panoptic"),
        str(sample / "panoptic.json"),
        instances_json="instances.json",
        sem_seg_root="semantic",
    )
    dicts = DatasetCatalog.get(unique_name)
    assert len(dicts) == 2
    first, second = dicts
    assert first["file_name"] == str(sample / "images" / "000000142238.jpg")
    assert first["pan_seg_file_name"] == str(sample / "panoptic" / "000000142238.png")
    assert first["sem_seg_file_name"] == os.path.join("semantic", "000000142238.png")
    assert (first["image_id"], first["height"], first["width"]) == (142238, 427, 640)
    assert (second["image_id"], second["height"], second["width"]) == (439180, 360, 640)
    assert [len(d["segments_info"]) for d in dicts] == [5, 6]
    assert [[s["iscrowd"] for s in d["segments_info"]] for d in dicts] == [
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 1],
    ]
    # car, drawn at rows 250:400, columns 360:600, less the crowd drawn over its corner
    assert first["segments_info"][3] == {
        "id": 4,
        "category_id": 2,  # car
        "isthing": True,
        "iscrowd": 0,
        "area": 240 * 150 - 120 * 10,
        "bbox": [360, 250, 240, 150],
    }
    wall = second["segments_info"][0]
    assert (wall["category_id"], wall["isthing"]) == (131, False)  # wall-other-merged
    assert_files_and_categories(sample, unique_name, dicts)


def test_register_real_sample_gives_standard_dicts(real_coco_panoptic_sample, unique_name):
    sample = real_coco_panoptic_sample
    register_panoptic_dataset(
        unique_name, str(sample / "images"), str(sample / "panoptic"), str(sample / "panoptic.json")
    )
    dicts = DatasetCatalog.get(unique_name)
    assert [len(d["segments_info"]) for d in dicts] == [18, 32]
    assert [sum(s["iscrowd"] for s in d["segments_info"]) for d in dicts] == [1, 2]
    assert dicts[0]["segments_info"][0] == {
        "id": 3937500,
        "category_id": 0,  # person
        "isthing": True,
        "iscrowd": 0,
        "area": 3528,
        "bbox": [282, 207, 48, 149],
    }
    assert_files_and_categories(sample, unique_name, dicts)


def assert_files_and_categories(sample: Path, name: str, dicts) -> None:
    """The records' files exist, and every segment maps back to its json category."""
    assert all(
        Path(d["file_name"]).is_file() and Path(d["pan_seg_file_name"]).is_file() for d in dicts
    )

    # every segment maps back to its json category through the metadata
    meta = MetadataCatalog.get(name)
    contiguous_to_json = {
        v: k
        for k, v in {
            **meta.thing_dataset_id_to_contiguous_id,
            **meta.stuff_dataset_id_to_contiguous_id,
        }.items()
    }
    raw = json.loads((sample / "panoptic.json").read_text())
    for record, annotation in zip(dicts, raw["annotations"]):
        for seg, raw_seg in zip(record["segments_info"], annotation["segments_info"]):
            assert contiguous_to_json[seg["category_id"]] == raw_seg["category_id"]
            assert seg["isthing"] == (seg["category_id"] < 80)


def test_sample_metadata_equals_detectron2_builtin_coco(sample, unique_name):
    register_panoptic_dataset(
        unique_name,
        str(sample / "images"),
        str(sample / "panoptic"),
        str(sample / "panoptic.json"),
        instances_json="instances.json",
    )
    meta = MetadataCatalog.get(unique_name)
    builtin = MetadataCatalog.get("coco_2017_val_panoptic")  # detectron2's "standard" metadata
    assert len(meta.thing_dataset_id_to_contiguous_id) == 80
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 53
    assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(80))
    assert sorted(meta.stuff_dataset_id_to_contiguous_id.values()) == list(range(80, 133))
    for key in (
        "thing_dataset_id_to_contiguous_id",
        "stuff_dataset_id_to_contiguous_id",
        "thing_classes",
        "stuff_classes",
        "thing_colors",
        "stuff_colors",
    ):
        assert meta.get(key) == builtin.get(key), key
    assert (meta.evaluator_type, meta.ignore_label, meta.label_divisor) == (
        "coco_panoptic_seg",
        255,
        1000,
    )
    assert meta.panoptic_json == str(sample / "panoptic.json")
    assert (meta.image_root, meta.panoptic_root) == (
        str(sample / "images"),
        str(sample / "panoptic"),
    )
    assert meta.json_file == "instances.json"
    assert meta.get("sem_seg_root", None) is None


def test_given_metadata_overrides_defaults(sample, unique_name):
    classes = metadata_from_categories(
        json.loads((sample / "panoptic.json").read_text())["categories"]
    )
    register_panoptic_dataset(
        unique_name,
        str(sample / "images"),
        str(sample / "panoptic"),
        str(sample / "no_such.json"),  # not read: the metadata has the classes
        metadata={**classes, "label_divisor": 256},
    )
    meta = MetadataCatalog.get(unique_name)
    assert meta.label_divisor == 256 and len(meta.stuff_classes) == 133
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        DatasetCatalog.get(unique_name)


def test_unknown_category_raises_naming_json_image_and_id(sample, tmp_path, unique_name):
    raw = json.loads((sample / "panoptic.json").read_text())
    raw["annotations"][1]["segments_info"][5]["category_id"] = 999
    bad_json = tmp_path / "bad_panoptic.json"
    bad_json.write_text(json.dumps(raw))
    register_panoptic_dataset(
        unique_name, str(sample / "images"), str(sample / "panoptic"), str(bad_json)
    )
    pattern = f"{re.escape(str(bad_json))}.*000000439180.jpg.*999"
    with pytest.raises(ValueError, match=pattern):
        DatasetCatalog.get(unique_name)


def test_missing_json_raises_at_registration(tmp_path, unique_name):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        register_panoptic_dataset(unique_name, str(tmp_path), str(tmp_path), str(missing))


def test_colors_without_json_color_are_deterministic():
    categories = [
        {"id": 7, "name": "a", "isthing": 1},
        {"id": 3, "name": "b", "isthing": 0, "color": [1, 2, 3]},
    ]
    meta = metadata_from_categories(categories)
    again = metadata_from_categories(categories)
    assert meta["thing_colors"] == again["thing_colors"] == meta["stuff_colors"]
    assert meta["thing_colors"][1] == [1, 2, 3]
    assert len(meta["thing_colors"][0]) == 3 and all(0 <= c < 256 for c in meta["thing_colors"][0])
    assert meta["thing_dataset_id_to_contiguous_id"] == {7: 0}
    assert meta["stuff_dataset_id_to_contiguous_id"] == {3: 1}


def test_builtin_datasets_register_ade20k(tmp_path, fresh_ade):
    register_builtin_datasets(str(tmp_path))
    assert set(ADE_NAMES) <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("ade20k_panoptic_val")
    assert meta.evaluator_type == "ade20k_panoptic_seg"
    assert meta.panoptic_json == str(tmp_path / "ADEChallengeData2016" / "ade20k_panoptic_val.json")


def test_ade20k_absent_root_raises_on_get(tmp_path, fresh_ade):
    register_all_ade20k_panoptic(str(tmp_path))
    register_all_ade20k_panoptic(str(tmp_path))  # already registered: left alone
    base = tmp_path / "ADEChallengeData2016"
    for split in ("train", "val"):
        missing = base / f"ade20k_panoptic_{split}.json"
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            DatasetCatalog.get(f"ade20k_panoptic_{split}")
    meta = MetadataCatalog.get("ade20k_panoptic_val")
    assert meta.evaluator_type == "ade20k_panoptic_seg"
    assert meta.panoptic_root == str(base / "ade20k_panoptic_val")
    assert meta.image_root == str(base / "images" / "validation")
    assert meta.sem_seg_root == str(base / "annotations_detectron2" / "validation")


# Like ADE20K, things and stuff are interleaved in the category list.
ADE_LIKE_CATEGORIES = [
    {"id": 1, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
    {"id": 8, "name": "bed", "isthing": 1, "color": [204, 5, 255]},
    {"id": 4, "name": "floor", "isthing": 0, "color": [80, 50, 50]},
]


def write_ade_like_split(base: Path, split: str, folder: str) -> None:
    """One 6x8 image: wall on top, floor below, a bed (segment id 3) in the middle."""
    ids = np.full((6, 8), 1, dtype=np.uint32)
    ids[3:] = 2
    ids[2:5, 3:6] = 3
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    for sub in (f"images/{folder}", f"ade20k_panoptic_{split}"):
        (base / sub).mkdir(parents=True)
    Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(base / f"images/{folder}/ADE_1.jpg")
    Image.fromarray(rgb).save(base / f"ade20k_panoptic_{split}" / "ADE_1.png")
    segments = [
        {"id": 1, "category_id": 1, "iscrowd": 0, "area": 18, "bbox": [0, 0, 8, 3]},
        {"id": 2, "category_id": 4, "iscrowd": 0, "area": 21, "bbox": [0, 3, 8, 3]},
        {"id": 3, "category_id": 8, "iscrowd": 0, "area": 9, "bbox": [3, 2, 3, 3]},
    ]
    content = {
        "images": [{"id": 11, "file_name": "ADE_1.jpg", "height": 6, "width": 8}],
        "annotations": [{"image_id": 11, "file_name": "ADE_1.png", "segments_info": segments}],
        "categories": ADE_LIKE_CATEGORIES,
    }
    (base / f"ade20k_panoptic_{split}.json").write_text(json.dumps(content))


def test_ade20k_synthetic_layout(tmp_path, fresh_ade):
    base = tmp_path / "ADEChallengeData2016"
    write_ade_like_split(base, "train", "training")
    write_ade_like_split(base, "val", "validation")
    register_all_ade20k_panoptic(str(tmp_path))

    meta = MetadataCatalog.get("ade20k_panoptic_train")
    assert meta.evaluator_type == "ade20k_panoptic_seg"
    assert meta.stuff_classes == meta.thing_classes == ["wall", "bed", "floor"]
    assert meta.thing_dataset_id_to_contiguous_id == {8: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == {1: 0, 4: 2}
    assert meta.sem_seg_root == str(base / "annotations_detectron2" / "training")

    (record,) = DatasetCatalog.get("ade20k_panoptic_val")
    assert record["file_name"] == str(base / "images" / "validation" / "ADE_1.jpg")
    assert record["pan_seg_file_name"] == str(base / "ade20k_panoptic_val" / "ADE_1.png")
    assert record["sem_seg_file_name"] == str(
        base / "annotations_detectron2" / "validation" / "ADE_1.png"
    )
    assert (record["image_id"], record["height"], record["width"]) == (11, 6, 8)
    assert [(s["category_id"], s["isthing"]) for s in record["segments_info"]] == [
        (0, False),
        (2, False),
        (1, True),
    ]

    mapper = PanopticSegFormerDatasetMapper(
        True, augmentations=[], image_format="RGB", num_classes=3, thing_ids=[1]
    )
    instances = mapper(record)["instances"]
    assert instances.gt_classes.tolist() == [0, 2, 1]
    bed = torch.zeros(6, 8, dtype=torch.bool)
    bed[2:5, 3:6] = True
    assert torch.equal(instances.gt_masks.tensor[2], bed)
    assert instances.gt_boxes.tensor[2].tolist() == [3.0, 2.0, 6.0, 5.0]
    assert instances.gt_masks.tensor.sum().item() == 48  # the three segments tile the image
