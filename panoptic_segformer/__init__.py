"""Panoptic SegFormer (Li et al., CVPR 2022) as a detectron2 project.

The model core (``panoptic_segformer.layers`` and ``panoptic_segformer.modeling``) is plain
PyTorch and imports without detectron2.
"""

__version__ = "0.1.0"
