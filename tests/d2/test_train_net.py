"""train_net.py end to end on the two real COCO images: a few training iterations through
detectron2's trainer, a checkpoint, then inference and COCOPanopticEvaluator."""

import json
import math
import sys

import pytest

pytest.importorskip("detectron2", reason="the detectron2 layer needs detectron2 installed")
pytest.importorskip("panopticapi", reason="COCOPanopticEvaluator needs panopticapi installed")

import numpy as np  # noqa: E402
from d2_helpers import (  # noqa: E402
    CONFIGS,
    ROOT,
    SAMPLE,
    TINY,
    make_cfg,
    needs_sample,
    register_sample,
)
from detectron2.engine import default_argument_parser  # noqa: E402

sys.path.insert(0, str(ROOT))
import train_net  # noqa: E402

DATASET = "psf_test_coco_sample"


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


@pytest.fixture(scope="module")
def sample_dataset(tmp_path_factory):
    instances = write_instances_json(tmp_path_factory.mktemp("sample") / "instances.json")
    return register_sample(DATASET, instances_json=instances)


def args_for(output_dir, *extra, eval_only=False):
    opts = [
        *TINY,
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)",
        "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "50",  # the second image has 26 things
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(160,)",
        "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.CROP.ENABLED", "False",
        "INPUT.MIN_SIZE_TEST", "160",
        "INPUT.MAX_SIZE_TEST", "256",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
        *extra,
    ]  # fmt: skip
    argv = ["--config-file", str(CONFIGS[0].parent / "r50.yaml")]
    return default_argument_parser().parse_args(
        argv + (["--eval-only"] if eval_only else []) + opts
    )


@needs_sample()
def test_train_then_evaluate(tmp_path, sample_dataset):
    results = train_net.main(args_for(tmp_path))
    assert (tmp_path / "model_final.pth").is_file()
    panoptic = results["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert math.isfinite(panoptic[key]) and 0 <= panoptic[key] <= 100, key
    # COCOEvaluator read the instance masks and boxes (AP is nan where nothing matches)
    assert {"AP", "AP50", "APs"} <= set(results["segm"]) and "AP" in results["bbox"]
    # the trained weights evaluate the same way with --eval-only
    again = train_net.main(
        args_for(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), eval_only=True)
    )
    assert again["panoptic_seg"] == pytest.approx(panoptic)
    assert again["segm"] == pytest.approx(results["segm"], nan_ok=True)


@needs_sample()
def test_eval_only_needs_weights(tmp_path, sample_dataset):
    with pytest.raises(ValueError, match="--eval-only needs trained weights: set MODEL.WEIGHTS"):
        train_net.main(args_for(tmp_path, eval_only=True))


def test_non_panoptic_datasets_are_refused():
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml")
    with pytest.raises(ValueError, match=r"'coco_2017_val' has evaluator_type 'coco'"):
        train_net.Trainer.build_evaluator(cfg, "coco_2017_val")


def test_training_from_random_weights_is_said():
    r50 = make_cfg(CONFIGS[0].parent / "r50.yaml")
    assert train_net.random_init_warning(r50) is None  # the ImageNet R50 of detectron2
    r50.MODEL.WEIGHTS = ""
    assert "R-50.pkl" in train_net.random_init_warning(r50)
    swin = make_cfg(CONFIGS[0].parent / "swin_l.yaml")
    assert "MODEL.TIMM.PRETRAINED to a local ImageNet checkpoint of swin_large" in (
        train_net.random_init_warning(swin)
    )
    swin.MODEL.TIMM.PRETRAINED = "swin_large_22k.pth"
    assert train_net.random_init_warning(swin) is None
