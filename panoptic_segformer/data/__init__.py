"""Data: the dataset mapper and dataset registration (needs detectron2).

Importing this package registers "ade20k_panoptic_train", "ade20k_panoptic_val" and
"coco_2017_test-dev_panoptic" under ``$DETECTRON2_DATASETS`` (default "datasets").
"""

import os

from .dataset_mapper import PanopticSegFormerDatasetMapper, build_augmentations, rgb_to_segment_ids
from .datasets import (
    load_image_info_json,
    load_panoptic_json,
    metadata_from_categories,
    register_all_ade20k_panoptic,
    register_all_coco_panoptic_test,
    register_panoptic_dataset,
    register_subset,
    select_images,
)

__all__ = [
    "PanopticSegFormerDatasetMapper",
    "build_augmentations",
    "load_image_info_json",
    "load_panoptic_json",
    "metadata_from_categories",
    "register_all_ade20k_panoptic",
    "register_all_coco_panoptic_test",
    "register_panoptic_dataset",
    "register_subset",
    "rgb_to_segment_ids",
    "select_images",
]

_root = os.getenv("DETECTRON2_DATASETS", "datasets")
register_all_ade20k_panoptic(_root)
register_all_coco_panoptic_test(_root)
