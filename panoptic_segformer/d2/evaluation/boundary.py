"""Boundary PQ of the model's panoptic results as a detectron2 evaluator."""

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

from panoptic_segformer.d2.data.coco_panoptic import read_segment_ids
from panoptic_segformer.utils.boundary_pq import DILATION_RATIO, BoundaryPQStats, boundary_pq_image

__all__ = ["BoundaryPanopticEvaluator"]

logger = logging.getLogger(__name__)


class BoundaryPanopticEvaluator(DatasetEvaluator):
    """Boundary PQ (Cheng et al., CVPR 2021; :mod:`panoptic_segformer.utils.boundary_pq`) of the
    model's ``panoptic_seg``, beside detectron2's ``COCOPanopticEvaluator``.

    The ground truth is read as ``COCOPanopticEvaluator`` reads it: the PNGs of the dataset's
    ``panoptic_root`` named by its ``panoptic_json``. Each image is scored in :meth:`process`
    (each process of a distributed evaluation scores its own images), and :meth:`evaluate`
    gathers the per-category counts; only the images seen are scored, so a dataset may be
    evaluated in part.

    A predicted segment's ``category_id`` is mapped as ``COCOPanopticEvaluator`` maps it: with
    ``isthing``, a contiguous id turned into the dataset's by the metadata's
    ``thing_dataset_id_to_contiguous_id`` / ``stuff_dataset_id_to_contiguous_id``; without it,
    already the dataset's. ``COCOPanopticEvaluator`` converts the segments in place (it pops
    ``isthing``), so both can share the outputs in a ``DatasetEvaluators``, in either order; this
    one changes nothing.

    Returns ``{"boundary_panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}}`` in percent;
    a kind of category (things or stuff) that occurs in no image gives NaN.
    """

    def __init__(self, dataset_name: str, dilation_ratio: float = DILATION_RATIO) -> None:
        """
        Args:
            dataset_name: a registered panoptic dataset with ``panoptic_root`` and
                ``panoptic_json`` metadata.
            dilation_ratio: boundary width as a fraction of the image diagonal (0.02 in the
                paper).
        """
        self._metadata = MetadataCatalog.get(dataset_name)
        missing = [k for k in ("panoptic_root", "panoptic_json") if not self._metadata.get(k, 0)]
        if missing:
            raise ValueError(f"dataset {dataset_name!r} has no {' or '.join(missing)} metadata")
        self._dilation_ratio = dilation_ratio
        self._to_dataset_id = {
            True: {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()},
            False: {v: k for k, v in self._metadata.stuff_dataset_id_to_contiguous_id.items()},
        }
        self._annotations: Optional[Dict[str, dict]] = None  # str(image id) -> annotation
        self._categories: Dict[int, dict] = {}
        self._stats = BoundaryPQStats()
        self._num_images = 0

    def reset(self) -> None:
        self._stats = BoundaryPQStats()
        self._num_images = 0

    def _ground_truth(self, image_id) -> dict:
        """The json's annotation of ``image_id`` (the json is read on first use)."""
        if self._annotations is None:
            with PathManager.open(self._metadata.panoptic_json) as f:
                content = json.load(f)
            self._annotations = {str(a["image_id"]): a for a in content["annotations"]}
            self._categories = {c["id"]: c for c in content["categories"]}
        annotation = self._annotations.get(str(image_id))
        if annotation is None:
            raise ValueError(
                f"image {image_id!r} has no annotation in {self._metadata.panoptic_json}"
            )
        return annotation

    def _dataset_segment(self, segment: dict) -> dict:
        """``id`` and the dataset's ``category_id`` of a predicted segment."""
        category_id = segment["category_id"]
        if "isthing" in segment:
            category_id = self._to_dataset_id[bool(segment["isthing"])][category_id]
        return {"id": segment["id"], "category_id": category_id}

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for input, output in zip(inputs, outputs):
            panoptic_seg, segments_info = output["panoptic_seg"]
            if segments_info is None:
                raise ValueError(
                    "BoundaryPanopticEvaluator needs panoptic_seg's segments_info, got None"
                )
            annotation = self._ground_truth(input["image_id"])
            path = os.path.join(self._metadata.panoptic_root, annotation["file_name"])
            with PathManager.open(path, "rb") as f:
                gt_ids = read_segment_ids(f)
            self._stats += boundary_pq_image(
                gt_ids,
                annotation["segments_info"],
                panoptic_seg.cpu().numpy(),
                [self._dataset_segment(s) for s in segments_info],
                self._categories,
                self._dilation_ratio,
            )
            self._num_images += 1

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        comm.synchronize()
        all_stats = comm.gather(self._stats)
        num_images = sum(comm.gather(self._num_images))
        if not comm.is_main_process():
            return None
        if num_images == 0:
            logger.warning("BoundaryPanopticEvaluator: no image was processed")
            return {}
        stats = BoundaryPQStats()
        for part in all_stats:
            stats += part
        summary = stats.summarize(self._categories)
        rows = [
            [name] + [100 * summary[name][k] for k in ("pq", "sq", "rq")] + [summary[name]["n"]]
            for name in ("All", "Things", "Stuff")
        ]
        table = tabulate(
            rows, headers=["", "PQ", "SQ", "RQ", "#categories"], tablefmt="pipe", floatfmt=".3f"
        )
        logger.info(f"Boundary PQ of {num_images} images:\n{table}")
        results = {}
        for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                results[key.upper() + suffix] = 100 * summary[name][key]
        return OrderedDict({"boundary_panoptic_seg": results})
