"""The assembled model: shapes, training on one batch, gradients, inference switches."""

import pytest
import torch
from torch import nn

from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion, split_targets
from panoptic_segformer.modeling.panoptic_segformer import build_panoptic_segformer

K, Z = 3, 2  # thing and stuff classes


class TinyBackbone(nn.Module):
    """Three maps at strides 8, 16, 32, from non-overlapping patches."""

    def __init__(self) -> None:
        super().__init__()
        self.s8 = nn.Conv2d(3, 16, 8, 8)
        self.s16 = nn.Conv2d(16, 24, 2, 2)
        self.s32 = nn.Conv2d(24, 32, 2, 2)

    def forward(self, x):
        c3 = self.s8(x)
        c4 = self.s16(c3.relu())
        return [c3, c4, self.s32(c4.relu())]


def tiny_model(**kwargs):
    options = dict(
        num_thing_classes=K,
        num_stuff_classes=Z,
        d_model=32,
        n_heads=4,
        n_points=2,
        d_ffn=64,
        num_encoder_layers=1,
        num_decoder_layers=2,
        num_queries=12,
        num_thing_mask_layers=1,
        num_stuff_mask_layers=2,
        max_detections=6,
    )
    options.update(kwargs)
    return build_panoptic_segformer(TinyBackbone(), [16, 24, 32], **options)


