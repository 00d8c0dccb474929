"""The tiny core model the tests build without detectron2: a ResNet-18 backbone, hidden size 32,
one layer in every stack, random weights (seeded), in eval mode. Each test passes what it
needs on top (classes, heads, queries, inference options, the criterion)."""

import torch

from panoptic_segformer.modeling.backbone import ResNetBackbone
from panoptic_segformer.modeling.panoptic_segformer import build_panoptic_segformer


def build_tiny_core_model(**overrides) -> torch.nn.Module:
    """``build_panoptic_segformer`` on a ResNet-18 with the tiny sizes below, ``overrides``
    (its keyword arguments) on top; seeded with 0, in eval mode."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18)
    options = dict(
        d_model=32,
        n_heads=4,
        n_points=2,
        d_ffn=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_queries=8,
        num_thing_mask_layers=1,
        num_stuff_mask_layers=1,
        with_criterion=False,
    )
    options.update(overrides)
    return build_panoptic_segformer(backbone, backbone.out_channels, **options).eval()
