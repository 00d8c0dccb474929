"""The detectron2 layer of Panoptic SegFormer (needs detectron2).

* :mod:`~panoptic_segformer.d2.config`: the config keys (a leaf: it imports nothing of the
  package) and :func:`get_config`.
* :func:`register` (:mod:`~panoptic_segformer.d2.registration`): the one call that registers the
  meta-architecture, the timm backbone and the built-in datasets; importing registers nothing.
* :mod:`~panoptic_segformer.d2.build` (the core model from a config),
  :mod:`~panoptic_segformer.d2.meta_arch`, :mod:`~panoptic_segformer.d2.backbone`,
  :mod:`~panoptic_segformer.d2.checkpoint` (with the authors' checkpoint conversion,
  :mod:`~panoptic_segformer.d2.official_checkpoint`), :mod:`~panoptic_segformer.d2.data`,
  :mod:`~panoptic_segformer.d2.evaluation`, :mod:`~panoptic_segformer.d2.predictor` and
  :mod:`~panoptic_segformer.d2.exported_predictor`, :mod:`~panoptic_segformer.d2.solver`,
  and :mod:`~panoptic_segformer.d2.engine` (the trainer, launching, preemption).

The names below are imported from their modules when first asked for.
"""

import importlib
from typing import Any

__all__ = [
    "ExportedPredictor",
    "PanopticSegFormerCheckpointer",
    "Predictor",
    "add_panoptic_segformer_config",
    "get_config",
    "register",
]

_NAMES = {
    "ExportedPredictor": "panoptic_segformer.d2.exported_predictor",
    "PanopticSegFormerCheckpointer": "panoptic_segformer.d2.checkpoint",
    "Predictor": "panoptic_segformer.d2.predictor",
    "add_panoptic_segformer_config": "panoptic_segformer.d2.config",
    "get_config": "panoptic_segformer.d2.config",
    "register": "panoptic_segformer.d2.registration",
}


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)
