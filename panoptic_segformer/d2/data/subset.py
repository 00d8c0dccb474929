"""Part of a registered panoptic dataset as a dataset of its own, for evaluating on a subset."""

import copy
import json
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from panoptic_segformer.d2.data.coco_panoptic import read_json

__all__ = ["register_subset", "select_images"]

logger = logging.getLogger(__name__)


def select_images(
    dataset_dicts: List[Dict[str, Any]], num_images: int, seed: Optional[int] = None
) -> List[Dict[str, Any]]:
    """The first ``num_images`` dicts, or with ``seed`` a random sample of them kept in dataset
    order; all of them where the dataset is smaller (with a warning).

    Raises:
        ValueError: for a non-positive ``num_images``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if num_images >= len(dataset_dicts):
        if num_images > len(dataset_dicts):
            logger.warning(f"the dataset has {len(dataset_dicts)} images, using all of them")
        return list(dataset_dicts)
    if seed is None:
        return dataset_dicts[:num_images]
    picked = np.random.RandomState(seed).choice(len(dataset_dicts), num_images, replace=False)
    return [dataset_dicts[i] for i in sorted(picked.tolist())]


def register_subset(name: str, num_images: int, output_dir: str, seed: Optional[int] = None) -> str:
    """Registers part of a registered panoptic dataset as a dataset of its own, for evaluating
    on a subset: panopticapi scores every image of its json, so the subset gets its own json
    (and instances json, where the dataset has one), written to ``output_dir`` by the main
    process.

    Args:
        name: a registered dataset with ``panoptic_json`` metadata.
        num_images: how many images (:func:`select_images`).
        output_dir: where the subset's json files go.
        seed: None for the first ``num_images`` images, else a seeded random sample.

    Returns:
        the subset's name: ``f"{name}_first{n}"`` or ``f"{name}_sample{n}_seed{seed}"``.

    Raises:
        ValueError: for a non-positive ``num_images`` or a dataset without ``panoptic_json``.
    """
    metadata = MetadataCatalog.get(name)
    if not metadata.get("panoptic_json", None):
        raise ValueError(f"dataset {name!r} has no panoptic_json metadata to take a subset of")
    dicts = select_images(DatasetCatalog.get(name), num_images, seed)
    image_ids = {str(d["image_id"]) for d in dicts}
    n = len(dicts)
    subset = f"{name}_first{n}" if seed is None else f"{name}_sample{n}_seed{seed}"

    def write_subset(source: str, suffix: str) -> str:
        path = os.path.join(output_dir, f"{subset}_{suffix}.json")
        if comm.is_main_process():
            data = read_json(source)
            data["images"] = [im for im in data["images"] if str(im["id"]) in image_ids]
            data["annotations"] = [
                a for a in data["annotations"] if str(a["image_id"]) in image_ids
            ]
            os.makedirs(output_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(data, f)
        return path

    extra = {"panoptic_json": write_subset(metadata.panoptic_json, "panoptic")}
    if metadata.get("json_file", None):
        extra["json_file"] = write_subset(metadata.json_file, "instances")
    comm.synchronize()
    if subset in DatasetCatalog.list():
        DatasetCatalog.remove(subset)
        MetadataCatalog.remove(subset)
    DatasetCatalog.register(subset, lambda: copy.deepcopy(dicts))
    fields = {k: v for k, v in metadata.as_dict().items() if k != "name"}
    MetadataCatalog.get(subset).set(**{**fields, **extra})
    return subset
