"""Evaluation on top of detectron2's evaluators (needs detectron2).

* :func:`check_panoptic_dataset`: whether a dataset can be scored;
* :class:`~panoptic_segformer.d2.evaluation.instances.PanopticInstanceEvaluator`: detectron2's
  ``COCOEvaluator`` on panoptic datasets' metadata;
* :class:`~panoptic_segformer.d2.evaluation.boundary.BoundaryPanopticEvaluator`: Boundary PQ;
* :class:`~panoptic_segformer.d2.evaluation.submission.COCOPanopticSubmissionWriter`: the COCO
  panoptic submission of a dataset without ground truth (COCO test-dev).

Panoptic PNGs are decoded in one place,
:func:`panoptic_segformer.d2.data.coco_panoptic.read_segment_ids`.
"""

from detectron2.data import MetadataCatalog

from panoptic_segformer.d2.data.builtin import SUBMISSION_EVALUATOR_TYPE
from panoptic_segformer.d2.evaluation.boundary import BoundaryPanopticEvaluator
from panoptic_segformer.d2.evaluation.instances import PanopticInstanceEvaluator
from panoptic_segformer.d2.evaluation.submission import (
    COCOPanopticSubmissionWriter,
    describe_segments,
)

__all__ = [
    "PANOPTIC_EVALUATOR_TYPES",
    "SUBMISSION_EVALUATOR_TYPE",
    "BoundaryPanopticEvaluator",
    "COCOPanopticSubmissionWriter",
    "PanopticInstanceEvaluator",
    "check_panoptic_dataset",
    "describe_segments",
]

# detectron2's evaluator_type of panoptic datasets (COCO's, ADE20K's, register_panoptic_dataset's)
PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg")
# SUBMISSION_EVALUATOR_TYPE (data/builtin.py) marks panoptic datasets without ground truth:
# their predictions are written for COCO's evaluation server (COCOPanopticSubmissionWriter)


def check_panoptic_dataset(dataset_name: str) -> None:
    """Raises ValueError naming the dataset and its evaluator_type when it is not a panoptic
    dataset with ground truth."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type == SUBMISSION_EVALUATOR_TYPE:
        raise ValueError(
            f"dataset {dataset_name!r} has no ground truth (evaluator_type {evaluator_type!r}) "
            "and cannot be scored; train_net.py --eval-only writes its COCO panoptic submission"
        )
    if evaluator_type not in PANOPTIC_EVALUATOR_TYPES:
        raise ValueError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; Panoptic "
            f"SegFormer evaluates panoptic datasets ({', '.join(PANOPTIC_EVALUATOR_TYPES)})"
        )
