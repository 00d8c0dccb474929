"""Panoptic SegFormer (Li et al., CVPR 2022) as a detectron2 project.

The model core (``panoptic_segformer.layers`` and ``panoptic_segformer.modeling``) is plain
PyTorch and imports without detectron2; importing this package imports nothing else. The
detectron2 layer loads on first use: :func:`add_panoptic_segformer_config` (which registers the
``PanopticSegFormer`` meta-architecture, the ``D2TimmBackbone`` backbone and the project's
datasets, see :mod:`panoptic_segformer.data.builtin`) and :class:`PanopticSegFormerCheckpointer`.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["PanopticSegFormerCheckpointer", "__version__", "add_panoptic_segformer_config"]

# the detectron2 layer's names, imported from their modules when first asked for
_DETECTRON2_LAYER = {
    "PanopticSegFormerCheckpointer": "panoptic_segformer.checkpoint",
    "add_panoptic_segformer_config": "panoptic_segformer.config",
}


def __getattr__(name: str) -> Any:
    if name not in _DETECTRON2_LAYER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_DETECTRON2_LAYER[name]), name)
