"""The assembled model: shapes, training on one batch, gradients, inference switches."""

from dataclasses import replace

import pytest
import torch
from skips import require
from torch import nn

from panoptic_segformer.modeling import (
    InferenceOptions,
    MaskWiseOptions,
    PanopticSegFormerCore,
    PixelArgmaxOptions,
)
from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion
from panoptic_segformer.modeling.mask_decoder import MaskAttention
from panoptic_segformer.modeling.panoptic_segformer import build_panoptic_segformer
from panoptic_segformer.modeling.targets import split_targets

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


def tiny_inference(**kwargs) -> InferenceOptions:
    """Inference settings of the tiny model: 6 detections, the rest as given."""
    return InferenceOptions(**{"max_detections": 6, **kwargs})


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
        inference=tiny_inference(),
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
    # no score or overlap threshold: the untrained model then paints things and stuff
    permissive = MaskWiseOptions(
        thing_score_threshold=0.0,
        stuff_score_threshold=0.0,
        thing_overlap_threshold=1.0,
        stuff_overlap_threshold=1.0,
    )
    result_types = ["panoptic_seg", "instances", "sem_seg"]
    inference = tiny_inference(result_types=result_types, merge=permissive)
    model = tiny_model(inference=inference).eval()
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
    assert {info["isthing"] for info in segments} == {True, False}  # the loop checks both kinds
    for info in segments:
        assert info["isthing"] == (info["category_id"] < K)
    with pytest.raises(ValueError, match="outputs hold 2 images but got 1 image sizes"):
        model.postprocess(out, (64, 96), [(64, 96)])


def test_inference_switches():
    torch.manual_seed(0)
    images, padding, _ = synthetic_batch()
    # early exit: the first layer's masks, from a stack of two layers and a tail; the second
    # layer and the tails do not run
    model = tiny_model(num_thing_mask_layers=2, num_stuff_mask_layers=2).eval()
    layer_masks = {}
    for stack in ("things", "stuff"):
        for name, module in [
            ("0", getattr(model.mask_decoder, stack).layers[0]),
            ("1", getattr(model.mask_decoder, stack).layers[1]),
            ("tail", getattr(model.mask_decoder, stack).tail),
        ]:
            module.register_forward_hook(
                lambda m, args, out, key=(stack, name): layer_masks.__setitem__(key, out[1])
            )
    with torch.no_grad():
        full = model(images, padding)
        assert set(layer_masks) == {(s, n) for s in ("things", "stuff") for n in ("0", "1", "tail")}
        torch.testing.assert_close(full["thing_masks"], layer_masks["things", "tail"])
        layer_masks.clear()
        model.set_inference(replace(model.inference, mask_decoder_layers=1))
        early = model(images, padding)
    assert set(layer_masks) == {("things", "0"), ("stuff", "0")}
    torch.testing.assert_close(early["thing_masks"], layer_masks["things", "0"])
    torch.testing.assert_close(early["stuff_masks"], layer_masks["stuff", "0"])
    assert not torch.allclose(early["thing_masks"], full["thing_masks"])
    assert not torch.allclose(early["stuff_masks"], full["stuff_masks"])
    argmax = tiny_model(inference=tiny_inference(merge=PixelArgmaxOptions(score_threshold=0.0)))
    argmax.eval()
    with torch.no_grad():
        out = argmax(images, padding)
    seg, _ = argmax.postprocess(out, (64, 96), [(64, 96), (48, 80)])[0]["panoptic_seg"]
    assert seg.shape == (64, 96)
    with pytest.raises(ValueError, match="merge must be MaskWiseOptions or PixelArgmaxOptions"):
        InferenceOptions(merge="pixel_argmax")
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


def test_mask_decoder_projections_read_one_contiguous_memory():
    """In a batch of two the slice of the memory the mask decoder reads is strided; it is copied
    once, so that no key or value projection copies (and keeps) one of its own."""
    torch.manual_seed(0)
    model = tiny_model()
    images, padding, targets = synthetic_batch()
    inputs = []
    for module in model.mask_decoder.modules():
        if isinstance(module, MaskAttention):
            for proj in (module.k_proj, getattr(module, "v_proj", None)):
                if proj is not None:
                    proj.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    model(images, padding, targets)
    # keys and values of 2 thing layers and 3 stuff layers (each stack with its tail), no
    # values in the tails
    assert len(inputs) == 8
    assert all(x.is_contiguous() for x in inputs)
    assert len({x.data_ptr() for x in inputs}) == 1


