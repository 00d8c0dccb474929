"""Evaluation helpers on top of detectron2's evaluators."""

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator

__all__ = ["PANOPTIC_EVALUATOR_TYPES", "PanopticInstanceEvaluator", "check_panoptic_dataset"]

# detectron2's evaluator_type of panoptic datasets (COCO's, ADE20K's, register_panoptic_dataset's)
PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg")


def check_panoptic_dataset(dataset_name: str) -> None:
    """Raises ValueError naming the dataset and its evaluator_type when it is not panoptic."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in PANOPTIC_EVALUATOR_TYPES:
        raise ValueError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; Panoptic "
            f"SegFormer evaluates panoptic datasets ({', '.join(PANOPTIC_EVALUATOR_TYPES)})"
        )


class PanopticInstanceEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` (instance masks and boxes) for panoptic datasets.

    detectron2's "standard" panoptic metadata (``coco_2017_val_panoptic``, and the datasets of
    :func:`panoptic_segformer.data.register_panoptic_dataset`) lists every category in
    ``thing_classes``, so that its Visualizer can name stuff segments too; the plain
    ``COCOEvaluator`` then fails on the per-category table, which has one row per thing
    category. This names the rows by the thing categories alone, in the instances json's
    (sorted category id) order.
    """

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        names = class_names
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id", None)
        if names is not None and mapping is not None and len(names) != len(mapping):
            names = [names[mapping[dataset_id]] for dataset_id in sorted(mapping)]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=names)
