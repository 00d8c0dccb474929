"""matcher: costs against hand-computed values, Hungarian optimality against brute force,
repeated ("filter") matching, and both matcher modules end to end."""

import itertools
import math

import pytest
import torch

from panoptic_segformer.modeling.losses import dice_loss
from panoptic_segformer.modeling.matcher import (
    HungarianMatcher,
    MaskDecoderMatcher,
    hungarian_match,
    repeated_hungarian_match,
)
from panoptic_segformer.modeling.matching_costs import (
    box_cost,
    dice_cost,
    focal_class_cost,
    giou_cost,
    l1_box_cost,
    mask_decoder_matching_cost,
)


def brute_force_min_cost(cost):
    """Lowest total cost over all injective maps target -> query (itertools.permutations)."""
    num_queries, num_targets = cost.shape
    return min(
        sum(cost[q, t].item() for t, q in enumerate(queries))
        for queries in itertools.permutations(range(num_queries), num_targets)
    )


def assert_valid_one_to_one(query_idx, target_idx, num_queries, num_targets):
    assert query_idx.dtype == target_idx.dtype == torch.int64
    assert len(query_idx) == len(target_idx) == num_targets
    assert sorted(target_idx.tolist()) == list(range(num_targets))
    assert len(set(query_idx.tolist())) == num_targets
    assert all(0 <= q < num_queries for q in query_idx.tolist())


# --------------------------------------------------------------------------- costs


def test_focal_class_cost_hand_computed():
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    cost = focal_class_cost(logits, torch.tensor([0, 1, 0]), eps=0.0)
    # logit 0, p = 0.5: 0.25 * 0.5^2 * log 2 - 0.75 * 0.5^2 * log 2 = -0.125 log 2
    # logit 2, p = sigmoid(2): 0.25 (1-p)^2 (-log p) - 0.75 p^2 (-log(1-p))
    p = 1 / (1 + math.exp(-2.0))
    c2 = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    expected = torch.tensor([[-0.125 * math.log(2), c2, -0.125 * math.log(2)]], dtype=torch.float64)
    torch.testing.assert_close(cost, expected)


def test_focal_class_cost_keeps_mmdets_epsilon_for_saturated_probabilities():
    # logit 40: p = 1 in float32, so the negative term is -log(0 + eps), with mmdet's
    # FocalLossCost eps 1e-12 (the authors' matchers): cost = 0 - 0.75 * -log(1e-12)
    cost = focal_class_cost(torch.tensor([[40.0, -40.0]]), torch.tensor([0, 1]))
    expected = [[-0.75 * -math.log(1e-12), 0.25 * -math.log(1e-12)]]
    torch.testing.assert_close(cost, torch.tensor(expected), rtol=1e-6, atol=0.0)


def test_box_costs_hand_computed():
    pred = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.5, 0.1, 0.2, 0.2]])
    target = torch.tensor([[0.5, 0.1, 0.2, 0.2]])
    # L1: |0.1 - 0.5| = 0.4 for the first query, 0 for the second
    torch.testing.assert_close(l1_box_cost(pred, target), torch.tensor([[0.4], [0.0]]))
    # GIoU of disjoint [0,0,.2,.2] and [.4,0,.6,.2] is -1/3 (cost +1/3); identical: cost -1
    torch.testing.assert_close(giou_cost(pred, target), torch.tensor([[1 / 3], [-1.0]]))


def test_dice_cost_equals_pairwise_dice_loss_and_respects_activation():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 3, 5, generator=g, dtype=torch.float64) * 1.5
    target = torch.rand(2, 3, 5, generator=g) > 0.5
    cost = dice_cost(pred, target)
    assert cost.shape == (4, 2)
    for q, t in itertools.product(range(4), range(2)):
        expected = dice_loss(pred[q : q + 1], target[t : t + 1], eps=1e-3)
        torch.testing.assert_close(cost[q, t], expected[0])
    torch.testing.assert_close(
        dice_cost(pred, target, activation="sigmoid"), dice_cost(pred.sigmoid(), target)
    )
    with pytest.raises(ValueError, match=r"\(3, 5\) but target masks are \(6, 10\)"):
        dice_cost(pred, torch.zeros(2, 6, 10))


def test_mask_decoder_cost_is_weighted_sum():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=g)
    boxes = torch.rand(5, 4, generator=g) * 0.5 + 0.25
    masks = torch.rand(5, 4, 4, generator=g)
    labels = torch.tensor([2, 0])
    gt_boxes = torch.rand(2, 4, generator=g) * 0.5 + 0.25
    gt_masks = torch.rand(2, 4, 4, generator=g) > 0.5
    weights = dict(cost_class=4.0, cost_bbox=5.0, cost_giou=3.0, cost_dice=2.0)
    cost = mask_decoder_matching_cost(
        logits, boxes, masks, labels, gt_boxes, gt_masks, **weights,
        focal_alpha=0.25, focal_gamma=2.0, mask_activation="none",
    )  # fmt: skip
    expected = (
        4 * focal_class_cost(logits, labels)
        + 5 * l1_box_cost(boxes, gt_boxes)
        + 3 * giou_cost(boxes, gt_boxes)
        + 2 * dice_cost(masks, gt_masks)
    )
    torch.testing.assert_close(cost, expected)


