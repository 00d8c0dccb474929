"""Datasets in COCO-panoptic format: the json loader, the class metadata and registration.

Datasets follow detectron2's "standard" panoptic convention: one contiguous id per category,
equal to its index in the json's ``categories`` list; ``thing_classes`` and ``stuff_classes``
both list every category name, so that detectron2's visualiser and panoptic evaluator work.
"""

import json
import os
from functools import partial
from typing import Any, BinaryIO, Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

__all__ = [
    "load_panoptic_json",
    "metadata_from_categories",
    "read_json",
    "read_segment_ids",
    "rgb_to_segment_ids",
    "register_panoptic_dataset",
]

# Metadata keys that describe the classes; built from the json unless all are given.
_CLASS_KEYS = (
    "stuff_classes",
    "thing_dataset_id_to_contiguous_id",
    "stuff_dataset_id_to_contiguous_id",
)


def rgb_to_segment_ids(rgb: np.ndarray) -> np.ndarray:
    """Decodes a COCO-panoptic PNG into segment ids.

    Args:
        rgb (np.ndarray): (H, W, 3) uint8, the PNG in RGB order.

    Returns:
        np.ndarray: (H, W) int64 segment ids, ``R + 256 * G + 256**2 * B``; 0 is void.
    """
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_segment_ids(file: BinaryIO) -> np.ndarray:
    """Reads a COCO-panoptic PNG (a path's open file, or bytes in a ``BytesIO``) into (H, W)
    int64 segment ids (:func:`rgb_to_segment_ids`); the one decoder of panoptic PNGs, for the
    ground truth and the predictions alike."""
    from PIL import Image

    return rgb_to_segment_ids(np.asarray(Image.open(file).convert("RGB")))


def read_json(path: str, what: str = "Panoptic json") -> Dict[str, Any]:
    """Reads a json file, or raises FileNotFoundError naming it (as ``what``)."""
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist.")
    with PathManager.open(path) as f:
        return json.load(f)


def _category_color(category: Dict[str, Any]) -> List[int]:
    """The json's colour of a category, or a colour seeded by its id (stable across runs)."""
    if "color" in category:
        return list(category["color"])
    return np.random.default_rng(category["id"]).integers(0, 256, size=3).tolist()


