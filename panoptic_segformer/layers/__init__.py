"""Layers of the model core: multi-scale deformable attention (op and module), MLP, FFN, and the
activation checkpointing of a layer (``checkpointing.run_layer``)."""

from panoptic_segformer.layers.ffn import FFN
from panoptic_segformer.layers.mlp import MLP
from panoptic_segformer.layers.ms_deform_attn import MSDeformAttn
from panoptic_segformer.layers.ms_deform_attn_func import multi_scale_deformable_attention
from panoptic_segformer.layers.ms_deform_attn_torch import ms_deform_attn_pytorch

__all__ = [
    "FFN",
    "MLP",
    "MSDeformAttn",
    "ms_deform_attn_pytorch",
    "multi_scale_deformable_attention",
]
