"""Panoptic SegFormer modules: backbones, neck, encoder, decoders, criterion, post-processing.

The entry points: :func:`build_panoptic_segformer` (the model, :class:`PanopticSegFormerModel`,
from a backbone), its :class:`InferenceOptions` with the merging's :class:`MaskWiseOptions` or
:class:`PixelArgmaxOptions`, :func:`build_backbone`, :class:`PanopticSegFormerCriterion` and
:func:`split_targets`.
"""

from panoptic_segformer.modeling.backbone import build_backbone
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
    "build_backbone",
    "build_panoptic_segformer",
    "count_parameters",
    "query_sizes",
    "split_targets",
]
