"""criterion: every loss of a small batch against values worked out by hand, the matching
pipeline, the thing / stuff balance, and batches with no things, no stuff or nothing."""

import math

import pytest
import torch

from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion
from panoptic_segformer.modeling.matcher import hungarian_match
from panoptic_segformer.modeling.matching_costs import dice_cost
from panoptic_segformer.modeling.targets import split_targets

ALPHA, GAMMA = 0.25, 2.0


def focal(logit: float, target: float) -> float:
    """The sigmoid focal loss of one logit, straight from its definition."""
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -ALPHA * (1 - p) ** GAMMA * math.log(p)
    return -(1 - ALPHA) * p**GAMMA * math.log(1 - p)


def uniform_dice(value: float, target_area: int, pixels: int, eps: float = 1e-6) -> float:
    """Dice loss of a mask that is ``value`` everywhere against a binary target."""
    return 1 - 2 * value * target_area / (value * value * pixels + eps + target_area + eps)


# One image, padded input 16 x 16, stride-8 masks 2 x 2 (losses at 4 x 4); K = 2 thing classes,
# Z = 2 stuff classes. One thing (class 1) in the top-left 8 x 8 pixels; stuff class 0 (of 2)
# is the bottom half, stuff class 1 is absent.
THING_BOX = [0.25, 0.25, 0.5, 0.5]  # cxcywh of the top-left quarter


def make_targets():
    thing = torch.zeros(1, 16, 16, dtype=torch.bool)
    thing[0, :8, :8] = True
    stuff = torch.zeros(1, 16, 16, dtype=torch.bool)
    stuff[0, 8:] = True
    return [
        {
            "thing_labels": torch.tensor([1]),
            "thing_boxes": torch.tensor([THING_BOX]),
            "thing_masks": thing,
            "stuff_labels": torch.tensor([0]),
            "stuff_masks": stuff,
        }
    ]


def make_outputs(criterion, targets, box_dim=4):
    # D = 2 location layers, Q = 3 queries. Query 0 is the obvious match on both layers.
    logits = torch.tensor(
        [[[-3.0, 2.0], [-1.0, -2.0], [0.5, -4.0]], [[-3.0, 3.0], [-1.0, -2.0], [0.5, -4.0]]],
        dtype=torch.float64,
    )[:, None]
    far = [0.8, 0.8, 0.2, 0.2]
    boxes = torch.tensor(
        [
            [[0.25, 0.25, 0.25, 0.5], far, far],  # layer 0: query 0 half as wide
            [THING_BOX, far, [0.75, 0.25, 0.2, 0.2]],  # layer 1: query 0 exact
        ],
        dtype=torch.float64,
    )[:, None, :, :box_dim]
    selection = criterion.select_thing_queries(logits[-1], boxes[-1], targets)
    # Thing mask decoder on the 3 selected queries: one layer and a tail; masks are uniform,
    # row r holds value 0.9 for the first selected query and 0.1 for the others.
    query_order = selection[0][0].tolist()
    values = [0.9 if q == 0 else 0.1 for q in query_order]
    thing_mask = torch.tensor(values, dtype=torch.float64)[None, :, None, None].expand(-1, -1, 2, 2)
    thing_logits = torch.zeros(1, len(values), 2, dtype=torch.float64)
    # Stuff: two layers and a tail; presence logits per layer
    stuff_masks = [
        torch.tensor([v, 0.3], dtype=torch.float64)[None, :, None, None].expand(1, 2, 2, 2)
        for v in (0.2, 0.6, 1.0)
    ]
    stuff_logits = [torch.tensor([[0.5, -1.0]], dtype=torch.float64)] * 2
    return {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "selection": selection,
        "thing_masks": [thing_mask * 0.5, thing_mask],
        "thing_logits": [thing_logits],
        "stuff_masks": stuff_masks,
        "stuff_logits": stuff_logits,
    }