# --------------------------------------------------------------------------- hungarian


@pytest.mark.parametrize("num_queries,num_targets", [(3, 3), (5, 5), (5, 2), (6, 4), (4, 1)])
def test_hungarian_match_is_optimal(num_queries, num_targets):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        cost = torch.randn(num_queries, num_targets, generator=g, dtype=torch.float64)
        query_idx, target_idx = hungarian_match(cost)
        assert_valid_one_to_one(query_idx, target_idx, num_queries, num_targets)
        assert query_idx.tolist() == sorted(query_idx.tolist())
        assert cost[query_idx, target_idx].sum().item() == pytest.approx(
            brute_force_min_cost(cost), abs=1e-12
        )


def test_hungarian_match_beats_greedy_on_a_hand_example():
    # greedy would take (q0, t0) at cost 1 and be left with (q1, t1) at 10: total 11;
    # the optimum is (q0, t1) + (q1, t0) = 2 + 2 = 4
    cost = torch.tensor([[1.0, 2.0], [2.0, 10.0]])
    query_idx, target_idx = hungarian_match(cost)
    assert query_idx.tolist() == [0, 1] and target_idx.tolist() == [1, 0]


def test_hungarian_match_zero_targets_and_errors():
    query_idx, target_idx = hungarian_match(torch.zeros(4, 0))
    assert query_idx.shape == target_idx.shape == (0,)
    assert query_idx.dtype == target_idx.dtype == torch.int64
    with pytest.raises(ValueError, match="3 targets to 2 queries"):
        hungarian_match(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1 non-finite"):
        hungarian_match(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


# --------------------------------------------------------------------------- repeated


def test_repeated_match_hand_example():
    # round 1: q0 -> t0, q2 -> t1; round 2 on {q1, q3}: q1 -> t0, q3 -> t1
    cost = torch.tensor([[0.0, 9.0], [1.0, 9.0], [9.0, 0.0], [9.0, 5.0]])
    query_idx, target_idx = repeated_hungarian_match(cost, max_per_target=3)
    assert query_idx.tolist() == [0, 2, 1, 3]
    assert target_idx.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "num_queries,num_targets,max_per_target",
    [(10, 3, 3), (7, 3, 3), (5, 5, 3), (6, 2, 3), (12, 2, 3), (8, 3, 1), (9, 1, 4)],
)
def test_repeated_match_properties(num_queries, num_targets, max_per_target):
    g = torch.Generator().manual_seed(num_queries * 10 + num_targets)
    cost = torch.rand(num_queries, num_targets, generator=g, dtype=torch.float64)
    query_idx, target_idx = repeated_hungarian_match(cost, max_per_target)
    per_target = min(max_per_target, num_queries // num_targets)
    # each target gets min(max_per_target, Q // T) queries, no query is used twice
    counts = torch.bincount(target_idx, minlength=num_targets)
    assert counts.tolist() == [per_target] * num_targets
    assert len(set(query_idx.tolist())) == len(query_idx) == per_target * num_targets
    # round one is the plain Hungarian match
    first_q, first_t = hungarian_match(cost)
    assert query_idx[:num_targets].tolist() == first_q.tolist()
    assert target_idx[:num_targets].tolist() == first_t.tolist()
    # every later round is optimal among the queries the earlier rounds left
    used = []
    for r in range(per_target):
        rows = slice(r * num_targets, (r + 1) * num_targets)
        remaining = [q for q in range(num_queries) if q not in used]
        round_cost = cost[query_idx[rows], target_idx[rows]].sum().item()
        assert round_cost == pytest.approx(brute_force_min_cost(cost[remaining]), abs=1e-12)
        used += query_idx[rows].tolist()


def test_repeated_match_max_total_bounds_rounds():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(300, 40, generator=g, dtype=torch.float64)
    # a bound of 100: min(3, 100 // T) rounds, so 2 rounds for 40 things
    query_idx, _ = repeated_hungarian_match(cost, max_per_target=3, max_total=100)
    assert len(query_idx) == 80
    # more things than max_total still gets the one-to-one round
    query_idx, _ = repeated_hungarian_match(cost[:, :40], max_per_target=3, max_total=30)
    assert len(query_idx) == 40
    with pytest.raises(ValueError, match="max_total must be at least 1 or None, got 0"):
        repeated_hungarian_match(cost, max_total=0)


def test_box_free_costs_use_centres_without_giou():
    pred = torch.tensor([[0.2, 0.3], [0.8, 0.9]])
    target = torch.tensor([[0.8, 0.8]])
    assert box_cost(pred, target, 5.0, 2.0).flatten().tolist() == pytest.approx([5.5, 0.5])
    with pytest.raises(ValueError, match=r"centres \(Q, 2\) and \(T, 2\)"):
        box_cost(pred, torch.rand(1, 4), 5.0, 2.0)


def test_repeated_match_zero_targets_and_errors():
    query_idx, target_idx = repeated_hungarian_match(torch.zeros(5, 0))
    assert query_idx.shape == target_idx.shape == (0,)
    with pytest.raises(ValueError, match="4 targets to 3 queries"):
        repeated_hungarian_match(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 1"):
        repeated_hungarian_match(torch.zeros(3, 1), max_per_target=0)


# --------------------------------------------------------------------------- modules


def test_hungarian_matcher_recovers_a_planted_permutation():
    target_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.8, 0.2, 0.1]])
    labels = torch.tensor([1, 0, 2])
    # query 4 carries target 0, query 0 target 1, query 2 target 2; the rest are far away
    pred_boxes = torch.full((1, 5, 4), 0.05)
    pred_boxes[0, 1, :2] = 0.95
    pred_boxes[0, [4, 0, 2]] = target_boxes
    logits = torch.full((1, 5, 3), -4.0)
    logits[0, [4, 0, 2], labels] = 4.0
    matcher = HungarianMatcher()
    (query_idx, target_idx), (empty_q, empty_t) = matcher(
        logits.expand(2, -1, -1),
        pred_boxes.expand(2, -1, -1),
        [labels, torch.zeros(0, dtype=torch.int64)],
        [target_boxes, torch.zeros(0, 4)],
    )
    assert query_idx.tolist() == [0, 2, 4] and target_idx.tolist() == [1, 2, 0]
    assert empty_q.numel() == empty_t.numel() == 0


