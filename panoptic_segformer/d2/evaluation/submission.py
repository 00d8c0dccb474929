"""The COCO panoptic submission of a dataset without ground truth (COCO test-dev)."""

import io
import itertools
import json
import logging
import os
import re
import zipfile
from typing import Any, Dict, List

import numpy as np
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from panoptic_segformer.d2.data.coco_panoptic import read_segment_ids

__all__ = ["COCOPanopticSubmissionWriter", "describe_segments"]

logger = logging.getLogger(__name__)


def describe_segments(
    segment_ids: np.ndarray, segments_info: List[Dict[str, Any]], image: str
) -> List[Dict[str, Any]]:
    """The ``segments_info`` of a COCO panoptic annotation, measured on its id map.

    Args:
        segment_ids: (H, W) integer segment ids, 0 = void (the PNG decoded by
            :func:`read_segment_ids`).
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
        start = len(self._predictions)
        super().process(inputs, outputs)
        for prediction in self._predictions[start:]:
            segment_ids = read_segment_ids(io.BytesIO(prediction["png_string"]))
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
