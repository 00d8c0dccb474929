"""Frozen batch norms folded into convolutions, channels-last weights, prepare_for_inference."""

import pytest
import torch
from tiny_core_model import build_tiny_core_model
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from panoptic_segformer.modeling.backbone import ResNetBackbone
from panoptic_segformer.modeling.inference import InferenceOptions
from panoptic_segformer.modeling.inference_preparation import (
    fold_frozen_batchnorm,
    fold_into_conv,
    is_frozen_batchnorm,
)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_into_conv_is_the_norm_after_the_conv(conv_bias, randomise_norms):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=conv_bias)
    bn = FrozenBatchNorm2d(5, eps=1e-3)
    randomise_norms(bn)
    x = torch.randn(2, 3, 8, 8)
    expected = bn(conv(x))
    # written out: (conv(x) - mean) / sqrt(var + eps) * weight + bias
    by_hand = (conv(x) - bn.running_mean[:, None, None]) / (
        bn.running_var[:, None, None] + 1e-3
    ).sqrt() * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(expected, by_hand)
    fold_into_conv(conv, bn)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="4 channels cannot follow a convolution of 5"):
        fold_into_conv(conv, FrozenBatchNorm2d(4))


def test_sequential_folds_only_a_norm_that_follows_a_conv(randomise_norms):
    torch.manual_seed(0)
    model = nn.Sequential(
        FrozenBatchNorm2d(3),
        nn.Conv2d(3, 4, 1),
        FrozenBatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
    )
    randomise_norms(model)
    x = torch.randn(1, 3, 6, 6)
    expected = model(x)
    assert fold_frozen_batchnorm(model) == 1
    assert is_frozen_batchnorm(model[0]) and isinstance(model[2], nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_resnet_backbone_folds_every_norm(randomise_norms):
    backbone = ResNetBackbone(depth=50).eval()
    norms = sum(is_frozen_batchnorm(m) for m in backbone.modules())
    assert norms == 53  # stem, 16 blocks x 3, 4 downsampling shortcuts
    randomise_norms(backbone)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = backbone(x)
        assert fold_frozen_batchnorm(backbone) == 53
        folded = backbone(x)
    assert not any(is_frozen_batchnorm(m) for m in backbone.modules())
    for a, b in zip(folded, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_prepared_model_predicts_the_same_and_refuses_training_losses(randomise_norms):
    model = build_tiny_core_model(
        num_thing_classes=3,
        num_stuff_classes=2,
        inference=InferenceOptions(max_detections=4),
        with_criterion=True,
    )
    randomise_norms(model)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = model(images)
        assert model.prepare_for_inference() is model
        prepared = model(images)
    conv = model.backbone.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.backbone.layer1[0].bn1, nn.Identity)
    assert not any(k.endswith("running_var") for k in model.state_dict())
    for key in expected:
        # within 1e-5 of the largest value (the masks reach about 5 here)
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(prepared[key], expected[key], rtol=1e-5, atol=1e-5 * scale)
    # train mode alone is allowed (detectron2's evaluation restores the mode a wrapper had);
    # computing training losses is not
    model.train()
    with pytest.raises(RuntimeError, match="prepared for inference .* cannot be trained"):
        model(images, targets=[{}])
    model.eval()
    model.prepare_for_inference()  # again: nothing more is folded
    assert isinstance(model.backbone.bn1, nn.Identity)


def test_backbones_with_group_norm_stay_nchw():
    # GroupNorm's channels-last kernel reduces in an order that depends on the number of threads
    # (results would differ between one process of two threads and two of one)
    from panoptic_segformer.modeling.inference_preparation import prepare_backbone_for_inference

    cl = torch.channels_last
    with_gn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3))
    frozen = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.Conv2d(8, 8, 3))
    assert prepare_backbone_for_inference(with_gn) == 0
    assert prepare_backbone_for_inference(frozen) == 1
    assert not any(
        m.weight.is_contiguous(memory_format=cl) for m in with_gn if type(m) is nn.Conv2d
    )
    assert all(m.weight.is_contiguous(memory_format=cl) for m in frozen if type(m) is nn.Conv2d)
