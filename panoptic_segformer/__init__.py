"""Panoptic SegFormer (Li et al., CVPR 2022) as a detectron2 project.

The model core (``panoptic_segformer.layers`` and ``panoptic_segformer.modeling``) is plain
PyTorch and imports without detectron2. Where detectron2 is installed, importing this package
also registers the detectron2 layer: the ``PanopticSegFormer`` meta-architecture, the
``D2TimmBackbone`` backbone, the ADE20K panoptic datasets and COCO panoptic test-dev, and exports
:func:`add_panoptic_segformer_config` and :class:`PanopticSegFormerCheckpointer`.
"""

import importlib.util

__version__ = "0.1.0"
__all__ = ["__version__"]

if importlib.util.find_spec("detectron2") is not None:
    # importing these registers them with detectron2
    from panoptic_segformer import d2_backbone, data, meta_arch
    from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer
    from panoptic_segformer.config import add_panoptic_segformer_config

    __all__ += [
        "PanopticSegFormerCheckpointer",
        "add_panoptic_segformer_config",
        "d2_backbone",
        "data",
        "meta_arch",
    ]
