"""Every YAML in configs/ merges and builds on the CPU (with tiny overrides where the backbone
allows, and the real backbone otherwise)."""

import pytest
from skips import require, require_detectron2

require_detectron2()

import torch  # noqa: E402
from d2_helpers import CONFIGS, TINY, make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from panoptic_segformer.d2.meta_arch import PanopticSegFormer  # noqa: E402

TIMM_CONFIGS = {"swin_l.yaml", "pvtv2_b5.yaml"}
# the tiny head on the real timm backbone (its ResNet keys do not apply)
TINY_HEAD = [x for k, v in zip(TINY[::2], TINY[1::2]) if "RESNETS" not in k for x in (k, v)]


def test_every_config_is_tested():
    names = {c.name for c in CONFIGS}
    assert {"Base-PanopticSegFormer.yaml", "r50.yaml", "r50_12ep.yaml", "r101.yaml"} <= names
    assert {"swin_l.yaml", "pvtv2_b5.yaml", "ade20k_r50.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_builds_and_predicts(config):
    if config.name in TIMM_CONFIGS:
        require("timm", "Swin-L and PVTv2-B5 come from timm")
        cfg = make_cfg(config, *TINY_HEAD)
    else:
        cfg = make_cfg(config, *TINY)
    cfg.freeze()
    model = build_model(cfg).eval()
    assert isinstance(model, PanopticSegFormer)
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    assert model.core.num_thing_classes == ps.NUM_THING_CLASSES
    assert model.core.num_stuff_classes == ps.NUM_STUFF_CLASSES
    assert model.core.inference.merge.thing_score_threshold == ps.TEST.THING_SCORE_THRESHOLD
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)}])
    assert out["panoptic_seg"][0].shape == (64, 96)
    assert ("sem_seg" in out) == ps.TEST.SEMANTIC_ON


def test_schedules_follow_the_authors():
    epoch = 14786  # 118,287 COCO train images at batch 8
    r50 = make_cfg(CONFIGS[0].parent / "r50.yaml")
    assert (r50.SOLVER.MAX_ITER, tuple(r50.SOLVER.STEPS)) == (24 * epoch, (18 * epoch,))
    short = make_cfg(CONFIGS[0].parent / "r50_12ep.yaml")
    assert (short.SOLVER.MAX_ITER, tuple(short.SOLVER.STEPS)) == (12 * epoch, (8 * epoch,))
    assert r50.SOLVER.BASE_LR == 1.4e-4 and r50.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert r50.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert r50.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    swin = make_cfg(CONFIGS[0].parent / "swin_l.yaml")
    assert swin.MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESHOLD == 0.3
    assert r50.MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESHOLD == 0.25


def test_full_r50_has_the_core_parameter_count():
    # the core's count (Table 1: 50.74 M) counts frozen-BN affine terms as mmdet does;
    # detectron2's FrozenBatchNorm2d keeps them as buffers
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "")
    model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters())
    frozen_bn = sum(
        m.weight.numel() + m.bias.numel()
        for m in model.backbone.modules()
        if type(m).__name__ == "FrozenBatchNorm2d"
    )
    assert trainable + frozen_bn == 50_741_452
