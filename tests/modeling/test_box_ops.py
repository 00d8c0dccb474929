"""box_ops: conversions, IoU / GIoU against hand-computed values, boxes and centres of masks."""

import pytest
import torch

from panoptic_segformer.modeling.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    masks_to_boxes,
    masks_to_centers,
)


def test_cxcywh_to_xyxy_known_value_and_round_trip():
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(box), expected)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected), box)

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.5, 2.0], [1.0, 1.0, 1.0, 4.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.5, 0.0]))


def test_box_iou_known_values():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    boxes2 = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(boxes1, boxes2)
    # [0,0,2,2] & [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7; & [5,5,6,6]: 4 + 1 = 5
    # [0,0,1,1] & [1,1,3,3]: touch at a corner, union 1 + 4 = 5; & [0,0,2,2]: intersection 1,
    # union 4; & [5,5,6,6]: 1 + 1 = 2
    expected_union = torch.tensor([[7.0, 4.0, 5.0], [5.0, 4.0, 2.0]])
    expected_iou = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 1 / 4, 0.0]])
    torch.testing.assert_close(iou, expected_iou)
    torch.testing.assert_close(union, expected_union)


def test_giou_identical_is_one():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(generalized_box_iou(boxes, boxes).diagonal(), torch.ones(2))


def test_giou_disjoint_and_overlapping_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    side_by_side = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    diagonal = torch.tensor([[2.0, 2.0, 3.0, 3.0]])
    # IoU 0, union 2, enclosing box [0,0,3,1] of area 3: GIoU = 0 - (3 - 2) / 3
    torch.testing.assert_close(generalized_box_iou(a, side_by_side), torch.tensor([[-1 / 3]]))
    # enclosing box [0,0,3,3] of area 9: GIoU = 0 - (9 - 2) / 9
    torch.testing.assert_close(generalized_box_iou(a, diagonal), torch.tensor([[-7 / 9]]))
    # [0,0,2,2] & [1,1,3,3]: IoU 1/7, union 7, enclosing 9: GIoU = 1/7 - 2/9
    b, c = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    torch.testing.assert_close(generalized_box_iou(b, c), torch.tensor([[1 / 7 - 2 / 9]]))


def test_giou_pairwise_shape_and_aligned_equals_diagonal():
    g = torch.Generator().manual_seed(1)
    boxes1 = box_cxcywh_to_xyxy(torch.rand(5, 4, generator=g) * 0.5 + 0.25)
    boxes2 = box_cxcywh_to_xyxy(torch.rand(3, 4, generator=g) * 0.5 + 0.25)
    pairwise = generalized_box_iou(boxes1, boxes2)
    assert pairwise.shape == (5, 3)
    assert bool(((pairwise >= -1) & (pairwise <= 1)).all())
    torch.testing.assert_close(
        generalized_box_iou(boxes1[:3], boxes2, aligned=True), pairwise[:3].diagonal()
    )
    with pytest.raises(ValueError, match="5 and 3"):
        generalized_box_iou(boxes1, boxes2, aligned=True)


def test_giou_rejects_degenerate_boxes_naming_them():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2 .* box 1 is \[2\.0, 0\.0, 1\.0, 1\.0\]"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), good)


def test_masks_to_boxes_hand_built():
    masks = torch.zeros(4, 5, 6, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True  # rows 1..3, columns 2..4
    masks[1, 4, 0] = True  # one pixel at row 4, column 0
    masks[2, 0, 5] = True  # an L: top-right pixel and a column at x = 1
    masks[2, 2:5, 1] = True
    expected = torch.tensor(
        [
            [2.0, 1.0, 5.0, 4.0],
            [0.0, 4.0, 1.0, 5.0],
            [1.0, 0.0, 6.0, 5.0],
            [0.0, 0.0, 0.0, 0.0],  # empty mask
        ]
    )
    torch.testing.assert_close(masks_to_boxes(masks), expected)
    assert masks_to_boxes(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)


def test_masks_to_centers_known_values():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 4, 0] = True
    centers = masks_to_centers(masks)
    # rectangle: centre of columns 2..4 is pixel 3 -> (3 + 0.5) / 6; rows 1..3 -> (2 + 0.5) / 5
    # single pixel at (4, 0): ((0 + 0.5) / 6, (4 + 0.5) / 5); empty mask: zeros
    expected = torch.tensor([[3.5 / 6, 2.5 / 5], [0.5 / 6, 4.5 / 5], [0.0, 0.0]])
    torch.testing.assert_close(centers, expected)
    # for a filled rectangle the mass centre is the centre of its normalised box
    box = box_xyxy_to_cxcywh(masks_to_boxes(masks[:1]) / torch.tensor([6.0, 5.0, 6.0, 5.0]))
    torch.testing.assert_close(centers[:1], box[:, :2])


def test_masks_to_centers_soft_weights_and_gradient():
    weights = torch.zeros(1, 1, 4)
    weights[0, 0, 0], weights[0, 0, 3] = 3.0, 1.0
    weights.requires_grad_(True)
    center = masks_to_centers(weights)
    # x = (3 * 0.5/4 + 1 * 3.5/4) / (3 + 1) = (1.5 + 3.5) / 16; a single row gives y = 0.5
    torch.testing.assert_close(center.detach(), torch.tensor([[5.0 / 16, 0.5]]))
    center[:, 0].sum().backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0
