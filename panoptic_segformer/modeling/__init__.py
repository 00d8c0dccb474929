"""Panoptic SegFormer modules: backbones, neck, encoder, decoders, criterion, post-processing.

The entry points: :func:`build_panoptic_segformer` (the model, :class:`PanopticSegFormerModel`,
from a backbone), its :class:`InferenceOptions` with the merging's :class:`MaskWiseOptions` or
:class:`PixelArgmaxOptions`, :func:`build_backbone_by_name`, :class:`PanopticSegFormerCriterion`
and :func:`split_targets`.
"""

import warnings
from typing import Any

from panoptic_segformer.modeling.backbone import build_backbone_by_name
from panoptic_segformer.modeling.complexity import count_parameters
from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion
from panoptic_segformer.modeling.inference import InferenceOptions
from panoptic_segformer.modeling.panoptic_segformer import (
    PanopticSegFormerModel,
    QuerySizes,
    build_panoptic_segformer,
    query_sizes,
)
from panoptic_segformer.modeling.postprocessing import MaskWiseOptions, PixelArgmaxOptions
from panoptic_segformer.modeling.targets import split_targets

__all__ = [
    "InferenceOptions",
    "MaskWiseOptions",
    "PanopticSegFormerCriterion",
    "PanopticSegFormerModel",
    "PixelArgmaxOptions",
    "QuerySizes",
    "build_backbone_by_name",
    "build_panoptic_segformer",
    "count_parameters",
    "query_sizes",
    "split_targets",
]


def __getattr__(name: str) -> Any:
    # the name before build_backbone_by_name (detectron2 has a build_backbone of its own); kept
    # for one release
    if name == "build_backbone":
        warnings.warn(
            "panoptic_segformer.modeling.build_backbone is deprecated and will be removed: use "
            "build_backbone_by_name",
            FutureWarning,
            stacklevel=2,
        )
        return build_backbone_by_name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