def metadata_from_categories(categories: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Builds detectron2's "standard" panoptic metadata from a COCO-panoptic category list.

    Args:
        categories: the json's ``categories``, each with ``id``, ``name``, ``isthing`` and
            optionally ``color``; the contiguous id of a category is its index in this list.

    Returns:
        ``thing_classes``, ``stuff_classes`` (both every name), ``thing_colors``,
        ``stuff_colors``, ``thing_dataset_id_to_contiguous_id`` (``isthing`` categories) and
        ``stuff_dataset_id_to_contiguous_id`` (the others).
    """
    names = [c["name"] for c in categories]
    colors = [_category_color(c) for c in categories]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": list(names),
        "stuff_colors": list(colors),
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if not c["isthing"]
        },
    }


def load_panoptic_json(
    panoptic_json: str,
    image_root: str,
    panoptic_root: str,
    sem_seg_root: Optional[str] = None,
    thing_dataset_id_to_contiguous_id: Optional[Dict[int, int]] = None,
    stuff_dataset_id_to_contiguous_id: Optional[Dict[int, int]] = None,
) -> List[Dict[str, Any]]:
    """Loads a COCO-panoptic json into detectron2's standard panoptic dicts.

    Args:
        panoptic_json: path of the json (``images``, ``annotations``, ``categories``).
        image_root: folder of the images, named as in the json's ``images``.
        panoptic_root: folder of the panoptic PNGs, named as in the json's ``annotations``.
        sem_seg_root: if given, folder of semantic PNGs named like the panoptic PNGs; adds
            ``sem_seg_file_name``.
        thing_dataset_id_to_contiguous_id, stuff_dataset_id_to_contiguous_id: category id maps;
            when both are None they are built from the json's ``categories``
            (see :func:`metadata_from_categories`).

    Returns:
        One dict per annotated image: ``file_name``, ``image_id``, ``height``, ``width``,
        ``pan_seg_file_name``, ``segments_info`` (``id``, contiguous ``category_id``,
        ``isthing``, ``iscrowd``, ``area``, ``bbox``) and optionally ``sem_seg_file_name``.

    Raises:
        FileNotFoundError: if the json does not exist.
        ValueError: for a category id outside the maps, or an annotation whose image is not
            listed in ``images``.
    """
    content = read_json(panoptic_json)
    if thing_dataset_id_to_contiguous_id is None and stuff_dataset_id_to_contiguous_id is None:
        meta = metadata_from_categories(content["categories"])
        thing_dataset_id_to_contiguous_id = meta["thing_dataset_id_to_contiguous_id"]
        stuff_dataset_id_to_contiguous_id = meta["stuff_dataset_id_to_contiguous_id"]
    thing_map = thing_dataset_id_to_contiguous_id or {}
    stuff_map = stuff_dataset_id_to_contiguous_id or {}
    images = {image["id"]: image for image in content["images"]}

    dicts = []
    for annotation in content["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in images:
            raise ValueError(
                f"{panoptic_json}: annotation {annotation['file_name']} refers to image_id "
                f"{image_id}, which is not listed in 'images'."
            )
        image = images[image_id]
        segments_info = []
        for seg in annotation["segments_info"]:
            category = seg["category_id"]
            if category not in thing_map and category not in stuff_map:
                raise ValueError(
                    f"{panoptic_json}: segment {seg['id']} of image {image['file_name']} has "
                    f"unknown category id {category}."
                )
            segments_info.append(
                {
                    "id": seg["id"],
                    "category_id": thing_map.get(category, stuff_map.get(category)),
                    "isthing": category in thing_map,
                    "iscrowd": seg.get("iscrowd", 0),
                    "area": seg.get("area"),
                    "bbox": seg.get("bbox"),
                }
            )
        record = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": image_id,
            "height": image["height"],
            "width": image["width"],
            "pan_seg_file_name": os.path.join(panoptic_root, annotation["file_name"]),
            "segments_info": segments_info,
        }
        if sem_seg_root is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, annotation["file_name"])
        dicts.append(record)
    return dicts


def register_panoptic_dataset(
    name: str,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    instances_json: Optional[str] = None,
    metadata: Optional[Dict[str, Any]] = None,
    sem_seg_root: Optional[str] = None,
) -> None:
    """Registers a dataset in COCO-panoptic format with DatasetCatalog and MetadataCatalog.

    The annotations are read when ``DatasetCatalog.get(name)`` is called.

    Args:
        name: dataset name, e.g. "my_panoptic_train".
        image_root: folder of the images.
        panoptic_root: folder of the panoptic PNGs.
        panoptic_json: the COCO-panoptic json.
        instances_json: optional COCO instances json, stored as ``json_file`` (for instance
            evaluation).
        metadata: extra metadata, overriding the defaults. Unless it has all of
            ``stuff_classes`` and both category id maps, the class metadata is built from the
            json's ``categories`` (the json is read now, once). The defaults are
            ``evaluator_type`` "coco_panoptic_seg", ``ignore_label`` 255 and ``label_divisor``
            1000.
        sem_seg_root: optional folder of semantic PNGs (adds ``sem_seg_file_name``).
    """
    meta = {
        "evaluator_type": "coco_panoptic_seg",
        "ignore_label": 255,
        "label_divisor": 1000,
    }
    metadata = metadata or {}
    if any(key not in metadata for key in _CLASS_KEYS):
        meta.update(metadata_from_categories(read_json(panoptic_json)["categories"]))
    meta.update(metadata)
    paths = {
        "image_root": image_root,
        "panoptic_root": panoptic_root,
        "panoptic_json": panoptic_json,
    }
    if instances_json is not None:
        paths["json_file"] = instances_json
    if sem_seg_root is not None:
        paths["sem_seg_root"] = sem_seg_root

    DatasetCatalog.register(
        name,
        partial(
            load_panoptic_json,
            panoptic_json,
            image_root,
            panoptic_root,
            sem_seg_root,
            meta["thing_dataset_id_to_contiguous_id"],
            meta["stuff_dataset_id_to_contiguous_id"],
        ),
    )
    MetadataCatalog.get(name).set(**paths, **meta)
