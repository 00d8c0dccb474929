"""detectron2 adapters of the timm backbones (Swin-L, PVTv2-B5).

ResNets are detectron2's own (``MODEL.BACKBONE.NAME: build_resnet_backbone`` with frozen BN);
the transformer backbones come from timm through
:func:`panoptic_segformer.modeling.build_backbone_by_name` and are registered here as
``D2TimmBackbone``, configured by ``MODEL.TIMM.*``.
"""

from typing import Dict

from detectron2.modeling import Backbone, ShapeSpec
from torch import Tensor

from panoptic_segformer.modeling.backbone import TIMM_BACKBONES, build_backbone_by_name

__all__ = ["D2TimmBackbone", "TIMM_BACKBONES"]

# detectron2's names of the stride-4 to stride-32 outputs, as its ResNet
_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class D2TimmBackbone(Backbone):
    """A timm backbone (``MODEL.TIMM.NAME``) with detectron2's ``Backbone`` interface.

    Outputs are named as detectron2's ResNet stages: ``res2`` (stride 4) to ``res5`` (stride
    32); ``MODEL.TIMM.OUT_FEATURES`` picks them (default res3, res4, res5 = C3, C4, C5).
    ImageNet weights come from the local file ``MODEL.TIMM.PRETRAINED`` (timm's format or the
    original release's); nothing is downloaded.
    """

    def __init__(self, cfg, input_shape: ShapeSpec) -> None:
        super().__init__()
        name = cfg.MODEL.TIMM.NAME
        if name not in TIMM_BACKBONES:
            raise ValueError(f"MODEL.TIMM.NAME must be one of {TIMM_BACKBONES}, got {name!r}")
        unknown = [f for f in cfg.MODEL.TIMM.OUT_FEATURES if f not in _STAGE_NAMES]
        if unknown:
            raise ValueError(
                f"MODEL.TIMM.OUT_FEATURES {list(cfg.MODEL.TIMM.OUT_FEATURES)} names {unknown}; "
                f"known: {_STAGE_NAMES}"
            )
        if input_shape.channels != 3:
            raise ValueError(f"timm backbones take 3-channel images, got {input_shape.channels}")
        self._out_features = list(cfg.MODEL.TIMM.OUT_FEATURES)
        out_indices = [_STAGE_NAMES.index(f) for f in self._out_features]
        options = {"out_indices": out_indices, "pretrained_path": cfg.MODEL.TIMM.PRETRAINED or None}
        if cfg.MODEL.TIMM.DROP_PATH_RATE >= 0:
            options["drop_path_rate"] = cfg.MODEL.TIMM.DROP_PATH_RATE
        self.net = build_backbone_by_name(name, **options)
        self._out_feature_channels = dict(zip(self._out_features, self.net.out_channels))
        self._out_feature_strides = dict(zip(self._out_features, self.net.strides))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return dict(zip(self._out_features, self.net(x)))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        # any size: Swin pads the image to its patch size itself, PVTv2 needs nothing
        return 1