def _losses_grads_and_kept_bytes(**switches):
    """One training step of the tiny model (dropout 0.1, seeded): its losses, its parameters'
    gradients, and the bytes autograd keeps outside activation checkpointing."""
    torch.manual_seed(0)
    model = tiny_model(**switches).train()
    images, padding, targets = synthetic_batch()
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    torch.manual_seed(1)  # the dropout's random numbers
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(images, padding, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads, sum(kept.values())


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    losses, grads, kept = _losses_grads_and_kept_bytes()
    assert tiny_model().encoder.layers[0].dropout1.p == 0.1  # the recomputation must redo it
    for switches, share in (
        ({"encoder_checkpointing": True}, 0.8),
        ({"mask_decoder_checkpointing": True}, 0.75),
        ({"encoder_checkpointing": True, "mask_decoder_checkpointing": True}, 0.5),
    ):
        ckpt_losses, ckpt_grads, ckpt_kept = _losses_grads_and_kept_bytes(**switches)
        # the same operations on the same values, with the same random dropout: bitwise equal
        assert ckpt_losses.keys() == losses.keys() and ckpt_grads.keys() == grads.keys()
        for name, loss in losses.items():
            assert torch.equal(ckpt_losses[name], loss), (switches, name)
        for name, grad in grads.items():
            assert torch.equal(ckpt_grads[name], grad), (switches, name)
        # what autograd keeps outside the recomputed layers (as measured: 0.76, 0.70 and 0.47
        # of it for the tiny model)
        assert ckpt_kept < share * kept, switches


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
    merge = MaskWiseOptions(thing_score_threshold=0.0)
    model = tiny_model(inference=tiny_inference(result_types=["panoptic_seg"], merge=merge))
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
    model.set_inference(replace(model.inference, result_types=["panoptic_seg", "sem_seg"]))
    assert model.inference.result_types == ("panoptic_seg", "sem_seg")
    both = model.postprocess(out, (64, 96), sizes)
    for alone, with_sem in zip(results, both):
        assert torch.equal(alone["panoptic_seg"][0], with_sem["panoptic_seg"][0])
        assert alone["panoptic_seg"][1] == with_sem["panoptic_seg"][1]
    with pytest.raises(ValueError, match="result_types must be a non-empty subset"):
        InferenceOptions(result_types=["panoptic"])
    with pytest.raises(ValueError, match="result_types must be a non-empty subset"):
        InferenceOptions(result_types=[])
    with pytest.raises(ValueError, match="max_detections must be positive, got 0"):
        InferenceOptions(max_detections=0)
    with pytest.raises(ValueError, match="mask_decoder_layers must be positive or None"):
        InferenceOptions(mask_decoder_layers=0)


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
    from panoptic_segformer.modeling.backbone import build_backbone_by_name
    from panoptic_segformer.modeling.complexity import count_parameters

    if backbone.startswith(("swin", "pvt")):
        require("timm", "timm is needed for the Swin-L and PVTv2-B5 backbones")
    with torch.device("meta"):
        net = build_backbone_by_name(backbone)
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


def test_thing_classes_from_the_mask_decoder():
    # Sec. 3.3.3: the mask decoder's last class head classifies the location decoder's k best
    # queries (by their highest class score); the location decoder's scores are not used
    torch.manual_seed(0)
    criterion = PanopticSegFormerCriterion(K, Z, thing_class_weight=2.0)
    inference = tiny_inference(thing_classes_from="mask_decoder")
    model = tiny_model(inference=inference, criterion=criterion).eval()
    images, padding, targets = synthetic_batch()
    captured = {}
    model.location_decoder.register_forward_hook(lambda m, a, out: captured.update(out))
    with torch.no_grad():
        out = model(images, padding)
        # independent: rerun the thing stack on the 6 queries of the highest location score
        best = captured["pred_logits"][-1].max(dim=-1).values.argsort(dim=1, descending=True)
        candidates = best[:, :6]
        queries = torch.stack([captured["queries"][i, c] for i, c in enumerate(candidates)])
    seen = {}
    model.mask_decoder.things.register_forward_hook(lambda m, a, out: seen.update(args=a))
    with torch.no_grad():
        model(images, padding)
        things = model.mask_decoder.forward_things(queries, *seen["args"][1:3], seen["args"][4])
    scores = things["logits"][-1].sigmoid()  # (2, 6, K)
    top, index = scores.flatten(1).topk(6, dim=1)
    torch.testing.assert_close(out["thing_scores"], top)
    assert torch.equal(out["thing_labels"], index % K)
    rows = index // K
    expected_masks = torch.stack([things["masks"][-1][i, r] for i, r in enumerate(rows)])
    torch.testing.assert_close(out["thing_masks"], expected_masks)
    expected_boxes = torch.stack(
        [captured["pred_boxes"][-1][i, candidates[i, r]] for i, r in enumerate(rows)]
    )
    torch.testing.assert_close(out["thing_boxes"], expected_boxes)
    # the location decoder would have scored otherwise
    location_top = captured["pred_logits"][-1].sigmoid().flatten(1).topk(6, dim=1).values
    assert not torch.allclose(out["thing_scores"], location_top)
    with pytest.raises(ValueError, match="criterion's thing_class_weight is 0.0; make it positive"):
        tiny_model(inference=inference)
    with pytest.raises(ValueError, match="criterion's thing_class_weight is 0.0"):
        tiny_model().set_inference(inference)
    with pytest.raises(ValueError, match="thing_classes_from must be one of .* got 'encoder'"):
        InferenceOptions(thing_classes_from="encoder")


def test_location_decoder_of_zero_layers_trains_and_predicts():
    # Table 6's "0": the learned queries go to the mask decoder, which classifies them and is
    # matched one to one on its own classes and masks
    torch.manual_seed(0)
    criterion = PanopticSegFormerCriterion(K, Z, thing_class_weight=2.0)
    model = tiny_model(
        num_decoder_layers=0,
        inference=tiny_inference(thing_classes_from="mask_decoder"),
        criterion=criterion,
        dropout=0.0,
    )
    images, padding, targets = synthetic_batch()
    calls = []
    real_matcher = criterion.mask_matcher.forward
    criterion.mask_matcher.forward = lambda *a: calls.append(a) or real_matcher(*a)
    losses = model(images, padding, targets)
    assert not [
        n for n in losses if "bbox" in n or "giou" in n or n.startswith(("d0.", "loss_cls"))
    ]
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["t0.loss_cls_things"].detach()) > 0
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # every query went to the matcher, classified by the thing stack's last head, no boxes
    logits, boxes, masks = calls[0][:3]
    assert boxes is None and [len(x) for x in logits] == [12, 12] == [len(m) for m in masks]
    model.eval()
    with torch.no_grad():
        out = model(images, padding)
    assert "thing_boxes" not in out and out["thing_masks"].shape == (2, 6, 8, 12)
    assert model.postprocess(out, (64, 96), [(64, 96), (48, 80)])[0]["panoptic_seg"][0].shape == (
        64,
        96,
    )
    with pytest.raises(ValueError, match="0 layers predicts no classes"):
        tiny_model(num_decoder_layers=0)


