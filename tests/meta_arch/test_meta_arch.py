"""The meta-architecture: detectron2's input and output formats, class ids, errors."""

import pytest
from skips import require, require_detectron2

require_detectron2()
require("cv2", "detectron2's Visualizer needs OpenCV")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from d2_helpers import CONFIGS, INSTANCES, PERMISSIVE, TINY, make_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from panoptic_segformer.d2.build import class_id_maps  # noqa: E402
from panoptic_segformer.modeling import PixelArgmaxOptions  # noqa: E402

BASE = CONFIGS[0].parent / "r50.yaml"


@pytest.fixture(scope="module")
def interleaved_dataset():
    # a dataset whose contiguous ids interleave things (1, 3, 4) and stuff (0, 2), as ADE20K's
    name = "psf_test_interleaved"
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(
            thing_dataset_id_to_contiguous_id={11: 1, 13: 3, 14: 4},
            stuff_dataset_id_to_contiguous_id={10: 0, 12: 2},
            thing_classes=["s0", "t1", "s2", "t3", "t4"],
            stuff_classes=["s0", "t1", "s2", "t3", "t4"],
        )
    return name


def tiny_model(*opts):
    torch.manual_seed(0)
    cfg = make_cfg(BASE, *TINY, *opts)
    return build_model(cfg), cfg


def image(h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_inference_outputs_detectron2_formats():
    model, _ = tiny_model(
        *PERMISSIVE, *INSTANCES, "MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON", "True"
    )
    model.eval()
    inputs = [{"image": image(), "height": 128, "width": 192}, {"image": image(48, 80, 1)}]
    with torch.no_grad():
        outputs = model(inputs)
    for out, size in zip(outputs, [(128, 192), (48, 80)]):
        seg, segments = out["panoptic_seg"]
        assert seg.shape == size and seg.dtype == torch.int32
        assert segments and set(torch.unique(seg).tolist()) - {0} == {s["id"] for s in segments}
        for info in segments:
            assert set(info) == {"id", "category_id", "isthing", "score"}
            assert info["isthing"] == (info["category_id"] < 80)
        instances = out["instances"]
        assert instances.image_size == size and len(instances) == 100
        assert (
            instances.pred_masks.shape == (100, *size) and instances.pred_masks.dtype == torch.bool
        )
        assert isinstance(instances.pred_boxes, Boxes)
        assert int(instances.pred_classes.max()) < 80
        assert torch.all(instances.scores[:-1] >= instances.scores[1:])
        assert out["sem_seg"].shape == (133, *size)
    # detectron2's Visualizer draws all three
    metadata = MetadataCatalog.get("coco_2017_val_panoptic")
    rgb = np.zeros((128, 192, 3), dtype=np.uint8)
    Visualizer(rgb, metadata).draw_panoptic_seg(*outputs[0]["panoptic_seg"])
    Visualizer(rgb, metadata).draw_instance_predictions(outputs[0]["instances"])
    Visualizer(rgb, metadata).draw_sem_seg(outputs[0]["sem_seg"].argmax(0))


def test_an_image_in_a_batch_of_other_sizes_gets_the_result_it_gets_alone():
    # Size divisibility 1 (the authors'): a single image is never padded. Images of different
    # sizes are run one at a time: padding, though masked in every attention, would reach the
    # backbone's convolutions and the neck's GroupNorm near the image border.
    model, cfg = tiny_model(*PERMISSIVE, *INSTANCES)
    assert cfg.INPUT.SIZE_DIVISIBILITY == 1 and model.size_divisibility == 1
    model.eval()
    inputs = [{"image": image(61, 83)}, {"image": image(77, 99, 1)}, {"image": image(61, 83, 2)}]
    with torch.no_grad():
        together = model(inputs)
        alone = [model([x])[0] for x in inputs]
        # the same-size images run as one batch of two, unpadded: equal within float rounding
        pair = model([inputs[0], inputs[2]])
    for a, b in zip(together, alone):
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
    assert together[0]["panoptic_seg"][0].shape == (61, 83)
    for a, b in zip(pair, [alone[0], alone[2]]):
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        scores = [[s["score"] for s in r["panoptic_seg"][1]] for r in (a, b)]
        assert scores[0] == pytest.approx(scores[1], rel=1e-5)
    # what the network would compute for the smaller image inside a padded batch differs
    images, padding_mask = model.preprocess_images([x["image"] for x in inputs[:2]])
    assert images.tensor.shape[-2:] == (77, 99) and int((~padding_mask[0]).sum()) == 61 * 83
    single_images, single_mask = model.preprocess_images([inputs[0]["image"]])
    with torch.no_grad():
        padded = model.network(images.tensor, padding_mask)["thing_scores"][0]
        single = model.network(single_images.tensor, single_mask)["thing_scores"][0]
    assert not torch.allclose(padded, single)


def test_class_ids_are_converted_both_ways(interleaved_dataset):
    opts = [
        "DATASETS.TRAIN", f"('{interleaved_dataset}',)",
        "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "3",
        "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "2",
        "MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON", "True",
        *INSTANCES,
    ]  # fmt: skip
    model, _ = tiny_model(*PERMISSIVE, *opts)
    assert model.model_to_dataset.tolist() == [1, 3, 4, 0, 2]
    # training targets: dataset ids -> model ids (things first)
    instances = Instances((64, 96))
    masks = torch.zeros(3, 64, 96, dtype=torch.bool)
    masks[0, :10], masks[1, 10:30], masks[2, 30:] = True, True, True
    instances.gt_masks = BitMasks(masks)
    instances.gt_classes = torch.tensor([3, 2, 0])
    targets = model._targets({"image": image(), "instances": instances}, (64, 96))
    assert targets["thing_labels"].tolist() == [1]  # dataset 3 is the model's second thing
    assert targets["stuff_labels"].tolist() == [1, 0]  # dataset 2 and 0 are stuff 1 and 0
    # inference: model ids -> dataset ids
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image()}])
    segments = out["panoptic_seg"][1]
    assert {info["isthing"] for info in segments} == {True, False}  # both maps are checked
    for info in segments:
        assert info["category_id"] in ((1, 3, 4) if info["isthing"] else (0, 2))
    assert set(out["instances"].pred_classes.tolist()) <= {1, 3, 4}
    assert out["sem_seg"].shape == (5, 64, 96)


