"""Backbones: shapes, strides, frozen stages, exact parameter counts, checkpoint loading."""

import re
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from skips import require
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from panoptic_segformer.modeling.backbone import (
    TIMM_FACTORY_KWARGS_MIN_VERSION,
    TIMM_MIN_VERSION,
    ResNetBackbone,
    TimmBackbone,
    build_backbone_by_name,
)
from panoptic_segformer.modeling.complexity import count_parameters

# torchvision ResNet totals minus fc (2048 * 1000 + 1000 = 2,049,000 for 50/101), e.g. 25,557,032
# - 2,049,000 for ResNet-50. FrozenBatchNorm2d keeps its affine weight/bias as buffers, so the
# nn.Parameter count drops them: 53,120 BN affine values in ResNet-50, 105,344 in ResNet-101.
RESNET50_PARAMS = 23_508_032
RESNET50_PARAMS_NO_BN = 23_508_032 - 53_120
RESNET101_PARAMS = 42_500_160
RESNET101_PARAMS_NO_BN = 42_500_160 - 105_344
# A narrow Swin (~1.4M parameters) for the checkpoint tests: Swin-T would write a 110 MB file.
TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return ResNetBackbone(depth=50)


def _randomise_frozen_bn(module: nn.Module) -> None:
    """Non-trivial BN statistics so that a wrong BN would change the outputs."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def test_resnet50_shapes_strides_channels(resnet50):
    outs = resnet50(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    assert resnet50.out_channels == [512, 1024, 2048]
    assert resnet50.strides == [8, 16, 32]


def test_resnet_all_stages_and_small_depths():
    backbone = ResNetBackbone(depth=18, out_indices=(0, 1, 2, 3))
    outs = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [
        (2, 64, 16, 16),
        (2, 128, 8, 8),
        (2, 256, 4, 4),
        (2, 512, 2, 2),
    ]
    assert backbone.strides == [4, 8, 16, 32]
    assert ResNetBackbone(depth=34).out_channels == [128, 256, 512]


def test_resnet_parameter_counts(resnet50):
    tv = torchvision.models.resnet50(weights=None)
    tv_no_fc = sum(p.numel() for p in tv.parameters()) - sum(p.numel() for p in tv.fc.parameters())
    assert tv_no_fc == RESNET50_PARAMS
    assert count_parameters(resnet50) == RESNET50_PARAMS
    assert count_parameters(resnet50, include_frozen_bn=False) == RESNET50_PARAMS_NO_BN
    resnet101 = build_backbone_by_name("resnet101")
    assert resnet101.out_channels == [512, 1024, 2048]
    assert resnet101.strides == [8, 16, 32]
    assert count_parameters(resnet101) == RESNET101_PARAMS
    assert count_parameters(resnet101, include_frozen_bn=False) == RESNET101_PARAMS_NO_BN


def test_resnet_frozen_bn_everywhere(resnet50):
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet50.modules())
    # 1 stem BN + (3 + 4 + 6 + 3) blocks x 3 BNs + 4 downsample BNs
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in resnet50.modules()) == 53


def test_resnet_frozen_stages(resnet50):
    for name, p in resnet50.named_parameters():
        frozen = name.startswith(("conv1.", "layer1."))
        assert p.requires_grad != frozen, name
    assert all(p.requires_grad for p in ResNetBackbone(frozen_stages=-1).parameters())
    stem_only = ResNetBackbone(frozen_stages=0)
    assert not stem_only.conv1.weight.requires_grad
    assert all(p.requires_grad for p in stem_only.layer1.parameters())
    assert not any(p.requires_grad for p in ResNetBackbone(frozen_stages=4).parameters())


def test_resnet_train_and_eval_outputs_match():
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18)  # every depth uses the same FrozenBatchNorm2d
    _randomise_frozen_bn(backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_outs = backbone.train()(x)
        eval_outs = backbone.eval()(x)
    for t, e in zip(train_outs, eval_outs):
        torch.testing.assert_close(t, e, rtol=0, atol=0)


def test_resnet_load_pretrained_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    _randomise_frozen_bn(tv)
    path = tmp_path / "resnet50.pth"
    state_dict = tv.state_dict()
    assert "fc.weight" in state_dict and "bn1.num_batches_tracked" in state_dict
    torch.save(state_dict, path)

    backbone = ResNetBackbone(depth=50)
    backbone.load_pretrained(str(path))
    x = torch.randn(1, 3, 64, 96)
    tv.eval()
    with torch.no_grad():
        outs = backbone(x)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = []
        for stage in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            h = stage(h)
            expected.append(h)
    for out, ref in zip(outs, expected[1:]):
        # Random-init activations reach ~1e3; FrozenBatchNorm2d folds BN into one scale and shift,
        # so allow float32 rounding relative to that scale.
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_resnet_load_pretrained_names_bad_keys(tmp_path):
    state_dict = torchvision.models.resnet50(weights=None).state_dict()
    backbone = ResNetBackbone(depth=50)

    missing = dict(state_dict)
    del missing["layer3.2.conv2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layer3.2.conv2.weight'\]"):
        backbone.load_pretrained(str(tmp_path / "missing.pth"))

    wrong = dict(state_dict, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"layer1.0.conv1.weight: checkpoint \(64, 64, 3, 3\)"):
        backbone.load_pretrained(str(tmp_path / "wrong.pth"))

    extra = dict(state_dict, **{"layer5.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['layer5.weight'\]"):
        backbone.load_pretrained(str(tmp_path / "extra.pth"))

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        backbone.load_pretrained(str(tmp_path / "nowhere.pth"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=152), "got 152"),
        (dict(frozen_stages=5), "got 5"),
        (dict(out_indices=(3, 1)), r"got \[3, 1\]"),
        (dict(out_indices=(1, 4)), r"got \[1, 4\]"),
        (dict(out_indices=()), r"got \[\]"),
    ],
)
def test_resnet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNetBackbone(**kwargs)


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match=r"'resnet18'.*'pvt_v2_b5'.*'resnet50'"):
        build_backbone_by_name("resnet18")


def test_timm_missing_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        TimmBackbone("pvt_v2_b5")


def test_swin_large_matches_authors_backbone():
    require("timm", "the Swin and PVTv2 backbones need timm")
    # On the meta device: Swin-L is 195M parameters, too slow to initialise in a unit test.
    backbone = build_backbone_by_name("swin_large", device="meta")
    assert backbone.out_channels == [384, 768, 1536]
    assert backbone.strides == [8, 16, 32]
    assert backbone.channels_last
    # The authors' Swin-L (window 7) incl. its three output LayerNorms, 2 * (384 + 768 + 1536).
    assert count_parameters(backbone) == 194_997_780
    assert len(backbone.norms) == 3
    # Detection-style windows: the last stage (7x7 at 224 px) still shifts, as in the authors' code.
    last_block = backbone.model.layers_3.blocks[1]
    assert last_block.window_size == (7, 7) and last_block.shift_size == (3, 3)


def test_swin_large_w12_feature_info():
    require("timm", "the Swin and PVTv2 backbones need timm")
    backbone = build_backbone_by_name("swin_large_w12", device="meta")
    assert backbone.out_channels == [384, 768, 1536]
    assert backbone.strides == [8, 16, 32]
    assert count_parameters(backbone) == 195_200_820


def test_pvt_v2_b5_feature_info():
    require("timm", "the Swin and PVTv2 backbones need timm")
    backbone = build_backbone_by_name("pvt_v2_b5", device="meta")
    assert backbone.out_channels == [128, 320, 512]
    assert backbone.strides == [8, 16, 32]
    assert not backbone.channels_last
    # Equal to the authors' pvt_v2_b5 (easymd/models/backbones/pvt_v2.py) without a head.
    assert count_parameters(backbone) == 81_443_008


def test_timm_pvt_forward_is_channels_first():
    require("timm", "the Swin and PVTv2 backbones need timm")
    torch.manual_seed(0)
    backbone = TimmBackbone("pvt_v2_b0").eval()  # same class as pvt_v2_b5, 3.4M parameters
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 8, 12), (1, 160, 4, 6), (1, 256, 2, 3)]


def test_timm_swin_forward_is_channels_first():
    require("timm", "the Swin and PVTv2 backbones need timm")
    torch.manual_seed(0)
    # Swin-T with build_backbone_by_name("swin_large")'s settings; 64x96 is not the 224-px img_size.
    backbone = TimmBackbone(
        "swin_tiny_patch4_window7_224",
        strict_img_size=False,
        always_partition=True,
        output_norm=True,
    ).eval()
    for norm in backbone.norms:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = backbone(x)
        raw = backbone.model(x)
    assert [tuple(o.shape) for o in outs] == [(2, 192, 8, 12), (2, 384, 4, 6), (2, 768, 2, 3)]
    for out, r, norm in zip(outs, raw, backbone.norms):
        assert r.shape[-1] == out.shape[1]  # timm's Swin features are (N, H, W, C)
        torch.testing.assert_close(out, norm(r).permute(0, 3, 1, 2), rtol=0, atol=0)


def test_timm_backbones_take_any_image_size():
    require("timm", "the Swin and PVTv2 backbones need timm")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 61, 93)  # neither side a multiple of 4
    # Swin pads the image with zeros to its patch size 4 first, as the authors' PatchEmbed
    swin = TimmBackbone(
        "swin_tiny_patch4_window7_224", strict_img_size=False, always_partition=True, pad_to=4
    ).eval()
    pvt = TimmBackbone("pvt_v2_b0").eval()  # overlapping patch embedding: any size as it is
    with torch.no_grad():
        outs = swin(x)
        padded = swin.model(F.pad(x, (0, 3, 0, 3)))
        pvt_outs = pvt(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 12), (4, 6), (2, 3)]
    assert all(torch.equal(o, p.permute(0, 3, 1, 2)) for o, p in zip(outs, padded))
    assert [tuple(o.shape[-2:]) for o in pvt_outs] == [(8, 12), (4, 6), (2, 3)]
    with pytest.raises(ValueError, match="pad_to must be at least 1, got 0"):
        TimmBackbone("pvt_v2_b0", pad_to=0)


def _forbid_downloads(monkeypatch):
    import timm.models._builder as builder

    def fail(*args, **kwargs):
        raise AssertionError("tried to download weights")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(builder, name, fail)


def _original_swin_layout(state_dict):
    """timm -> the original Swin release: downsampling ends a stage instead of starting the next,
    ``head`` has no ``fc``, and the relative position index is stored."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return out


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_timm_load_pretrained_round_trip(tmp_path, monkeypatch, layout):
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    _forbid_downloads(monkeypatch)
    torch.manual_seed(0)
    # A 10-class head: the classifier is dropped, as for ImageNet-22k checkpoints.
    full = timm.create_model(
        "swin_tiny_patch4_window7_224", num_classes=10, strict_img_size=False, **TINY_SWIN
    ).eval()
    state_dict = full.state_dict()
    if layout == "original":
        state_dict = _original_swin_layout(state_dict)
    path = tmp_path / "swin_tiny.pth"
    torch.save({"model": state_dict}, path)

    torch.manual_seed(1)
    backbone = TimmBackbone(
        "swin_tiny_patch4_window7_224",
        pretrained_path=str(path),
        strict_img_size=False,
        **TINY_SWIN,
    ).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = backbone(x)
        expected = full.forward_intermediates(
            x, indices=[1, 2, 3], intermediates_only=True, output_fmt="NCHW"
        )
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_timm_load_pretrained_names_bad_keys(tmp_path, monkeypatch):
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    _forbid_downloads(monkeypatch)
    state_dict = timm.create_model("pvt_v2_b0").state_dict()
    del state_dict["stages.2.blocks.0.attn.q.weight"]
    path = tmp_path / "pvt.pth"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"missing keys \['stages.2.blocks.0.attn.q.weight'\]"):
        TimmBackbone("pvt_v2_b0", pretrained_path=str(path))


