"""Evaluation helpers on top of detectron2's evaluators, and the COCO panoptic submission writer
for datasets without ground truth (COCO test-dev)."""

import io
import itertools
import json
import logging
import os
import re
import zipfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image
from tabulate import tabulate

from panoptic_segformer.d2.data.builtin import SUBMISSION_EVALUATOR_TYPE
from panoptic_segformer.d2.data.dataset_mapper import rgb_to_segment_ids
from panoptic_segformer.utils.boundary_pq import DILATION_RATIO, BoundaryPQStats, boundary_pq_image

__all__ = [
    "PANOPTIC_EVALUATOR_TYPES",
    "SUBMISSION_EVALUATOR_TYPE",
    "BoundaryPanopticEvaluator",
    "COCOPanopticSubmissionWriter",
    "PanopticInstanceEvaluator",
    "check_panoptic_dataset",
    "describe_segments",
]

logger = logging.getLogger(__name__)

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
                gt_ids = rgb_to_segment_ids(np.asarray(Image.open(f).convert("RGB")))
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


def describe_segments(
    segment_ids: np.ndarray, segments_info: List[Dict[str, Any]], image: str
) -> List[Dict[str, Any]]:
    """The ``segments_info`` of a COCO panoptic annotation, measured on its id map.

    Args:
        segment_ids: (H, W) integer segment ids, 0 = void (the PNG decoded with ``rgb2id``).
        segments_info: the segments, each with ``id`` and (dataset) ``category_id``.
        image: the PNG's name, for errors.

    Returns:
        One dict per segment with pixels, in the given order: ``id``, ``category_id``,
        ``iscrowd`` 0, ``area`` (pixels) and ``bbox`` [x, y, width, height] of its pixels.
        Segments without pixels are left out: panopticapi refuses a segment listed in the json
        and absent from the PNG.

    Raises:
        ValueError: when a non-void id of the map is not in ``segments_info`` (panopticapi
            refuses those too).
    """
    listed = {segment["id"] for segment in segments_info}
    unlisted = sorted(set(np.unique(segment_ids).tolist()) - listed - {0})
    if unlisted:
        raise ValueError(
            f"panoptic prediction {image} has pixels of segment ids {unlisted[:10]}, which are "
            "not in its segments_info"
        )
    described = []
    for segment in segments_info:
        present = segment_ids == segment["id"]
        area = int(present.sum())
        if area == 0:
            continue
        rows = np.flatnonzero(present.any(axis=1))
        cols = np.flatnonzero(present.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        described.append(
            {
                "id": int(segment["id"]),
                "category_id": int(segment["category_id"]),
                "iscrowd": 0,
                "area": area,
                "bbox": [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1],
            }
        )
    return described


class COCOPanopticSubmissionWriter(COCOPanopticEvaluator):
    """Writes the panoptic predictions of a dataset without ground truth (COCO test-dev) as a
    submission to COCO's panoptic evaluation server, instead of scoring them.

    The conversion is ``COCOPanopticEvaluator``'s (contiguous to dataset category ids, ``id2rgb``
    PNG, one per image named after it); each segment is then measured on the PNG as written
    (:func:`describe_segments`). On the main process, :meth:`evaluate` writes to ``output_dir``
    ``panoptic_<split>_<algorithm>_results.json`` (``{"annotations": [...]}``, by image id), the
    folder ``panoptic_<split>_<algorithm>_results/`` of PNGs, and both zipped together as
    ``panoptic_<split>_<algorithm>_results.zip``, the layout of COCO's panoptic results format.
    ``<split>`` is the dataset's ``submission_split`` metadata (``test-dev2017``).
    """

    def __init__(self, dataset_name: str, output_dir: str, algorithm: str) -> None:
        """
        Args:
            dataset_name: a registered dataset with ``submission_split`` metadata.
            output_dir: where the submission is written.
            algorithm: the ``<alg>`` of COCO's file names: letters, digits and "-".

        Raises:
            ValueError: for a dataset without ``submission_split`` or a bad ``algorithm``.
        """
        super().__init__(dataset_name, output_dir)
        split = self._metadata.get("submission_split", None)
        if not split:
            raise ValueError(
                f"dataset {dataset_name!r} has no submission_split metadata (e.g. "
                "'test-dev2017'), which names the COCO panoptic submission files"
            )
        if not re.fullmatch(r"[A-Za-z0-9-]+", algorithm):
            raise ValueError(
                f"submission name {algorithm!r} must be letters, digits or '-': COCO's file "
                f"names panoptic_{split}_<name>_results separate their fields with '_'"
            )
        self.name = f"panoptic_{split}_{algorithm}_results"
        self.zip_path = os.path.join(output_dir, f"{self.name}.zip")

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        from panopticapi.utils import rgb2id

        start = len(self._predictions)
        super().process(inputs, outputs)
        for prediction in self._predictions[start:]:
            segment_ids = rgb2id(np.asarray(Image.open(io.BytesIO(prediction["png_string"]))))
            prediction["segments_info"] = describe_segments(
                segment_ids, prediction["segments_info"], prediction["file_name"]
            )

    def evaluate(self) -> Dict[str, Any]:
        """Gathers the predictions of all processes; the main process writes the submission.

        Returns:
            {} (nothing is scored: detectron2's result printing, ``EvalHook`` and
            ``verify_results`` take it as no metrics).
        """
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions)))
        if not comm.is_main_process():
            return {}
        predictions.sort(key=lambda p: p["image_id"])
        pngs = {p["file_name"]: p["png_string"] for p in predictions}
        annotations = [{k: v for k, v in p.items() if k != "png_string"} for p in predictions]
        content = json.dumps({"annotations": annotations})

        folder = os.path.join(self._output_dir, self.name)
        PathManager.mkdirs(folder)
        for file_name, png in pngs.items():
            with PathManager.open(os.path.join(folder, file_name), "wb") as f:
                f.write(png)
        with PathManager.open(os.path.join(self._output_dir, f"{self.name}.json"), "w") as f:
            f.write(content)
        with PathManager.open(self.zip_path, "wb") as f, zipfile.ZipFile(f, "w") as archive:
            archive.writestr(f"{self.name}.json", content, compress_type=zipfile.ZIP_DEFLATED)
            for file_name, png in pngs.items():  # PNGs are compressed already
                archive.writestr(f"{self.name}/{file_name}", png)
        logger.info(
            f"COCO panoptic submission of {self._metadata.name} ({len(predictions)} images) "
            f"written to {self.zip_path}"
        )
        return {}
