"""Dataset mapper on the real COCO-panoptic sample: exact targets, augmentations, bad data."""

import copy
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skips import require, require_detectron2

require_detectron2("the dataset mapper needs detectron2")
rgb2id = require("panopticapi.utils", "reference decoder").rgb2id

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402

from panoptic_segformer.d2.config import add_panoptic_segformer_config  # noqa: E402
from panoptic_segformer.d2.data import (  # noqa: E402
    PanopticSegFormerDatasetMapper,
    build_augmentations,
    load_panoptic_json,
    register_panoptic_dataset,
)

NUM_CLASSES = 133
THING_IDS = range(80)  # COCO standard panoptic: things first


# non-crowd segments of the two images of each sample
NUM_KEPT = {"generated": (4, 5), "real": (17, 30)}


@pytest.fixture(scope="module", params=list(NUM_KEPT))
def sample_kind(request) -> str:
    """The generated COCO panoptic sample, and the two real photos where present."""
    return request.param


@pytest.fixture(scope="module")
def sample(sample_kind, request) -> Path:
    prefix = "real_" if sample_kind == "real" else ""
    return request.getfixturevalue(f"{prefix}coco_panoptic_sample")


@pytest.fixture(scope="module")
def dicts(sample):
    """The two sample dicts (142238: 640x427; 439180: 640x360)."""
    return load_panoptic_json(
        str(sample / "panoptic.json"), str(sample / "images"), str(sample / "panoptic")
    )


def png_ids(path) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(path).convert("RGB")))


def mapper(augmentations, **kwargs) -> PanopticSegFormerDatasetMapper:
    options = dict(image_format="RGB", num_classes=NUM_CLASSES, thing_ids=THING_IDS)
    options.update(kwargs)
    return PanopticSegFormerDatasetMapper(True, augmentations=augmentations, **options)


def make_cfg(**input_options):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    for key, value in input_options.items():
        node = cfg.INPUT
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def assert_boxes_enclose_masks(instances):
    """Each box is exactly [x_min, y_min, x_max + 1, y_max + 1] of its mask."""
    for mask, box in zip(instances.gt_masks.tensor, instances.gt_boxes.tensor):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert box.tolist() == [float(v) for v in expected]


