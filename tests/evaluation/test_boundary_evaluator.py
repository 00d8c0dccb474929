"""BoundaryPanopticEvaluator (panoptic_segformer/d2/evaluation/boundary.py) on the real COCO
panoptic sample, beside detectron2's COCOPanopticEvaluator."""

import numpy as np
import pytest
from skips import require, require_detectron2

require_detectron2()
require("panopticapi", "COCOPanopticEvaluator needs panopticapi installed")

import torch  # noqa: E402
from d2_helpers import register_sample  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators  # noqa: E402
from PIL import Image  # noqa: E402

from panoptic_segformer.d2.data import rgb_to_segment_ids  # noqa: E402
from panoptic_segformer.d2.evaluation import BoundaryPanopticEvaluator  # noqa: E402

DATASET = "psf_test_boundary_evaluator_sample"
KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


@pytest.fixture(scope="module")
def sample_dataset(coco_panoptic_sample):
    """The generated COCO panoptic sample (tests/coco_panoptic_sample.py)."""
    return register_sample(DATASET, coco_panoptic_sample, coco_panoptic_sample / "images")


def ground_truth_as_outputs(dataset, shift):
    """(input, output) per image: the ground truth as the model's ``panoptic_seg`` (an id
    tensor, segments with contiguous ``category_id`` and ``isthing``), moved ``shift`` columns
    to the right (VOID comes in on the left); crowd segments are predicted as plain segments."""
    pairs = []
    for record in DatasetCatalog.get(dataset):
        ids = rgb_to_segment_ids(np.asarray(Image.open(record["pan_seg_file_name"])))
        moved = np.zeros_like(ids)
        moved[:, shift:] = ids[:, : ids.shape[1] - shift]
        present = set(np.unique(moved).tolist())
        segments = [
            {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
            for s in record["segments_info"]
            if s["id"] in present
        ]
        pairs.append((record, {"panoptic_seg": (torch.from_numpy(moved).int(), segments)}))
    return pairs


def evaluate(evaluator, pairs):
    evaluator.reset()
    for record, output in pairs:
        evaluator.process([record], [output])
    return evaluator.evaluate()


def both(dataset, shift, tmp_path, dilation_ratio=0.02):
    """PQ (detectron2's COCOPanopticEvaluator, which converts the segments in place first) and
    Boundary PQ of the shifted ground truth, as tools/ablate_inference.py evaluates."""
    evaluators = DatasetEvaluators(
        [
            COCOPanopticEvaluator(dataset, str(tmp_path)),
            BoundaryPanopticEvaluator(dataset, dilation_ratio=dilation_ratio),
        ]
    )
    results = evaluate(evaluators, ground_truth_as_outputs(dataset, shift))
    return results["panoptic_seg"], results["boundary_panoptic_seg"]


def test_ground_truth_as_prediction_scores_100(tmp_path, sample_dataset):
    pq, bpq = both(sample_dataset, 0, tmp_path)
    assert set(bpq) == set(KEYS)
    assert pq == pytest.approx({k: 100.0 for k in KEYS})
    assert bpq == pytest.approx({k: 100.0 for k in KEYS})


def test_a_shifted_prediction_loses_more_boundary_pq_than_pq(tmp_path, sample_dataset):
    pq, bpq = both(sample_dataset, 4, tmp_path)
    for suffix in ("", "_th", "_st"):
        # a pair's min(IoU, boundary IoU) <= IoU, so BPQ <= PQ; 4 pixels against a 15-pixel band
        # (2% of a 640x427 diagonal) make it lower (thin people, all boundary, lose little)
        assert 0 < bpq["PQ" + suffix] < pq["PQ" + suffix], (suffix, pq, bpq)
    assert bpq["SQ"] < pq["SQ"] and bpq["RQ"] <= pq["RQ"]
    # alone, the evaluator maps the contiguous ids itself: the same result
    alone = evaluate(BoundaryPanopticEvaluator(sample_dataset), ground_truth_as_outputs(DATASET, 4))
    assert alone["boundary_panoptic_seg"] == bpq


def test_bands_wider_than_the_image_give_panopticapis_pq(tmp_path, sample_dataset):
    # with d beyond the image size every pixel of a segment is boundary: boundary IoU = IoU, so
    # the VOID, crowd and matching rules are checked against panopticapi's on real ground truth
    pq, bpq = both(sample_dataset, 4, tmp_path, dilation_ratio=1.0)
    assert bpq == pytest.approx(pq, rel=1e-12)


def test_unknown_images_and_missing_ground_truth_are_named(sample_dataset):
    evaluator = BoundaryPanopticEvaluator(sample_dataset)
    evaluator.reset()
    (record, output), _ = ground_truth_as_outputs(sample_dataset, 0)
    with pytest.raises(ValueError, match="image 12345 has no annotation in .*panoptic.json"):
        evaluator.process([{**record, "image_id": 12345}], [output])
    assert evaluator.evaluate() == {}  # nothing processed
    with pytest.raises(ValueError, match="dataset 'coco_2017_val' has no panoptic_root or "):
        BoundaryPanopticEvaluator("coco_2017_val")
