"""Data: the dataset mapper and dataset registration (needs detectron2).

Importing this package registers no dataset: :func:`register_builtin_datasets` registers
"ade20k_panoptic_train", "ade20k_panoptic_val" and "coco_2017_test-dev_panoptic" (names another
project may have taken are left alone); :func:`panoptic_segformer.d2.register` calls it.
"""

from panoptic_segformer.d2.data.builtin import (
    load_image_info_json,
    register_all_ade20k_panoptic,
    register_all_coco_panoptic_test,
    register_builtin_datasets,
)
from panoptic_segformer.d2.data.coco_panoptic import (
    load_panoptic_json,
    metadata_from_categories,
    read_segment_ids,
    register_panoptic_dataset,
    rgb_to_segment_ids,
)
from panoptic_segformer.d2.data.dataset_mapper import (
    PanopticSegFormerDatasetMapper,
    build_augmentations,
)
from panoptic_segformer.d2.data.subset import register_subset, select_images

__all__ = [
    "PanopticSegFormerDatasetMapper",
    "build_augmentations",
    "load_image_info_json",
    "load_panoptic_json",
    "metadata_from_categories",
    "read_segment_ids",
    "register_all_ade20k_panoptic",
    "register_all_coco_panoptic_test",
    "register_builtin_datasets",
    "register_panoptic_dataset",
    "register_subset",
    "rgb_to_segment_ids",
    "select_images",
]