def test_training_returns_losses_that_reach_the_model():
    model, _ = tiny_model()
    model.train()
    instances = Instances((64, 96))
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 5:30, 10:40], masks[1, 40:] = True, True
    instances.gt_masks = BitMasks(masks)
    instances.gt_classes = torch.tensor([7, 90])
    empty = Instances((48, 80))
    empty.gt_masks = BitMasks(torch.zeros(0, 48, 80, dtype=torch.bool))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    losses = model(
        [{"image": image(), "instances": instances}, {"image": image(48, 80), "instances": empty}]
    )
    assert {"loss_cls", "loss_bbox", "loss_giou", "loss_mask_things", "loss_mask_stuff"} <= set(
        losses
    )
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.res5[0].conv1.weight.grad.abs().sum() > 0
    # every trainable parameter is in the graph: DDP needs no search for unused parameters
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_bad_configurations_and_inputs_raise(interleaved_dataset):
    with pytest.raises(
        ValueError, match=r"IN_FEATURES \['res3', 'res4', 'res6'\] names \['res6'\]"
    ):
        tiny_model("MODEL.PANOPTIC_SEGFORMER.IN_FEATURES", "['res3', 'res4', 'res6']")
    with pytest.raises(ValueError, match="has 3 thing and 2 stuff categories but the model has"):
        tiny_model("DATASETS.TRAIN", f"('{interleaved_dataset}',)")
    model, _ = tiny_model()
    model.train()
    instances = Instances((64, 96))
    instances.gt_masks = BitMasks(torch.ones(1, 64, 96, dtype=torch.bool))
    instances.gt_classes = torch.tensor([133])
    with pytest.raises(ValueError, match=r"gt_classes \[133\] of x.jpg are not categories"):
        model([{"image": image(), "instances": instances, "file_name": "x.jpg"}])
    with pytest.raises(ValueError, match="training needs 'instances'"):
        model([{"image": image()}])