@pytest.mark.parametrize("max_per_target,selected", [(None, [0]), (3, [0, 1, 2])])
def test_every_loss_matches_a_hand_computation(max_per_target, selected):
    rounds = {} if max_per_target is None else {"max_per_target": max_per_target}
    criterion = PanopticSegFormerCriterion(num_thing_classes=2, num_stuff_classes=2, **rounds)
    targets = make_targets()
    outputs = make_outputs(criterion, targets)
    # By default the filter passes the one-to-one match only (the authors' released code);
    # with 3 rounds, all three queries for the one thing, the match first.
    assert outputs["selection"][0][0].tolist()[0] == 0
    assert sorted(outputs["selection"][0][0].tolist()) == selected
    losses = criterion(outputs, targets)

    lam = 0.5  # one thing and one stuff segment: lambda_things = lambda_stuff = 1 / 2
    expected = {}
    for d, prefix in [(0, "d0."), (1, "")]:
        logits = outputs["pred_logits"][d, 0]
        cls = sum(focal(float(logits[q, k]), q == 0 and k == 1) for q in range(3) for k in range(2))
        expected[prefix + "loss_cls"] = lam * 2 * cls
    # layer 0: |0.25 - 0.5| in w; GIoU of nested boxes = IoU = 0.125 / 0.25
    expected["d0.loss_bbox"] = lam * 5 * 0.25
    expected["d0.loss_giou"] = lam * 2 * (1 - 0.5)
    expected["loss_bbox"] = 0.0
    expected["loss_giou"] = 0.0
    # thing masks at 4 x 4: the target covers 4 of 16 pixels; the matched query is 0.9 (tail)
    expected["t0.loss_mask_things"] = lam * 2 * uniform_dice(0.45, 4, 16)
    expected["loss_mask_things"] = lam * 2 * uniform_dice(0.9, 4, 16)
    expected["t0.loss_cls_things"] = 0.0  # weighted 0, as the authors' code
    # stuff: only class 0 is present (8 of 16 pixels); class 1 has no mask target
    expected["s0.loss_mask_stuff"] = lam * 2 * uniform_dice(0.2, 8, 16)
    expected["s1.loss_mask_stuff"] = lam * 2 * uniform_dice(0.6, 8, 16)
    expected["loss_mask_stuff"] = lam * 2 * uniform_dice(1.0, 8, 16)
    stuff_cls = focal(0.5, 1) + focal(-1.0, 0)
    expected["s0.loss_cls_stuff"] = expected["s1.loss_cls_stuff"] = lam * 2 * 2 * stuff_cls

    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert float(losses[name]) == pytest.approx(value, abs=1e-9), name


def test_fixed_lambdas_and_thing_class_weight():
    targets = make_targets()
    base = PanopticSegFormerCriterion(2, 2)
    outputs = make_outputs(base, targets)
    dynamic = base(outputs, targets)
    fixed = PanopticSegFormerCriterion(2, 2, lambda_things=1.0, lambda_stuff=3.0)(outputs, targets)
    assert float(fixed["loss_cls"]) == pytest.approx(2 * float(dynamic["loss_cls"]))
    assert float(fixed["loss_mask_stuff"]) == pytest.approx(6 * float(dynamic["loss_mask_stuff"]))
    with pytest.raises(ValueError, match="lambda_things=1.0, lambda_stuff=None"):
        PanopticSegFormerCriterion(2, 2, lambda_things=1.0)
    with pytest.raises(ValueError, match="lambda_stuff must be >= 0, got -0.5"):
        PanopticSegFormerCriterion(2, 2, lambda_things=1.0, lambda_stuff=-0.5)
    # with a class weight the thing mask decoder's class loss counts: logits 0 everywhere,
    # the matched row positive for class 1, normalised by one thing
    for rounds in (1, 3):
        weighted = PanopticSegFormerCriterion(2, 2, thing_class_weight=2.0, max_per_target=rounds)
        selected = make_outputs(weighted, targets)
        cls = focal(0.0, 1) + (2 * rounds - 1) * focal(0.0, 0)
        loss = weighted(selected, targets)["t0.loss_cls_things"]
        assert float(loss) == pytest.approx(0.5 * 2 * cls)


def test_absent_stuff_masks_have_weight_zero():
    criterion = PanopticSegFormerCriterion(2, 2)
    targets = make_targets()
    outputs = make_outputs(criterion, targets)
    before = criterion(outputs, targets)
    # change the mask of absent stuff class 1 in every layer: no mask loss changes
    outputs["stuff_masks"] = [m.clone() for m in outputs["stuff_masks"]]
    for m in outputs["stuff_masks"]:
        m[:, 1] = 0.77
    after = criterion(outputs, targets)
    for name in before:
        assert float(after[name]) == pytest.approx(float(before[name])), name