def synthetic_batch(box_free=False):
    """Two 64 x 96 images; the second is 48 x 80 inside the padding."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=g)
    padding = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding[1, 48:] = True
    padding[1, :, 80:] = True
    images[padding[:, None].expand_as(images)] = 0
    masks = torch.zeros(3, 64, 96, dtype=torch.bool)
    masks[0, 8:24, 8:40] = True
    masks[1, 32:56, 48:88] = True
    masks[2] = ~(masks[0] | masks[1])
    # paint the objects into the image so there is something to learn
    images[0, 0][masks[0]] += 2
    images[0, 1][masks[1]] -= 2
    first = split_targets(torch.tensor([0, 2, K + 1]), masks, (64, 96), K, Z, box_free)
    second_mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    second_mask[0, 16:40, 16:48] = True
    images[1, 0][second_mask[0]] += 2
    second = split_targets(torch.tensor([0]), second_mask, (48, 80), K, Z, box_free)
    return images, padding, [first, second]


def test_inference_shapes_and_postprocess():
    torch.manual_seed(0)
    model = tiny_model(result_types=["panoptic_seg", "instances", "sem_seg"]).eval()
    images, padding, _ = synthetic_batch()
    with torch.no_grad():
        out = model(images, padding)
    assert out["thing_masks"].shape == (2, 6, 8, 12)
    assert out["thing_scores"].shape == out["thing_labels"].shape == (2, 6)
    assert out["thing_boxes"].shape == (2, 6, 4)
    assert out["stuff_masks"].shape == (2, Z, 8, 12)
    assert out["stuff_scores"].shape == (2, Z)
    assert int(out["thing_labels"].max()) < K
    # the kept things are the top scores of the location decoder's last layer
    assert torch.all(out["thing_scores"][:, :-1] >= out["thing_scores"][:, 1:])
    results = model.postprocess(out, (64, 96), [(64, 96), (48, 80)], [(128, 192), (24, 40)])
    seg, segments = results[1]["panoptic_seg"]
    assert seg.shape == (24, 40) and seg.dtype == torch.int32
    assert results[0]["panoptic_seg"][0].shape == (128, 192)
    assert results[1]["instances"].masks.shape == (6, 24, 40)
    assert results[1]["sem_seg"].shape == (K + Z, 24, 40)
    for info in segments:
        assert info["isthing"] == (info["category_id"] < K)
    with pytest.raises(ValueError, match="outputs hold 2 images but got 1 image sizes"):
        model.postprocess(out, (64, 96), [(64, 96)])


def test_inference_switches():
    torch.manual_seed(0)
    images, padding, _ = synthetic_batch()
    early = tiny_model(mask_decoder_layers=1).eval()
    with torch.no_grad():
        out = early(images, padding)
    # early exit: the first layer's mask, not the tail's
    assert out["thing_masks"].shape == (2, 6, 8, 12)
    argmax = tiny_model(merge="pixel_argmax", merge_kwargs={"score_threshold": 0.0}).eval()
    with torch.no_grad():
        out = argmax(images, padding)
    seg, _ = argmax.postprocess(out, (64, 96), [(64, 96), (48, 80)])[0]["panoptic_seg"]
    assert seg.shape == (64, 96)
    with pytest.raises(ValueError, match="merge must be one of"):
        tiny_model(merge="argmax")
    with pytest.raises(
        ValueError,
        match=r"num_feature_levels must be at least 3 \(the mask decoder reads three\), got 2",
    ):
        tiny_model(num_feature_levels=2)


def test_three_level_variant_and_box_free_train():
    torch.manual_seed(0)
    images, padding, targets = synthetic_batch(box_free=True)
    model = tiny_model(num_feature_levels=3, box_free=True)
    losses = model(images, padding, targets)
    assert "loss_giou" not in losses and "loss_bbox" in losses
    assert all(torch.isfinite(v) for v in losses.values())


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0)
    images, padding, targets = synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(60):
        loss = sum(model(images, padding, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    # the total loss falls at least 5-fold within 60 steps (about 9-fold as measured)
    assert history[-1] < history[0] / 5, history[::10]


def test_gradients_reach_every_parameter_that_learns():
    torch.manual_seed(0)
    model = tiny_model(criterion=PanopticSegFormerCriterion(K, Z, thing_class_weight=1.0))
    images, padding, targets = synthetic_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    # zero-initialised output layers (box deltas) pass no gradient back at the first step
    for _ in range(2):
        optimizer.zero_grad()
        sum(model(images, padding, targets).values()).backward()
        optimizer.step()
    optimizer.zero_grad()
    sum(model(images, padding, targets).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_default_thing_class_loss_is_zero_but_connected():
    # the authors weight the mask decoder's thing class loss by 0; its heads stay in the graph
    # (a zero gradient, so distributed training needs no unused-parameter search)
    torch.manual_seed(0)
    model = tiny_model()
    images, padding, targets = synthetic_batch()
    losses = model(images, padding, targets)
    assert float(losses["t0.loss_cls_things"].detach()) == 0.0
    sum(losses.values()).backward()
    head = model.mask_decoder.thing_class_heads[0]
    assert head.weight.grad is not None and not head.weight.grad.any()
    learning = [n for n, p in model.named_parameters() if p.grad is None]
    assert learning == []


def test_inference_only_model_and_errors():
    model = tiny_model(with_criterion=False)
    images, padding, targets = synthetic_batch()
    with pytest.raises(RuntimeError, match="no criterion"):
        model(images, padding, targets)
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\), got \(3, 64, 96\)"):
        model(images[0])
    with pytest.raises(ValueError, match=r"padding_mask must be \(2, 64, 96\), got \(2, 64, 95\)"):
        model(images, padding[..., :-1])


def test_result_types_and_merge_options():
    torch.manual_seed(0)
    images, padding, _ = synthetic_batch()
    model = tiny_model(result_types=["panoptic_seg"], merge_kwargs={"thing_score_threshold": 0.0})
    model.eval()
    with torch.no_grad():
        out = model(images, padding)
    # raise the masks so that every query passes the pre-filter and merging keeps some
    out["thing_masks"] = out["thing_masks"] + 1
    # (H + W > 128: PyTorch's F.interpolate rounds a channel's pixels alike whatever the
    # channel count only above that size, so only there can the two paths below agree to the bit)
    sizes = [(64, 96), (56, 88)]
    results = model.postprocess(out, (64, 96), sizes)
    assert [set(r) for r in results] == [{"panoptic_seg"}] * 2
    assert any(info["isthing"] for info in results[0]["panoptic_seg"][1])
    # the block-by-block resize of the panoptic-only path gives the same segmentation
    model.result_types = ("panoptic_seg", "sem_seg")
    both = model.postprocess(out, (64, 96), sizes)
    for alone, with_sem in zip(results, both):
        assert torch.equal(alone["panoptic_seg"][0], with_sem["panoptic_seg"][0])
        assert alone["panoptic_seg"][1] == with_sem["panoptic_seg"][1]
    assert model.merge_kwargs["stuff_overlap_threshold"] == 0.2  # defaults filled in
    with pytest.raises(ValueError, match=r"unknown options \['score_threshold'\] for merge="):
        tiny_model(merge_kwargs={"score_threshold": 0.1})
    with pytest.raises(ValueError, match="result_types must be a non-empty subset"):
        tiny_model(result_types=["panoptic"])


@pytest.mark.parametrize(
    "backbone,count,published",
    [
        ("resnet50", 50_741_452, 51.0e6),
        ("resnet101", 69_733_580, 69.9e6),
        ("swin_large", 220_822_176, 221.4e6),
        ("pvt_v2_b5", 104_465_740, 104.9e6),
    ],
)
def test_parameter_counts_match_table_1(backbone, count, published):
    # Table 1 of the paper; the models are built on the meta device (no memory, no init time)
    from panoptic_segformer.modeling.backbone import build_backbone, count_parameters

    if backbone.startswith(("swin", "pvt")):
        pytest.importorskip("timm", reason="timm is needed for the Swin-L and PVTv2-B5 backbones")
    with torch.device("meta"):
        net = build_backbone(backbone)
        model = build_panoptic_segformer(net, net.out_channels, with_criterion=False)
    assert count_parameters(model) == count
    assert abs(count / published - 1) < 0.01


@pytest.mark.parametrize("second_has_things", [False, True])
def test_images_without_segments_train(second_has_things):
    # a batch with nothing at all, or one empty image next to one with a thing: the thing mask
    # decoder may run on zero queries; losses and gradients stay finite
    torch.manual_seed(0)
    model = tiny_model()
    images, padding, targets = synthetic_batch()
    empty = {key: value[:0] for key, value in targets[0].items()}
    losses = model(images, padding, [empty, targets[1] if second_has_things else empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_mask_stuff"].detach()) == 0.0  # no stuff anywhere
    assert (float(losses["loss_mask_things"].detach()) > 0) == second_has_things
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