@pytest.mark.parametrize(
    "name, model", [("swin_large", "swin_large_patch4_window7_224"), ("pvt_v2_b5", "pvt_v2_b5")]
)
def test_timm_too_old_raises_naming_model_and_versions(monkeypatch, name, model):
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    # timm 0.9.16 builds Swin without always_partition, silently (Swin ignores unknown arguments)
    monkeypatch.setattr(timm, "__version__", "0.9.16")
    message = rf"{model} needs timm >= 1\.0\.8 .*but timm 0\.9\.16 is installed"
    with pytest.raises(ImportError, match=message):
        build_backbone_by_name(name)


@pytest.mark.parametrize("version, builds", [("1.0.7", False), ("1.0.8", True), ("1.0.10", True)])
def test_timm_minimum_version_is_the_boundary(monkeypatch, version, builds):
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    assert TIMM_MIN_VERSION == "1.0.8"
    monkeypatch.setattr(timm, "__version__", version)
    if builds:
        assert TimmBackbone("pvt_v2_b0").out_channels == [64, 160, 256]
    else:
        with pytest.raises(ImportError, match=rf"pvt_v2_b0 needs timm >= 1\.0\.8 .*{version}"):
            TimmBackbone("pvt_v2_b0")


def test_timm_device_argument_needs_newer_timm(monkeypatch):
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    assert TIMM_FACTORY_KWARGS_MIN_VERSION == "1.0.21"
    # timm 1.0.20's PVTv2 rejects device=, its Swin builds on the CPU instead of the meta device
    monkeypatch.setattr(timm, "__version__", "1.0.20")
    message = r"pvt_v2_b0 needs timm >= 1\.0\.21 for device= and dtype=, but timm 1\.0\.20"
    with pytest.raises(ImportError, match=message):
        TimmBackbone("pvt_v2_b0", device="meta", dtype=torch.float16)


