"""Panoptic SegFormer (Li et al., CVPR 2022) as a detectron2 project.

The package's folders are its layers; each imports only those above it in this list:

* :mod:`panoptic_segformer.utils`: reading weights files as data, Boundary PQ;
* :mod:`panoptic_segformer.layers`: multi-scale deformable attention (the operator and its
  kernels) and the small building blocks;
* :mod:`panoptic_segformer.modeling`: the model core, plain PyTorch with explicit arguments;
* :mod:`panoptic_segformer.deploy`: export and exported-model runtimes;
* :mod:`panoptic_segformer.d2`: the detectron2 layer (config, meta-architecture, data,
  evaluation, predictors, training).

Everything but ``d2`` imports without detectron2, and importing any module has no effect: the
detectron2 layer is registered by one call, :func:`panoptic_segformer.d2.register`. The names
below are the detectron2 layer's, imported when first asked for.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "PanopticSegFormerCheckpointer",
    "__version__",
    "add_panoptic_segformer_config",
    "get_config",
    "register",
]

# the detectron2 layer's entry points, imported from it when first asked for
_DETECTRON2_LAYER = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name not in _DETECTRON2_LAYER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("panoptic_segformer.d2"), name)
