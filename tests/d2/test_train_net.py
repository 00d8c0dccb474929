"""train_net.py end to end on the two real COCO images: a few training iterations through
detectron2's trainer, a checkpoint, then inference and COCOPanopticEvaluator."""

import math
import sys

import pytest

pytest.importorskip("detectron2", reason="the detectron2 layer needs detectron2 installed")
pytest.importorskip("panopticapi", reason="COCOPanopticEvaluator needs panopticapi installed")

from d2_helpers import CONFIGS, ROOT, SAMPLE, TINY, needs_sample  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402

from panoptic_segformer.data import register_panoptic_dataset  # noqa: E402

sys.path.insert(0, str(ROOT))
import train_net  # noqa: E402

DATASET = "psf_test_coco_sample"


@pytest.fixture(scope="module")
def sample_dataset():
    if DATASET not in DatasetCatalog.list():
        register_panoptic_dataset(
            DATASET, str(SAMPLE / "images"), str(SAMPLE / "panoptic"), str(SAMPLE / "panoptic.json")
        )
    return DATASET


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
    # the trained weights evaluate the same way with --eval-only
    again = train_net.main(
        args_for(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), eval_only=True)
    )
    assert again["panoptic_seg"] == pytest.approx(panoptic)


@needs_sample()
def test_eval_only_needs_weights(tmp_path, sample_dataset):
    with pytest.raises(ValueError, match="--eval-only needs trained weights: set MODEL.WEIGHTS"):
        train_net.main(args_for(tmp_path, eval_only=True))


def test_non_panoptic_datasets_are_refused():
    from d2_helpers import make_cfg

    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml")
    with pytest.raises(ValueError, match=r"'coco_2017_val' has evaluator_type 'coco'"):
        train_net.Trainer.build_evaluator(cfg, "coco_2017_val")
