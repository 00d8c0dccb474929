"""Matching costs of thing queries against one image's ground-truth things.

The terms of the paper's matching (Sec. 3.4): focal class cost, L1 and -GIoU box costs
(Deformable DETR's matcher) and the Dice mask cost of the thing mask decoder, each a (Q, T)
matrix, and their weighted sum for the mask decoder's queries (the authors'
``HungarianAssigner_multi_info``). :mod:`panoptic_segformer.modeling.matcher` assigns queries to
things on them.

In the box-free variant (paper Table 6) boxes are (cx, cy) mass centres: the L1 cost is on the
centres and the GIoU cost is left out.

Shape shorthand: Q thing queries, K thing classes, T ground-truth things of one image,
B box coordinates (4 for cxcywh boxes, 2 for mass centres), H x W mask pixels. Boxes are
normalised cxcywh.
"""

from typing import Optional

import torch
from torch import Tensor

from panoptic_segformer.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from panoptic_segformer.modeling.losses import activate_masks, computed_in_float32

__all__ = [
    "box_cost",
    "dice_cost",
    "focal_class_cost",
    "giou_cost",
    "l1_box_cost",
    "mask_decoder_matching_cost",
]


@computed_in_float32
def focal_class_cost(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """Classification cost: focal loss of the target class as positive minus as negative.

    Follows Deformable DETR's matcher (and mmdet's ``FocalLossCost``): with p the sigmoid
    probability of the target class, cost = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma
    (-log(1-p)), i.e. how much the focal loss of that class changes if the query is matched.

    Args:
        logits (Tensor): (Q, K) class logits.
        labels (Tensor): (T,) int64 target classes in [0, K).
        alpha: focal alpha.
        gamma: focal gamma.
        eps: keeps the logarithms finite for saturated probabilities: 1e-12, mmdet's
            ``FocalLossCost`` (the authors' matchers); Deformable DETR's matcher uses 1e-8.

    Returns:
        Tensor: (Q, T) costs.
    """
    prob = logits.sigmoid()[:, labels]  # (Q, T)
    pos_cost = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    neg_cost = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    return pos_cost - neg_cost


@computed_in_float32
def l1_box_cost(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """Pairwise L1 distance of normalised cxcywh boxes (Deformable DETR), or of centres.

    Args:
        pred_boxes (Tensor): (Q, B), B = 4 (cxcywh) or 2 (mass centres).
        target_boxes (Tensor): (T, B).

    Returns:
        Tensor: (Q, T).
    """
    return torch.cdist(pred_boxes, target_boxes.to(pred_boxes.dtype), p=1)


@computed_in_float32
def giou_cost(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """Pairwise -GIoU of normalised cxcywh boxes (DETR).

    Args:
        pred_boxes (Tensor): (Q, 4).
        target_boxes (Tensor): (T, 4).

    Returns:
        Tensor: (Q, T) in [-1, 1].
    """
    return -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))


@computed_in_float32
def box_cost(
    pred_boxes: Tensor, target_boxes: Tensor, cost_bbox: float, cost_giou: float
) -> Tensor:
    """``cost_bbox`` * L1 + ``cost_giou`` * (-GIoU); centres (B = 2) get the L1 term only.

    Args:
        pred_boxes (Tensor): (Q, B) normalised cxcywh boxes (B = 4) or mass centres (B = 2).
        target_boxes (Tensor): (T, B) in the same form.
        cost_bbox: weight of :func:`l1_box_cost`.
        cost_giou: weight of :func:`giou_cost`, unused for centres.

    Returns:
        Tensor: (Q, T).
    """
    if pred_boxes.shape[-1] != target_boxes.shape[-1] or pred_boxes.shape[-1] not in (2, 4):
        raise ValueError(
            f"boxes must be (Q, 4) and (T, 4), or centres (Q, 2) and (T, 2); got "
            f"{tuple(pred_boxes.shape)} and {tuple(target_boxes.shape)}"
        )
    cost = cost_bbox * l1_box_cost(pred_boxes, target_boxes)
    if pred_boxes.shape[-1] == 4:
        cost = cost + cost_giou * giou_cost(pred_boxes, target_boxes)
    return cost


@computed_in_float32
def dice_cost(
    pred_masks: Tensor, target_masks: Tensor, activation: str = "none", eps: float = 1e-3
) -> Tensor:
    """Pairwise Dice cost, the squared-denominator form of the authors' ``DiceCost``.

    cost = 1 - 2 sum(p t) / ((sum(p^2) + eps) + (sum(t^2) + eps)) for every (query, target).

    Args:
        pred_masks (Tensor): (Q, H, W) predicted masks in the convention ``activation`` names
            ("none": already-activated values such as the authors' ReLU outputs; "sigmoid":
            logits).
        target_masks (Tensor): (T, H, W) binary masks at the same resolution (resize first).
        activation: key of :data:`panoptic_segformer.modeling.losses.MASK_ACTIVATIONS`.
        eps: the authors' matching cost uses 1e-3 (their loss uses 1e-6).

    Returns:
        Tensor: (Q, T) costs in [0, 1].
    """
    if pred_masks.shape[1:] != target_masks.shape[1:]:
        raise ValueError(
            f"predicted masks are {tuple(pred_masks.shape[1:])} but target masks are "
            f"{tuple(target_masks.shape[1:])}; resize the targets to the predictions first"
        )
    probs = activate_masks(pred_masks, activation).flatten(1)  # (Q, H*W)
    targets = target_masks.flatten(1).to(probs.dtype)  # (T, H*W)
    numerator = 2 * probs @ targets.T  # (Q, T)
    denominator = (probs * probs).sum(1)[:, None] + (targets * targets).sum(1)[None] + 2 * eps
    return 1 - numerator / denominator


def mask_decoder_matching_cost(
    logits: Tensor,
    pred_boxes: Optional[Tensor],
    pred_masks: Tensor,
    target_labels: Tensor,
    target_boxes: Tensor,
    target_masks: Tensor,
    *,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    cost_dice: float,
    focal_alpha: float,
    focal_gamma: float,
    mask_activation: str,
) -> Tensor:
    """Weighted matching cost of the mask decoder's thing queries against one image's things.

    The weights have no defaults here: :class:`~panoptic_segformer.modeling.matcher.
    MaskDecoderMatcher`'s are the authors' (``HungarianAssigner_multi_info``).

    Args:
        logits (Tensor): (Q, K) class logits.
        pred_boxes (Tensor, optional): (Q, B) normalised cxcywh boxes, or (Q, 2) mass
            centres; None (a model without location decoder layers) leaves out the box costs.
        pred_masks (Tensor): (Q, H, W) masks, convention named by ``mask_activation``.
        target_labels (Tensor): (T,) int64 classes.
        target_boxes (Tensor): (T, B) in the same form.
        target_masks (Tensor): (T, H, W) binary masks.
        cost_class: weight of :func:`focal_class_cost`.
        cost_bbox: weight of :func:`l1_box_cost`.
        cost_giou: weight of :func:`giou_cost`.
        cost_dice: weight of :func:`dice_cost`.
        focal_alpha: focal alpha of the class cost.
        focal_gamma: focal gamma of the class cost.
        mask_activation: "none" for already-activated masks, "sigmoid" for logits.

    Returns:
        Tensor: (Q, T) costs.
    """
    cost = cost_class * focal_class_cost(
        logits, target_labels, focal_alpha, focal_gamma
    ) + cost_dice * dice_cost(pred_masks, target_masks, mask_activation)
    if pred_boxes is not None:
        cost = cost + box_cost(pred_boxes, target_boxes, cost_bbox, cost_giou)
    return cost
