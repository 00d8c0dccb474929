"""Layers of the model core: multi-scale deformable attention (op and module)."""

from panoptic_segformer.layers.ms_deform_attn import MSDeformAttn
from panoptic_segformer.layers.ms_deform_attn_func import (
    ms_deform_attn_pytorch,
    multi_scale_deformable_attention,
)

__all__ = ["MSDeformAttn", "ms_deform_attn_pytorch", "multi_scale_deformable_attention"]