def test_without_deep_supervision_only_the_last_mask_layer_is_supervised():
    torch.manual_seed(0)
    images, padding, targets = synthetic_batch()
    model = tiny_model(num_thing_mask_layers=2, num_stuff_mask_layers=2, dropout=0.0)
    deep = model(images, padding, targets)
    model.criterion.deep_supervision = False
    shallow = model(images, padding, targets)
    assert set(deep) == set(shallow)
    earlier = [n for n in deep if n.startswith(("t0.", "s0."))]
    last = ["loss_mask_things", "loss_mask_stuff", "s1.loss_cls_stuff", "t1.loss_cls_things"]
    assert len(earlier) == 4
    for name in earlier:
        assert float(shallow[name].detach()) == 0.0
        assert name.endswith("cls_things") or float(deep[name].detach()) > 0
    for name in last + [n for n in deep if n.startswith(("d0.", "loss_"))]:
        torch.testing.assert_close(shallow[name], deep[name])
    # the layers' mask heads learn only with deep supervision, the tails' alike in both;
    # every parameter still has a gradient (maybe zero)
    grads = {}
    for name, losses in (("deep", deep), ("shallow", shallow)):
        model.zero_grad()
        sum(losses.values()).backward(retain_graph=True)
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if ".to_mask." in n}
    layer_heads = [n for n in grads["deep"] if ".layers." in n]
    assert len(layer_heads) == 2 * 2 * 8  # 2 stacks x 2 layers x (3 level maps + fuse) x 2
    assert all(not grads["shallow"][n].any() for n in layer_heads)
    assert sum(bool(grads["deep"][n].any()) for n in layer_heads) >= 8
    for n in grads["deep"]:
        if ".tail." in n:
            torch.testing.assert_close(grads["shallow"][n], grads["deep"][n])