def test_timm_missing_checkpoint_filter_raises_naming_model(tmp_path, monkeypatch):
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    import timm.models.pvt_v2 as pvt_v2

    _forbid_downloads(monkeypatch)
    path = tmp_path / "pvt.pth"
    torch.save(timm.create_model("pvt_v2_b0").state_dict(), path)
    # as pvt_v2 before timm 1.0.7, whose filter was private: the weights would load unconverted
    monkeypatch.delattr(pvt_v2, "checkpoint_filter_fn")
    message = r"pvt_v2_b0: timm \S+ has no timm\.models\.pvt_v2\.checkpoint_filter_fn"
    with pytest.raises(ImportError, match=message):
        TimmBackbone("pvt_v2_b0", pretrained_path=str(path))


def test_timm_converts_the_checkpoint_once(tmp_path, monkeypatch):
    """timm's loader applies the family's checkpoint_filter_fn itself, so it must get the
    checkpoint as saved: before timm 1.0.31, Swin's filter moves the downsampling layers of a
    converted checkpoint without a classifier once more."""
    timm = require("timm", "the Swin and PVTv2 backbones need timm")
    import timm.models.swin_transformer as swin

    _forbid_downloads(monkeypatch)
    full = timm.create_model("swin_tiny_patch4_window7_224", strict_img_size=False, **TINY_SWIN)
    checkpoint = _original_swin_layout(full.state_dict())
    path = tmp_path / "swin_tiny.pth"
    torch.save(checkpoint, path)
    filter_fn, inputs = swin.checkpoint_filter_fn, []

    def recording_filter_fn(state_dict, model):
        inputs.append(sorted(state_dict))
        return filter_fn(state_dict, model)

    monkeypatch.setattr(swin, "checkpoint_filter_fn", recording_filter_fn)
    TimmBackbone(
        "swin_tiny_patch4_window7_224",
        pretrained_path=str(path),
        strict_img_size=False,
        **TINY_SWIN,
    )
    # once to check the checkpoint against the full model, once in timm's loader
    assert inputs == [sorted(checkpoint)] * 2


def test_the_old_names_still_work_with_a_warning():
    import panoptic_segformer.modeling as modeling

    with pytest.warns(FutureWarning, match="use build_backbone_by_name"):
        old = modeling.build_backbone
    assert old is build_backbone_by_name
    with pytest.warns(
        FutureWarning, match="PanopticSegFormerModel is deprecated.*use PanopticSegFormerCore"
    ):
        assert modeling.PanopticSegFormerModel is modeling.PanopticSegFormerCore
    with pytest.raises(AttributeError, match="no attribute 'build_nothing'"):
        modeling.build_nothing
