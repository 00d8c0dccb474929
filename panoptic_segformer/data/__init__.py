"""Data: the dataset mapper and dataset registration (needs detectron2).

Importing this package registers "ade20k_panoptic_train" and "ade20k_panoptic_val" under
``$DETECTRON2_DATASETS`` (default "datasets").
"""

import os

from .dataset_mapper import PanopticSegFormerDatasetMapper, build_augmentations, rgb_to_segment_ids
from .datasets import (
    load_panoptic_json,
    metadata_from_categories,
    register_all_ade20k_panoptic,
    register_panoptic_dataset,
    register_subset,
    select_images,
)

__all__ = [
    "PanopticSegFormerDatasetMapper",
    "build_augmentations",
    "load_panoptic_json",
    "metadata_from_categories",
    "register_all_ade20k_panoptic",
    "register_panoptic_dataset",
    "register_subset",
    "rgb_to_segment_ids",
    "select_images",
]

register_all_ade20k_panoptic(os.getenv("DETECTRON2_DATASETS", "datasets"))
