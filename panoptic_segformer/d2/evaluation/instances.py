"""Instance masks and boxes of panoptic datasets with detectron2's ``COCOEvaluator``."""

from detectron2.evaluation import COCOEvaluator

__all__ = ["PanopticInstanceEvaluator"]


class PanopticInstanceEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` (instance masks and boxes) for panoptic datasets.

    detectron2's "standard" panoptic metadata (``coco_2017_val_panoptic``, and the datasets of
    :func:`panoptic_segformer.d2.data.register_panoptic_dataset`) lists every category in
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
