"""The datasets this project names in its configs, registered on request rather than at import:
ADE20K panoptic, and COCO panoptic's test-dev images (no ground truth: its predictions are
written as a submission).

Other detectron2 projects register some of these names too (Mask2Former registers
"ade20k_panoptic_train" and "ade20k_panoptic_val" when it is imported), and detectron2 refuses a
second registration. So importing this package registers nothing;
:func:`register_builtin_datasets`, called by :func:`panoptic_segformer.d2.register`, registers
the names that are still free and leaves the others as they are (a log line each).
"""

import logging
import os
from functools import lru_cache, partial
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.utils.file_io import PathManager

from panoptic_segformer.d2.data.coco_panoptic import (
    load_panoptic_json,
    metadata_from_categories,
    read_json,
    register_panoptic_dataset,
)

__all__ = [
    "SUBMISSION_EVALUATOR_TYPE",
    "load_image_info_json",
    "register_all_ade20k_panoptic",
    "register_all_coco_panoptic_test",
    "register_builtin_datasets",
]

# evaluator_type of panoptic datasets without ground truth (COCO test-dev): their predictions
# are written for COCO's evaluation server (evaluation.COCOPanopticSubmissionWriter), not scored
SUBMISSION_EVALUATOR_TYPE = "coco_panoptic_submission"

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

logger = logging.getLogger(__name__)


def _free_names(names: List[str]) -> List[str]:
    """The names not yet in DatasetCatalog; a log line for each one that is taken."""
    free = []
    for name in names:
        if name in DatasetCatalog.list():
            logger.info(f"dataset {name!r} is already registered; leaving it as it is")
        else:
            free.append(name)
    return free


@lru_cache(maxsize=None)
def _register_builtin_datasets(root: str) -> None:
    register_all_ade20k_panoptic(root)
    register_all_coco_panoptic_test(root)


def register_builtin_datasets(root: Optional[str] = None) -> None:
    """Registers the ADE20K panoptic splits and COCO panoptic test-dev under ``root``, once per
    root and process; names already registered (by another project, or by hand) are left alone.

    Args:
        root: the datasets folder; default ``$DETECTRON2_DATASETS``, else "datasets".
    """
    _register_builtin_datasets(root or os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_all_ade20k_panoptic(root: str) -> None:
    """Registers "ade20k_panoptic_train" and "ade20k_panoptic_val" under ``root``.

    Expects ``{root}/ADEChallengeData2016`` laid out by the MaskFormer family's preparation
    script. When a split's json is missing, its name is still registered with the paths as
    metadata, and ``DatasetCatalog.get`` raises FileNotFoundError naming the json. Names that are
    already registered are left alone (a log line each); the json is read only if one is free.

    Args:
        root: the datasets folder, usually ``$DETECTRON2_DATASETS``.
    """
    free = _free_names(list(_ADE20K_PANOPTIC_SPLITS))
    if not free:
        return
    base = os.path.join(root, "ADEChallengeData2016")
    # Both splits have ADE20K's 150 categories: read them once, from the smaller val json when
    # present, rather than parsing the large train json.
    jsons = [os.path.join(base, split[2]) for split in _ADE20K_PANOPTIC_SPLITS.values()]
    present = [j for j in sorted(jsons, key=lambda j: "train" in j) if PathManager.isfile(j)]
    metadata = {"evaluator_type": "ade20k_panoptic_seg"}
    if present:
        metadata.update(metadata_from_categories(read_json(present[0])["categories"]))
    for name in free:
        images, panoptic, panoptic_json, sem_seg = _ADE20K_PANOPTIC_SPLITS[name]
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
    content = read_json(image_info_json, "Image-info json")
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
    :class:`panoptic_segformer.d2.evaluation.COCOPanopticSubmissionWriter`) and
    ``submission_split`` "test-dev2017". Nothing is read now; ``DatasetCatalog.get`` raises
    FileNotFoundError naming the json when it is missing. A name that is already registered is
    left alone (with a log line).

    Args:
        root: the datasets folder, usually ``$DETECTRON2_DATASETS``.
    """
    classes = metadata_from_categories(COCO_CATEGORIES)
    for name in _free_names(list(_COCO_PANOPTIC_TEST_SPLITS)):
        images, image_info, split = _COCO_PANOPTIC_TEST_SPLITS[name]
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