def test_things_and_stuff_balance_by_counts():
    criterion = PanopticSegFormerCriterion(2, 2)
    targets = make_targets()
    outputs = make_outputs(criterion, targets)
    one_stuff = criterion(outputs, targets)
    # remove the stuff segment: num_stuff is clamped to 1, so lambda_things stays 1 / 2
    targets[0]["stuff_labels"] = targets[0]["stuff_labels"][:0]
    targets[0]["stuff_masks"] = targets[0]["stuff_masks"][:0]
    no_stuff = criterion(outputs, targets)
    assert float(no_stuff["loss_cls"]) == pytest.approx(float(one_stuff["loss_cls"]))
    assert float(no_stuff["loss_mask_stuff"]) == 0.0
    # both stuff logits are now negatives
    expected = 0.5 * 4 * (focal(0.5, 0) + focal(-1.0, 0))
    assert float(no_stuff["s0.loss_cls_stuff"]) == pytest.approx(expected)


@pytest.mark.parametrize("keep_things,keep_stuff", [(False, True), (True, False), (False, False)])
def test_empty_images_give_finite_losses_and_gradients(keep_things, keep_stuff):
    criterion = PanopticSegFormerCriterion(2, 2)
    targets = make_targets()
    if not keep_things:
        for key in ("thing_labels", "thing_boxes", "thing_masks"):
            targets[0][key] = targets[0][key][:0]
    if not keep_stuff:
        for key in ("stuff_labels", "stuff_masks"):
            targets[0][key] = targets[0][key][:0]
    outputs = make_outputs(criterion, targets)
    if not keep_things:  # the thing mask decoder then runs on zero queries
        assert outputs["thing_masks"][0].shape == (1, 0, 2, 2)
    leaves = []
    for key in ("pred_logits", "pred_boxes"):
        outputs[key] = outputs[key].clone().requires_grad_()
        leaves.append(outputs[key])
    for key in ("thing_masks", "stuff_masks", "stuff_logits"):
        outputs[key] = [m.clone().requires_grad_() for m in outputs[key]]
        leaves += outputs[key]
    losses = criterion(outputs, targets)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values())
    total.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # negatives still teach the classifier
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_split_targets_boxes_centres_and_errors():
    masks = torch.zeros(3, 8, 12, dtype=torch.bool)
    masks[0, 0:2, 0:4] = True  # thing, class 1
    masks[1, 4:6, 6:10] = True  # stuff 0 (id 3)
    masks[2, 2:4, 2:3] = True  # thing, class 0
    labels = torch.tensor([1, 3, 0])
    # the valid image is 4 x 8 of the padded 8 x 12
    out = split_targets(labels, masks, (4, 8), num_thing_classes=3, num_stuff_classes=2)
    assert out["thing_labels"].tolist() == [1, 0]
    assert out["stuff_labels"].tolist() == [0]
    torch.testing.assert_close(
        out["thing_boxes"],
        torch.tensor([[2 / 8, 1 / 4, 4 / 8, 2 / 4], [2.5 / 8, 3 / 4, 1 / 8, 2 / 4]]),
    )
    assert out["thing_masks"].shape == (2, 8, 12) and out["stuff_masks"].shape == (1, 8, 12)
    centres = split_targets(labels, masks, (4, 8), 3, 2, box_free=True)["thing_boxes"]
    torch.testing.assert_close(centres, torch.tensor([[2 / 8, 1 / 4], [2.5 / 8, 3 / 4]]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got values in \[0, 7\]"):
        split_targets(torch.tensor([7, 0, 1]), masks, (4, 8), 3, 2)
    with pytest.raises(ValueError, match=r"image_size \(9, 8\) does not fit"):
        split_targets(labels, masks, (9, 8), 3, 2)


def test_box_free_criterion_has_no_giou():
    criterion = PanopticSegFormerCriterion(2, 2)
    targets = make_targets()
    targets[0]["thing_boxes"] = targets[0]["thing_boxes"][:, :2]
    outputs = make_outputs(criterion, targets, box_dim=2)
    losses = criterion(outputs, targets)
    assert "loss_giou" not in losses and "d0.loss_giou" not in losses
    assert float(losses["loss_bbox"]) == 0.0  # query 0's centre is exact


def test_counts_are_averaged_over_processes(tmp_path):
    # a one-process gloo group runs the distributed path: the same losses as without it
    import torch.distributed as dist

    criterion = PanopticSegFormerCriterion(2, 2)
    targets = make_targets()
    outputs = make_outputs(criterion, targets)
    expected = criterion(outputs, targets)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        got = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in expected.items()}


def _average_in_process(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from panoptic_segformer.modeling.criterion import _mean_over_processes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # rank 0 sees 4 things and 1 stuff segment, rank 1 none and 3
        counts = _mean_over_processes([4.0, 1.0] if rank == 0 else [0.0, 3.0], torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    torch.save(counts, f"{out}.{rank}")


def test_counts_average_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    store, out = str(tmp_path / "store"), str(tmp_path / "counts")
    mp.spawn(_average_in_process, args=(store, out), nprocs=2)
    assert torch.load(f"{out}.0") == torch.load(f"{out}.1") == [2.0, 2.0]


def test_filter_passes_the_one_to_one_match_as_released_and_more_rounds_on_request():
    # The authors' released HungarianAssigner_filter stops after one round: the 40 things among
    # 300 queries reach the mask decoder with exactly the location decoder's one-to-one match.
    # Its configured intent (max_pos = 3, at most 300 // num_gts rounds) is the switch: 3 each.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, 5, generator=g)
    boxes = torch.rand(1, 300, 4, generator=g) * 0.5 + 0.25
    target = {
        "thing_labels": torch.randint(0, 5, (40,), generator=g),
        "thing_boxes": torch.rand(40, 4, generator=g) * 0.5 + 0.25,
    }
    criterion = PanopticSegFormerCriterion(5, 2)
    ((query_idx, target_idx),) = criterion.select_thing_queries(logits, boxes, [target])
    cost = criterion.matcher.cost_matrix(
        logits[0], boxes[0], target["thing_labels"], target["thing_boxes"]
    )
    one_to_one = hungarian_match(cost)
    assert torch.equal(query_idx, one_to_one[0]) and torch.equal(target_idx, one_to_one[1])

    three = PanopticSegFormerCriterion(5, 2, max_per_target=3)
    ((query_idx, target_idx),) = three.select_thing_queries(logits, boxes, [target])
    assert len(query_idx) == 120 and len(set(query_idx.tolist())) == 120
    assert torch.bincount(target_idx).tolist() == [3] * 40
    assert torch.equal(query_idx[:40], one_to_one[0])


def test_mask_matching_takes_the_dice_cost_at_stride_8_with_bilinearly_resized_targets():
    # The authors' DiceCost: the thing mask decoder's last masks at their own 2 x 2 (stride 8),
    # the 16 x 16 target resized bilinearly to 2 x 2; the Dice loss stays at 4 x 4.
    targets = make_targets()
    targets[0]["thing_masks"] = torch.zeros(1, 16, 16, dtype=torch.bool)
    targets[0]["thing_masks"][0, :4, :12] = True
    criterion = PanopticSegFormerCriterion(2, 2, max_per_target=3)
    outputs = make_outputs(criterion, targets)
    rows = len(outputs["selection"][0][0])
    last = torch.tensor([[0.9, 0.2], [0.4, 0.0]], dtype=torch.float64)
    outputs["thing_masks"][-1] = (
        last.expand(1, rows, 2, 2) * torch.arange(1, rows + 1)[None, :, None, None].double()
    )
    seen = {}
    matcher = criterion.mask_matcher.forward

    def spy(logits, boxes, masks, labels, gt_boxes, gt_masks):
        seen.update(masks=masks[0], targets=gt_masks[0])
        return matcher(logits, boxes, masks, labels, gt_boxes, gt_masks)

    criterion.mask_matcher.forward = spy
    criterion(outputs, targets)
    # bilinear, half-pixel centres: output pixel (0, 0) reads rows 3 and 4 (1, 0) and columns 3
    # and 4 (1, 1) -> 0.5; (0, 1) reads columns 11 and 12 (1, 0) -> 0.25; row 1 reads rows 11, 12
    resized = torch.tensor([[[0.5, 0.25], [0.0, 0.0]]])
    torch.testing.assert_close(seen["targets"].float(), resized)
    assert torch.equal(seen["masks"], outputs["thing_masks"][-1][0])
    # the Dice cost of query r (mask r * last) written out, eps 1e-3 on each sum of squares
    for r in range(rows):
        p = (r + 1) * last
        t = resized[0].double()
        dice = 1 - 2 * (p * t).sum() / ((p * p).sum() + 1e-3 + (t * t).sum() + 1e-3)
        got = dice_cost(seen["masks"][r : r + 1], seen["targets"])
        assert float(got) == pytest.approx(float(dice), abs=1e-6)