def test_hungarian_matcher_cost_weights_and_optimality():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 4, generator=g)
    boxes = torch.rand(1, 5, 4, generator=g) * 0.5 + 0.25
    labels = torch.tensor([3, 0, 3])
    gt_boxes = torch.rand(3, 4, generator=g) * 0.5 + 0.25
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=3.0, cost_giou=0.5)
    cost = matcher.cost_matrix(logits[0], boxes[0], labels, gt_boxes)
    expected = (
        focal_class_cost(logits[0], labels)
        + 3 * l1_box_cost(boxes[0], gt_boxes)
        + 0.5 * giou_cost(boxes[0], gt_boxes)
    )
    torch.testing.assert_close(cost, expected)
    query_idx, target_idx = matcher(logits, boxes, [labels], [gt_boxes])[0]
    assert cost[query_idx, target_idx].sum().item() == pytest.approx(
        brute_force_min_cost(cost), rel=1e-6
    )
    with pytest.raises(ValueError, match="6 targets to 5 queries"):
        matcher(logits, boxes, [torch.zeros(6, dtype=torch.int64)], [torch.rand(6, 4) * 0.1 + 0.5])
    with pytest.raises(ValueError, match="1 images"):
        matcher(logits, boxes, [labels, labels], [gt_boxes, gt_boxes])


def test_matchers_run_without_grad():
    logits = torch.randn(1, 4, 2, requires_grad=True)
    boxes = torch.full((1, 4, 4), 0.3, requires_grad=True)
    query_idx, _ = HungarianMatcher()(
        logits, boxes, [torch.tensor([1])], [torch.rand(1, 4) * 0.2 + 0.3]
    )[0]
    assert not query_idx.requires_grad and logits.grad is None


def test_mask_decoder_matcher_follows_masks_one_to_one():
    # all queries share class and box, so only the Dice cost tells them apart: queries
    # 0 and 3 copy target 0's mask exactly but 3 is dimmer, query 1 copies target 1's, query 2
    # is empty
    height = width = 4
    target_masks = torch.zeros(2, height, width, dtype=torch.bool)
    target_masks[0, :2] = True
    target_masks[1, 2:, 1:] = True
    pred_masks = torch.zeros(4, height, width)
    pred_masks[0] = target_masks[0].float()
    pred_masks[3] = target_masks[0].float() * 0.5
    pred_masks[1] = target_masks[1].float()
    matcher = MaskDecoderMatcher()
    query_idx, target_idx = matcher(
        [torch.zeros(4, 3)],
        [torch.full((4, 4), 0.5)],
        [pred_masks],
        [torch.tensor([0, 2])],
        [torch.tensor([[0.5, 0.25, 1.0, 0.5], [0.625, 0.75, 0.75, 0.5]])],
        [target_masks],
    )[0]
    assert query_idx.tolist() == [0, 1]
    assert target_idx.tolist() == [0, 1]
    # images may pass different numbers of queries; an image without things matches nothing
    matches = matcher(
        [torch.zeros(4, 3), torch.zeros(2, 3)],
        [torch.full((4, 4), 0.5), torch.full((2, 4), 0.5)],
        [pred_masks, pred_masks[:2]],
        [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.int64)],
        [torch.tensor([[0.5, 0.25, 1.0, 0.5], [0.625, 0.75, 0.75, 0.5]]), torch.zeros(0, 4)],
        [target_masks, target_masks[:0]],
    )
    assert matches[0][0].tolist() == [0, 1] and matches[1][0].numel() == 0
    with pytest.raises(ValueError, match="predictions hold 1 images"):
        matcher([torch.zeros(4, 3)], [], [], [], [], [])
    with pytest.raises(ValueError, match="activation must be one of"):
        MaskDecoderMatcher(mask_activation="relu")
