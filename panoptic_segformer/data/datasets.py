"""Registration of datasets in COCO-panoptic format: any custom one, ADE20K panoptic, and COCO
panoptic's test-dev images (no ground truth: its predictions are written as a submission).

Datasets follow detectron2's "standard" panoptic convention: one contiguous id per category,
equal to its index in the json's ``categories`` list; ``thing_classes`` and ``stuff_classes``
both list every category name, so that detectron2's visualiser and panoptic evaluator work.
"""

import copy
import json
import logging
import os
from functools import partial
from typing import Any, Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from panoptic_segformer.evaluation import SUBMISSION_EVALUATOR_TYPE

__all__ = [
    "load_image_info_json",
    "load_panoptic_json",
    "metadata_from_categories",
    "register_all_ade20k_panoptic",
    "register_all_coco_panoptic_test",
    "register_panoptic_dataset",
    "register_subset",
    "select_images",
]

# ADE20K panoptic as written by the MaskFormer family's preparation script
# (prepare_ade20k_pan_seg.py): name -> (images, panoptic PNGs, panoptic json, semantic PNGs),
# relative to {root}/ADEChallengeData2016.
_ADE20K_PANOPTIC_SPLITS = {
    "ade20k_panoptic_train": (
        "images/training",
        "ade20k_panoptic_train",
        "ade20k_panoptic_train.json",
        "annotations_detectron2/training",
    ),
    "ade20k_panoptic_val": (
        "images/validation",
        "ade20k_panoptic_val",
        "ade20k_panoptic_val.json",
        "annotations_detectron2/validation",
    ),
}

# COCO panoptic's test images, without ground truth: name -> (images, image-info json, the split
# in COCO's submission file names), relative to {root}/coco as detectron2 lays out COCO.
_COCO_PANOPTIC_TEST_SPLITS = {
    "coco_2017_test-dev_panoptic": (
        "test2017",
        "annotations/image_info_test-dev2017.json",
        "test-dev2017",
    ),
}

# Metadata keys that describe the classes; built from the json unless all are given.
_CLASS_KEYS = (
    "stuff_classes",
    "thing_dataset_id_to_contiguous_id",
    "stuff_dataset_id_to_contiguous_id",
)

logger = logging.getLogger(__name__)


def _read_json(path: str, what: str = "Panoptic json") -> Dict[str, Any]:
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
    content = _read_json(panoptic_json)
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
        meta.update(metadata_from_categories(_read_json(panoptic_json)["categories"]))
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


def register_all_ade20k_panoptic(root: str) -> None:
    """Registers "ade20k_panoptic_train" and "ade20k_panoptic_val" under ``root``.

    Expects ``{root}/ADEChallengeData2016`` laid out by the MaskFormer family's preparation
    script. When a split's json is missing, its name is still registered with the paths as
    metadata, and ``DatasetCatalog.get`` raises FileNotFoundError naming the json. Names that are
    already registered are left alone.

    Args:
        root: the datasets folder, usually ``$DETECTRON2_DATASETS``.
    """
    base = os.path.join(root, "ADEChallengeData2016")
    # Both splits have ADE20K's 150 categories: read them once, from the smaller val json when
    # present, so importing the package does not parse the large train json.
    jsons = [os.path.join(base, split[2]) for split in _ADE20K_PANOPTIC_SPLITS.values()]
    present = [j for j in sorted(jsons, key=lambda j: "train" in j) if PathManager.isfile(j)]
    metadata = {"evaluator_type": "ade20k_panoptic_seg"}
    if present:
        metadata.update(metadata_from_categories(_read_json(present[0])["categories"]))
    for name, (images, panoptic, panoptic_json, sem_seg) in _ADE20K_PANOPTIC_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        image_root = os.path.join(base, images)
        panoptic_root = os.path.join(base, panoptic)
        panoptic_json = os.path.join(base, panoptic_json)
        sem_seg_root = os.path.join(base, sem_seg)
        if PathManager.isfile(panoptic_json):
            register_panoptic_dataset(
                name,
                image_root,
                panoptic_root,
                panoptic_json,
                metadata=metadata,
                sem_seg_root=sem_seg_root,
            )
            continue
        # Absent dataset: the loader builds the category maps from the json, if it appears.
        DatasetCatalog.register(
            name,
            partial(load_panoptic_json, panoptic_json, image_root, panoptic_root, sem_seg_root),
        )
        MetadataCatalog.get(name).set(
            image_root=image_root,
            panoptic_root=panoptic_root,
            panoptic_json=panoptic_json,
            sem_seg_root=sem_seg_root,
            evaluator_type="ade20k_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
        )


def load_image_info_json(image_info_json: str, image_root: str) -> List[Dict[str, Any]]:
    """Loads a COCO image-info json (``images`` without annotations, as test-dev's) into
    detectron2 dicts for inference.

    Args:
        image_info_json: path of the json; its ``images`` have ``id``, ``file_name``,
            ``height`` and ``width``.
        image_root: folder of the images, named as in the json.

    Returns:
        One dict per image: ``file_name``, ``image_id``, ``height``, ``width``.

    Raises:
        FileNotFoundError: if the json does not exist.
    """
    content = _read_json(image_info_json, "Image-info json")
    return [
        {
            "file_name": os.path.join(image_root, image["file_name"]),
            "image_id": image["id"],
            "height": image["height"],
            "width": image["width"],
        }
        for image in content["images"]
    ]


def register_all_coco_panoptic_test(root: str) -> None:
    """Registers "coco_2017_test-dev_panoptic": COCO test-dev's images and image-info json
    (``{root}/coco/test2017``, ``{root}/coco/annotations/image_info_test-dev2017.json``).

    The metadata is ``coco_2017_val_panoptic``'s (COCO panoptic's 133 categories: the
    image-info json lists the 80 detection categories only), with ``evaluator_type``
    "coco_panoptic_submission" (train_net.py writes the predictions for COCO's evaluation server,
    :class:`panoptic_segformer.evaluation.COCOPanopticSubmissionWriter`) and
    ``submission_split`` "test-dev2017". Nothing is read now; ``DatasetCatalog.get`` raises
    FileNotFoundError naming the json when it is missing. A name that is already registered is
    left alone (with a log line).

    Args:
        root: the datasets folder, usually ``$DETECTRON2_DATASETS``.
    """
    classes = metadata_from_categories(COCO_CATEGORIES)
    for name, (images, image_info, split) in _COCO_PANOPTIC_TEST_SPLITS.items():
        if name in DatasetCatalog.list():
            logger.info(f"dataset {name!r} is already registered; leaving it as it is")
            continue
        image_root = os.path.join(root, "coco", images)
        image_info_json = os.path.join(root, "coco", image_info)
        DatasetCatalog.register(name, partial(load_image_info_json, image_info_json, image_root))
        MetadataCatalog.get(name).set(
            image_root=image_root,
            image_info_json=image_info_json,
            submission_split=split,
            evaluator_type=SUBMISSION_EVALUATOR_TYPE,
            ignore_label=255,
            label_divisor=1000,
            **classes,
        )


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
            data = _read_json(source)
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