def test_joint_matching_one_query_set_for_things_and_stuff():
    # Table 8's "joint matching": the thing queries classify into K + Z classes and there are
    # no stuff queries; stuff segments are matched and predicted as things are
    torch.manual_seed(0)
    model = tiny_model(
        joint_matching=True,
        num_queries=12 + Z,
        inference=tiny_inference(result_types=["panoptic_seg", "instances"]),
    )
    assert model.location_decoder.class_heads[0].out_features == K + Z
    assert model.mask_decoder.stuff_query.num_embeddings == 0
    images, padding, targets = synthetic_batch()
    labels = torch.tensor([0, 2, K + 1])
    masks = torch.stack(
        [targets[0]["thing_masks"][0], targets[0]["thing_masks"][1], targets[0]["stuff_masks"][0]]
    )
    joint_targets = model.split_targets(labels, masks, (64, 96))
    assert joint_targets["thing_labels"].tolist() == [0, 2, K + 1]
    assert len(joint_targets["stuff_labels"]) == 0 and joint_targets["thing_boxes"].shape == (3, 4)
    second = model.split_targets(torch.tensor([0]), targets[1]["thing_masks"], (48, 80))
    losses = model(images, padding, [joint_targets, second])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # a stuff class predicted by a thing query is a stuff segment, and not an instance
    model.eval()
    with torch.no_grad():
        model.location_decoder.class_heads[-1].bias[K + 1] = 10.0
        out = model(images, padding)
    assert out["stuff_masks"].shape == (2, 0, 8, 12)
    assert (out["thing_labels"] == K + 1).any()
    out["thing_masks"] = out["thing_masks"] + 1
    result = model.postprocess(out, (64, 96), [(64, 96), (48, 80)])[0]
    segments = result["panoptic_seg"][1]
    assert [(s["category_id"], s["isthing"]) for s in segments if s["category_id"] == K + 1] == [
        (K + 1, False)
    ]
    assert (result["instances"].classes < K).all()
    with pytest.raises(
        ValueError, match="must classify into 5 classes and the mask decoder hold 0"
    ):
        PanopticSegFormerCore(
            **{k: getattr(model, k) for k in ("backbone", "neck", "position_encoding", "encoder")},
            location_decoder=tiny_model().location_decoder,
            mask_decoder=model.mask_decoder,
            criterion=None,
            num_thing_classes=K,
            num_stuff_classes=Z,
            joint_matching=True,
        )


@pytest.mark.parametrize("exit_after", [None, 1])
def test_inference_computes_only_the_masks_it_reads(exit_after, monkeypatch):
    # the layers' masks feed deep supervision only: at inference only the last mask of each
    # stack (the tail's, or the last layer's on an early exit) is computed, the other layers
    # attend through fused attention, and the outputs equal those of computing every mask
    # within float rounding
    torch.manual_seed(0)
    model = tiny_model(num_thing_mask_layers=2, num_stuff_mask_layers=3).eval()
    model.set_inference(replace(model.inference, mask_decoder_layers=exit_after))
    images, padding, _ = synthetic_batch()
    calls = []
    for module in model.mask_decoder.modules():
        if type(module).__name__ == "AttentionToMask":
            module.register_forward_hook(lambda m, a, out: calls.append(m))
    with torch.no_grad():
        fast = model(images, padding)
    assert len(calls) == 2  # one mask per stack
    decoder = model.mask_decoder
    for name in ("forward_things", "forward_stuff"):
        original = getattr(decoder, name)

        def computing_all(*args, _original=original, **kwargs):
            kwargs["last_mask_only"] = False
            return _original(*args, **kwargs)

        monkeypatch.setattr(decoder, name, computing_all)
    calls.clear()
    with torch.no_grad():
        slow = model(images, padding)
    assert len(calls) == (2 if exit_after else 2 + 3 + 2)  # layers and tails of both stacks
    assert fast.keys() == slow.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=1e-5, msg=key)
