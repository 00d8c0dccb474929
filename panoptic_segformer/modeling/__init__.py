"""Panoptic SegFormer modules: backbones, neck, encoder, decoders, criterion, post-processing.

The entry points: :func:`build_panoptic_segformer` (the model, :class:`PanopticSegFormerCore`,
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
    PanopticSegFormerCore,
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
    "PanopticSegFormerCore",
    "PixelArgmaxOptions",
    "QuerySizes",
    "build_backbone_by_name",
    "build_panoptic_segformer",
    "count_parameters",
    "query_sizes",
    "split_targets",
]


# names of earlier releases, kept for one release: the backbone builder (detectron2 has a
# build_backbone of its own) and the model core (the meta-architecture's ``core``)
_RENAMED = {
    "build_backbone": ("build_backbone_by_name", build_backbone_by_name),
    "PanopticSegFormerModel": ("PanopticSegFormerCore", PanopticSegFormerCore),
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new_name, value = _RENAMED[name]
        warnings.warn(
            f"panoptic_segformer.modeling.{name} is deprecated and will be removed: use "
            f"{new_name}",
            FutureWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
