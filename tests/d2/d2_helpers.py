"""Shared helpers of the detectron2-layer tests (each test module skips without detectron2)."""

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SAMPLE = ROOT.parent / "shared" / "data" / "coco_panoptic_sample"

# A small model for CPU tests: ResNet-18, 64 channels, one layer per stack, 20 queries.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "64",
    "MODEL.PANOPTIC_SEGFORMER.NHEADS", "4",
    "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "128",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "20",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "1",
]  # fmt: skip

# every query passes the merging: an untrained model then still paints segments
PERMISSIVE = [
    "MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.MASK_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.THING_OVERLAP_THRESHOLD", "1.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_OVERLAP_THRESHOLD", "1.0",
]  # fmt: skip


def make_cfg(config_file, *opts):
    """The config of ``config_file`` with Panoptic SegFormer's keys and the given overrides."""
    from panoptic_segformer.config import get_config

    return get_config(str(config_file), opts)


def needs_sample():
    return pytest.mark.skipif(
        not (SAMPLE / "panoptic.json").is_file(),
        reason=f"the COCO panoptic sample is missing ({SAMPLE})",
    )


def register_sample(name, **kwargs):
    """Registers the two-image COCO panoptic sample as dataset ``name`` (once); returns it."""
    from detectron2.data import DatasetCatalog

    from panoptic_segformer.data import register_panoptic_dataset

    if name not in DatasetCatalog.list():
        register_panoptic_dataset(
            name,
            str(SAMPLE / "images"),
            str(SAMPLE / "panoptic"),
            str(SAMPLE / "panoptic.json"),
            **kwargs,
        )
    return name


def write_instances_json(path):
    """The sample's thing segments as a COCO instances json (what COCOEvaluator reads)."""
    from panopticapi.utils import rgb2id
    from PIL import Image
    from pycocotools import mask as mask_util

    panoptic = json.loads((SAMPLE / "panoptic.json").read_text())
    things = [c for c in panoptic["categories"] if c["isthing"]]
    thing_ids = {c["id"] for c in things}
    annotations = []
    for ann in panoptic["annotations"]:
        ids = rgb2id(np.asarray(Image.open(SAMPLE / "panoptic" / ann["file_name"])))
        for segment in ann["segments_info"]:
            if segment["category_id"] not in thing_ids:
                continue
            rle = mask_util.encode(np.asfortranarray(ids == segment["id"]).astype(np.uint8))
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": ann["image_id"],
                    "category_id": segment["category_id"],
                    "segmentation": rle,
                    "area": segment["area"],
                    "bbox": segment["bbox"],
                    "iscrowd": segment["iscrowd"],
                }
            )
    data = {"images": panoptic["images"], "annotations": annotations, "categories": things}
    path.write_text(json.dumps(data))
    return str(path)