def test_datasets_without_stuff_work_without_things_are_refused():
    no_dataset = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]  # class ids: things first
    model, _ = tiny_model(
        *PERMISSIVE, *no_dataset, "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "0"
    )
    instances = Instances((64, 96))
    masks = torch.zeros(1, 64, 96, dtype=torch.bool)
    masks[0, 10:40, 20:50] = True
    instances.gt_masks, instances.gt_classes = BitMasks(masks), torch.tensor([5])
    losses = model([{"image": image(), "instances": instances}])
    assert torch.isfinite(sum(losses.values()))
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image()}])
    segments = out["panoptic_seg"][1]
    assert segments and all(info["isthing"] for info in segments)
    with pytest.raises(ValueError, match="NUM_THING_CLASSES must be >= 1 .* got 0 and 53"):
        tiny_model("MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "0")


def test_loss_weights_lambda_are_both_fixed_or_both_per_batch():
    from panoptic_segformer.d2.build import build_criterion

    def criterion(things, stuff):
        cfg = make_cfg(BASE)
        cfg.MODEL.PANOPTIC_SEGFORMER.LAMBDA_THINGS = float(things)
        cfg.MODEL.PANOPTIC_SEGFORMER.LAMBDA_STUFF = float(stuff)
        return build_criterion(cfg)

    per_batch = criterion("-1", "-1")
    assert per_batch.lambda_things is None and per_batch.lambda_stuff is None
    assert per_batch.max_selected == 300  # the released filter's bound (300 // things rounds)
    fixed = criterion("0.25", "0")
    assert (fixed.lambda_things, fixed.lambda_stuff) == (0.25, 0.0)
    # one alone would train with the other at -1 (a negative loss weight)
    with pytest.raises(ValueError, match="LAMBDA_THINGS is 0.5 but LAMBDA_STUFF is -1 .per batch"):
        criterion("0.5", "-1")
    with pytest.raises(ValueError, match="LAMBDA_STUFF is 2.0 but LAMBDA_THINGS is -1 .per batch"):
        criterion("-1", "2")
    with pytest.raises(
        ValueError, match=r"LAMBDA_STUFF must be >= 0 .* or -1 .per batch., got -3.0"
    ):
        criterion("1", "-3")


def test_class_id_maps_without_metadata_is_things_first():
    assert class_id_maps(None, 2, 3) == ([0, 1], [2, 3, 4])


def test_paper_switches_build_what_they_name():
    ps = "MODEL.PANOPTIC_SEGFORMER."
    mask_classes = [
        ps + "TEST.THING_CLASSES_FROM",
        "mask_decoder",
        ps + "THING_CLASS_WEIGHT",
        "2.0",
    ]
    # Table 6: a location decoder of 0 layers, its queries straight to the mask decoder
    model, _ = tiny_model(ps + "DEC_LAYERS", "0", *mask_classes)
    assert len(model.core.location_decoder.layers) == 0
    assert model.core.inference.thing_classes_from == "mask_decoder"
    # Table 8: joint matching, NUM_QUERIES + NUM_STUFF_CLASSES queries over all 133 classes
    model, _ = tiny_model(ps + "JOINT_MATCHING", "True")
    assert model.core.joint_matching and model.core.criterion.num_stuff_classes == 0
    assert model.core.location_decoder.query_embed.num_embeddings == 20 + 53
    assert model.core.location_decoder.class_heads[0].out_features == 133
    # its caps have room for the stuff too: MAX_DETECTIONS + 53 kept, MAX_SELECTED + 53 filtered
    assert model.core.inference.max_detections == 100 + 53
    assert model.core.criterion.max_selected == 300 + 53
    assert model.core.mask_decoder.thing_class_heads[0].out_features == 133
    # Fig. 5: without deep supervision; Table 7: MERGE pixel_argmax alone is the paper's
    # Panoptic SegFormer "(p)" row, the plain argmax; "(p*)" is the class-weighted switch
    model, _ = tiny_model(ps + "DEEP_SUPERVISION", "False", ps + "TEST.MERGE", "pixel_argmax")
    assert not model.core.criterion.deep_supervision
    assert model.core.inference.merge == PixelArgmaxOptions(class_weighted=False)
    model, _ = tiny_model(
        ps + "TEST.MERGE", "pixel_argmax", ps + "TEST.PIXEL_ARGMAX_CLASS_WEIGHTED", "True"
    )
    assert model.core.inference.merge == PixelArgmaxOptions(class_weighted=True)
    # activation checkpointing: off by default (test_config_defaults.py: as in the core's
    # builder), each part alone
    model, _ = tiny_model()

    def checkpointing(model):  # of the encoder and of the two mask decoder stacks
        decoder = model.core.mask_decoder
        return (
            model.core.encoder.checkpointing,
            decoder.things.checkpointing,
            decoder.stuff.checkpointing,
        )

    assert checkpointing(model) == (False, False, False)
    model, _ = tiny_model(ps + "ENCODER_CHECKPOINTING", "True")
    assert checkpointing(model) == (True, False, False)
    model, _ = tiny_model(ps + "MASK_DECODER_CHECKPOINTING", "True")
    assert checkpointing(model) == (False, True, True)
    # what nothing would classify or train is refused, naming the keys
    with pytest.raises(
        ValueError, match="DEC_LAYERS is 0: .*TEST.THING_CLASSES_FROM to 'mask_decoder'"
    ):
        tiny_model(ps + "DEC_LAYERS", "0")
    with pytest.raises(
        ValueError, match=r"THING_CLASSES_FROM is 'mask_decoder' but .*THING_CLASS_WEIGHT is 0.0"
    ):
        tiny_model(ps + "TEST.THING_CLASSES_FROM", "mask_decoder")
    with pytest.raises(ValueError, match="thing_classes_from must be one of .* got 'masks'"):
        tiny_model(ps + "TEST.THING_CLASSES_FROM", "masks")
    with pytest.raises(
        ValueError, match=r"TEST.MERGE must be one of \['mask_wise', 'pixel_argmax'\], got 'argmax'"
    ):
        tiny_model(ps + "TEST.MERGE", "argmax")
    with pytest.raises(ValueError, match=r"stuff_overlap_threshold must be in \[0, 1\], got 1.2"):
        tiny_model(ps + "TEST.STUFF_OVERLAP_THRESHOLD", "1.2")