def assert_consistent(out):
    image, instances = out["image"], out["instances"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert instances.image_size == tuple(image.shape[1:])
    assert instances.gt_masks.tensor.shape == (len(instances), *image.shape[1:])
    assert instances.gt_masks.tensor.dtype == torch.bool
    assert instances.gt_masks.tensor.flatten(1).any(1).all()  # no empty mask
    assert_boxes_enclose_masks(instances)


@pytest.mark.parametrize("index", [0, 1])
def test_targets_equal_png_segments_without_augmentation(dicts, sample_kind, index):
    record = dicts[index]
    num_kept = NUM_KEPT[sample_kind][index]
    out = mapper([])(record)
    ids = png_ids(record["pan_seg_file_name"])
    kept = [s for s in record["segments_info"] if not s["iscrowd"]]
    crowd = [s for s in record["segments_info"] if s["iscrowd"]]
    instances = out["instances"]

    assert len(instances) == len(kept) == num_kept  # crowd segments dropped
    assert crowd
    assert instances.image_size == ids.shape == (record["height"], record["width"])
    assert instances.gt_classes.dtype == torch.int64
    assert instances.gt_classes.tolist() == [s["category_id"] for s in kept]
    for mask, seg in zip(instances.gt_masks.tensor, kept):
        assert torch.equal(mask, torch.from_numpy(ids == seg["id"]))
    union = instances.gt_masks.tensor.any(0).numpy()
    for seg in crowd:
        assert (ids == seg["id"]).any() and not union[ids == seg["id"]].any()
    assert_boxes_enclose_masks(instances)
    image = np.array(Image.open(record["file_name"]).convert("RGB"))
    assert torch.equal(out["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert record["segments_info"] is not out["segments_info"]  # input dict left untouched


def test_flip_gives_flipped_masks_and_image(dicts):
    plain = mapper([])(dicts[0])
    flipped = mapper([T.RandomFlip(prob=1.0)])(dicts[0])
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(
        flipped["instances"].gt_masks.tensor, plain["instances"].gt_masks.tensor.flip(-1)
    )
    assert torch.equal(flipped["instances"].gt_classes, plain["instances"].gt_classes)
    assert_consistent(flipped)


def test_resize_uses_nearest_neighbours(dicts):
    record = dicts[0]
    out = mapper([T.ResizeShortestEdge(200, 1000)])(record)
    assert out["image"].shape == (3, 200, 300)  # 427x640 -> 200x300
    rgb = Image.open(record["pan_seg_file_name"]).convert("RGB")
    ids = rgb2id(np.asarray(rgb.resize((300, 200), Image.NEAREST)))
    kept = [s for s in record["segments_info"] if not s["iscrowd"] and (ids == s["id"]).any()]
    assert out["instances"].gt_classes.tolist() == [s["category_id"] for s in kept]
    for mask, seg in zip(out["instances"].gt_masks.tensor, kept):
        assert torch.equal(mask, torch.from_numpy(ids == seg["id"]))
    assert_consistent(out)


def test_crop_drops_segments_it_empties(dicts):
    record = dicts[0]
    x0, y0, w, h = 0, 0, 160, 120
    out = mapper([T.CropTransform(x0, y0, w, h)])(record)
    ids = png_ids(record["pan_seg_file_name"])[y0 : y0 + h, x0 : x0 + w]
    noncrowd = [s for s in record["segments_info"] if not s["iscrowd"]]
    kept = [s for s in noncrowd if (ids == s["id"]).any()]
    assert 0 < len(kept) < len(noncrowd)
    assert out["instances"].gt_classes.tolist() == [s["category_id"] for s in kept]
    for mask, seg in zip(out["instances"].gt_masks.tensor, kept):
        assert torch.equal(mask, torch.from_numpy(ids == seg["id"]))
    assert_consistent(out)


def test_detr_recipe_augmentations_from_config():
    cfg = make_cfg(**{"CROP.ENABLED": True, "CROP.TYPE": "absolute_range", "CROP.SIZE": [384, 600]})
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(range(480, 801, 32))
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    flip, crop_branch, resize = build_augmentations(cfg, is_train=True)
    assert isinstance(flip, T.RandomFlip) and flip.horizontal and flip.prob == 0.5
    assert isinstance(crop_branch, T.RandomApply) and crop_branch.prob == 0.5
    pre_resize, crop = crop_branch.aug.augs
    assert tuple(pre_resize.short_edge_length) == (400, 500, 600) and pre_resize.max_size == 4200
    assert pre_resize.is_range is False  # "choice"
    assert (crop.crop_type, tuple(crop.crop_size)) == ("absolute_range", (384, 600))
    assert resize.short_edge_length == tuple(range(480, 801, 32)) and resize.max_size == 1333

    cfg.INPUT.CROP.ENABLED = False
    assert [type(a) for a in build_augmentations(cfg, True)] == [T.RandomFlip, T.ResizeShortestEdge]
    test_resize = build_augmentations(cfg, is_train=False)
    assert [(a.short_edge_length, a.max_size) for a in test_resize] == [((800, 800), 1333)]


def test_detr_recipe_with_crop_gives_consistent_outputs(dicts):
    cfg = make_cfg(**{"CROP.ENABLED": True, "CROP.TYPE": "absolute_range", "CROP.SIZE": [384, 600]})
    cfg.INPUT.MIN_SIZE_TRAIN = (224, 256)  # small sizes keep the test fast
    cfg.INPUT.MAX_SIZE_TRAIN = 400
    m = PanopticSegFormerDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    aspect_ratios = set()
    for _ in range(8):
        out = m(dicts[1])  # 360x640, aspect 0.5625 unless cropped
        assert_consistent(out)
        h, w = out["image"].shape[1:]
        assert min(h, w) in (224, 256) or max(h, w) == 400
        aspect_ratios.add(round(h / w, 2))
    assert len(aspect_ratios) > 1  # the crop branch ran at least once, and so did the other


def test_large_scale_jitter_pads_with_void(dicts, sample_kind):
    cfg = make_cfg(AUGMENTATION="lsj", RANDOM_FLIP="none")
    cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE = 256, 0.5, 0.5
    augmentations = build_augmentations(cfg, is_train=True)
    assert [type(a) for a in augmentations] == [T.ResizeScale, T.FixedSizeCrop]
    out = PanopticSegFormerDatasetMapper(cfg, is_train=True)(dicts[0])
    assert out["image"].shape == (3, 256, 256)
    assert_consistent(out)
    # 427x640 fits a 128x128 box as 85x128; the rest is padding: grey image, void targets
    union = out["instances"].gt_masks.tensor.any(0)
    assert union[:85, :128].any() and not union[85:].any() and not union[:, 128:].any()
    assert (out["image"][:, 85:] == 128).all() and (out["image"][:, :, 128:] == 128).all()
    assert len(out["instances"]) > NUM_KEPT[sample_kind][0] // 2  # most survive the downscale


def test_large_scale_jitter_random_scales_are_consistent(dicts):
    cfg = make_cfg(AUGMENTATION="lsj")
    cfg.INPUT.IMAGE_SIZE = 192
    m = PanopticSegFormerDatasetMapper(cfg, is_train=True)
    np.random.seed(1)
    for _ in range(4):
        out = m(dicts[1])
        assert out["image"].shape == (3, 192, 192)
        assert_consistent(out)


def test_inference_drops_annotations(dicts):
    cfg = make_cfg(MIN_SIZE_TEST=200, MAX_SIZE_TEST=1000)
    out = PanopticSegFormerDatasetMapper(cfg, is_train=False)(dicts[0])
    assert set(out) == {"file_name", "image_id", "height", "width", "image"}
    assert (out["height"], out["width"], out["image_id"]) == (427, 640, 142238)
    assert out["image"].shape == (3, 200, 300)


def test_bgr_format(dicts):
    rgb = mapper([])(dicts[1])["image"]
    bgr = mapper([], image_format="BGR")(dicts[1])["image"]
    assert torch.equal(bgr, rgb.flip(0))


def test_from_config_reads_class_count_from_metadata(sample):
    name = f"test_mapper_{uuid.uuid4().hex}"
    register_panoptic_dataset(
        name, str(sample / "images"), str(sample / "panoptic"), str(sample / "panoptic.json")
    )
    try:
        cfg = make_cfg()
        cfg.DATASETS.TRAIN = (name,)
        m = PanopticSegFormerDatasetMapper(cfg, is_train=True)
        assert m.num_classes == NUM_CLASSES and m.thing_ids == frozenset(THING_IDS)
        assert PanopticSegFormerDatasetMapper(cfg, is_train=False).num_classes is None
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_unknown_augmentation_raises():
    with pytest.raises(ValueError, match=r"INPUT.AUGMENTATION 'nope'.*\['detr', 'lsj'\]"):
        build_augmentations(make_cfg(AUGMENTATION="nope"), is_train=True)


def _kinds(augmentations):
    return [type(a).__name__ for a in augmentations]


@pytest.mark.parametrize(
    "old, new", [("panoptic_segformer", "detr"), ("panoptic_segformer_lsj", "lsj")]
)
def test_the_deprecated_mapper_name_still_works_with_a_warning(old, new):
    with pytest.warns(FutureWarning, match=f"use INPUT.AUGMENTATION '{new}' instead of "):
        augmentations = build_augmentations(make_cfg(DATASET_MAPPER_NAME=old), is_train=True)
    assert _kinds(augmentations) == _kinds(
        build_augmentations(make_cfg(AUGMENTATION=new), is_train=True)
    )
    assert _kinds(augmentations) != _kinds(
        build_augmentations(make_cfg(AUGMENTATION={"detr": "lsj", "lsj": "detr"}[new]), True)
    )


def test_the_deprecated_mapper_name_refuses_unknown_or_conflicting_values():
    with pytest.raises(ValueError, match="DATASET_MAPPER_NAME 'nope'.*INPUT.AUGMENTATION"):
        build_augmentations(make_cfg(DATASET_MAPPER_NAME="nope"), is_train=True)
    conflicting = make_cfg(DATASET_MAPPER_NAME="panoptic_segformer", AUGMENTATION="lsj")
    with pytest.raises(ValueError, match="ask for different augmentations"):
        build_augmentations(conflicting, is_train=True)


def test_only_crowd_segments_give_empty_instances(dicts):
    record = copy.deepcopy(dicts[0])
    for seg in record["segments_info"]:
        seg["iscrowd"] = 1
    instances = mapper([])(record)["instances"]
    assert len(instances) == 0 and instances.image_size == (427, 640)
    assert instances.gt_masks.tensor.shape == (0, 427, 640)
    assert instances.gt_boxes.tensor.shape == (0, 4) and instances.gt_classes.dtype == torch.int64


@pytest.mark.parametrize("content", [None, b"not a png"])
def test_missing_or_unreadable_png_raises(dicts, tmp_path, content):
    record = copy.deepcopy(dicts[0])
    png = tmp_path / "broken_142238.png"
    if content is not None:
        png.write_bytes(content)
    record["pan_seg_file_name"] = str(png)
    with pytest.raises(FileNotFoundError, match=re.escape(str(png))):
        mapper([])(record)


def test_png_id_without_segment_raises(dicts, tmp_path):
    record = copy.deepcopy(dicts[0])
    rgb = np.array(Image.open(record["pan_seg_file_name"]).convert("RGB"))
    rgb[:4, :4] = (1, 2, 3)  # id 1 + 2 * 256 + 3 * 65536 = 197121
    png = tmp_path / "extra_id.png"
    Image.fromarray(rgb).save(png)
    record["pan_seg_file_name"] = str(png)
    with pytest.raises(ValueError, match=re.escape(str(png)) + ".*197121"):
        mapper([])(record)


def test_segment_without_pixels_raises(dicts):
    record = copy.deepcopy(dicts[0])
    record["segments_info"].append(dict(record["segments_info"][0], id=7777777))
    pattern = re.escape(record["pan_seg_file_name"]) + ".*segment id 7777777.*no pixel"
    with pytest.raises(ValueError, match=pattern):
        mapper([])(record)


def test_category_out_of_range_raises(dicts):
    record = copy.deepcopy(dicts[0])
    seg = record["segments_info"][3]
    seg["category_id"] = NUM_CLASSES
    pattern = f"{seg['id']}.*{re.escape(record['pan_seg_file_name'])}.*category_id {NUM_CLASSES}"
    with pytest.raises(ValueError, match=pattern):
        mapper([])(record)
    seg["category_id"] = -1
    with pytest.raises(ValueError, match="category_id -1"):
        mapper([])(record)
    mapper([], num_classes=None, thing_ids=None)(record)  # no metadata, no check


def test_isthing_inconsistent_with_metadata_raises(dicts):
    record = copy.deepcopy(dicts[0])
    seg = next(s for s in record["segments_info"] if s["category_id"] >= 80)  # a stuff segment
    seg["isthing"] = True
    with pytest.raises(ValueError, match=f"{seg['id']}.*isthing.*stuff"):
        mapper([])(record)
