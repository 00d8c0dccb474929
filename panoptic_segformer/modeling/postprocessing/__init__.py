"""Inference post-processing: per-query masks to panoptic, instance and semantic results.

Pure functions on tensors; no model, no config. One concept per file:

* ``mask_statistics``: binary masks, areas and mask scores, with the bilinear resize;
* ``mask_wise``: mask-wise merging (Algorithm 1) and :class:`MaskWiseOptions`;
* ``pixel_argmax``: the pixel-wise argmax baselines (Table 7) and :class:`PixelArgmaxOptions`;
* ``results``: instance results and the semantic map;
* ``model_outputs``: all of these for each image of a batch of model outputs;
* ``common``: input checks and segment numbering they share.
"""

from panoptic_segformer.modeling.postprocessing.common import MergeOptions, SegmentInfo
from panoptic_segformer.modeling.postprocessing.mask_statistics import (
    MaskStatistics,
    mask_statistics,
    resize_masks,
)
from panoptic_segformer.modeling.postprocessing.mask_wise import (
    MaskWiseOptions,
    mask_wise_candidates,
    mask_wise_merging,
    mask_wise_merging_resized,
)
from panoptic_segformer.modeling.postprocessing.model_outputs import (
    RESULT_TYPES,
    results_from_outputs,
)
from panoptic_segformer.modeling.postprocessing.pixel_argmax import (
    PixelArgmaxOptions,
    pixel_wise_argmax,
)
from panoptic_segformer.modeling.postprocessing.results import (
    InstanceResults,
    instance_results,
    semantic_map,
)

__all__ = [
    "InstanceResults",
    "MaskStatistics",
    "MaskWiseOptions",
    "MergeOptions",
    "PixelArgmaxOptions",
    "RESULT_TYPES",
    "SegmentInfo",
    "instance_results",
    "mask_statistics",
    "mask_wise_candidates",
    "mask_wise_merging",
    "mask_wise_merging_resized",
    "pixel_wise_argmax",
    "resize_masks",
    "results_from_outputs",
    "semantic_map",
]
