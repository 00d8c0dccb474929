"""Bipartite matching of thing queries to ground-truth things.

Two matchers, as in the authors' training recipe (Sec. 3.4 of the paper; the "Training" table of
the implementation notes):

* :class:`HungarianMatcher` for the location decoder: one-to-one Hungarian matching on
  2 * focal class cost + 5 * L1 box cost + 2 * (-GIoU), Deformable DETR's matcher.
* :func:`repeated_hungarian_match` on the location decoder's last-layer costs selects up to 3
  queries per object for the thing mask decoder (the authors' "filter" assigner,
  ``max_pos = 3``); its first round is the one-to-one match of that layer.
* :class:`MaskDecoderMatcher` for the selected queries: one-to-one Hungarian matching on the
  same costs with class weight 4, plus 2 * Dice cost on the thing mask decoder's masks (the
  authors' ``HungarianAssigner_multi_info``). Only its matches get mask targets.

In the box-free variant (paper Table 6) boxes are (cx, cy) mass centres: the L1 cost is on the
centres and the GIoU cost is left out.

Stuff queries are not matched: query k always predicts stuff class k.

Shape shorthand: N images, Q thing queries, K thing classes, T ground-truth things of one
image, H x W mask pixels. Boxes are normalised cxcywh. Matching returns, per image, a pair
``(query_idx, target_idx)`` of int64 CPU tensors of equal length, as DETR's matcher does.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from panoptic_segformer.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from panoptic_segformer.modeling.losses import (
    activate_masks,
    check_mask_activation,
    computed_in_float32,
)

MatchIndices = Tuple[Tensor, Tensor]


@computed_in_float32
def focal_class_cost(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-8
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
        eps: keeps the logarithms finite for saturated probabilities.

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
    cost_class: float = 4.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    cost_dice: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    mask_activation: str = "none",
) -> Tensor:
    """Weighted matching cost of the mask decoder's thing queries against one image's things.

    Weights follow the authors' ``HungarianAssigner_multi_info`` (class cost 2 doubled to 4,
    L1 5, GIoU 2, Dice 2).

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


def _to_numpy_cost(cost: Tensor) -> np.ndarray:
    """Validates a (Q, T) cost matrix and moves it to the CPU for scipy."""
    if cost.dim() != 2:
        raise ValueError(f"cost must be (Q, T), got shape {tuple(cost.shape)}")
    num_queries, num_targets = cost.shape
    if num_targets > num_queries:
        # A silent partial match would leave targets unsupervised; with 300 queries and COCO's
        # at most ~100 things per image this only happens when the query count is misconfigured
        raise ValueError(
            f"cannot match {num_targets} targets to {num_queries} queries: every target needs "
            "its own query; use more queries or fewer targets"
        )
    if not bool(torch.isfinite(cost).all()):
        raise ValueError(f"cost has {int((~torch.isfinite(cost)).sum())} non-finite entries")
    return cost.detach().cpu().double().numpy()


def _empty_match() -> MatchIndices:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


def hungarian_match(cost: Tensor) -> MatchIndices:
    """Minimum-cost one-to-one matching with scipy's ``linear_sum_assignment``.

    Args:
        cost (Tensor): (Q, T) cost of matching query q to target t, T <= Q.

    Returns:
        Tuple[Tensor, Tensor]: query_idx (T,) sorted ascending and target_idx (T,), int64 CPU.

    Raises:
        ValueError: T > Q, or the cost has NaN or infinite entries.
    """
    cost_np = _to_numpy_cost(cost)
    if cost_np.shape[1] == 0:
        return _empty_match()
    query_idx, target_idx = linear_sum_assignment(cost_np)
    return torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(
        target_idx, dtype=torch.int64
    )


def repeated_hungarian_match(
    cost: Tensor, max_per_target: int = 3, max_total: Optional[int] = None
) -> MatchIndices:
    """Hungarian matching repeated on the unmatched queries: up to ``max_per_target`` each.

    The authors' "filter" assigner (``max_pos = 3``). Round r runs Hungarian on the queries no
    earlier round took, so every round gives each target one more, distinct query. Only
    complete rounds run, so every target gets the same number of queries: there are
    ``min(max_per_target, Q // T, max_total // T)`` rounds, and always at least one (the
    authors' released ``HungarianAssigner_filter`` bounds the rounds by ``300 // T``, i.e.
    ``max_total=300``). Round one is exactly :func:`hungarian_match`.

    Args:
        cost (Tensor): (Q, T) matching cost, T <= Q.
        max_per_target: most queries assigned to one target (rounds of matching).
        max_total: most queries assigned in all, None for no bound.

    Returns:
        Tuple[Tensor, Tensor]: query_idx and target_idx, int64 CPU, of length T * rounds;
        ordered round by round, and within a round by query, so the first T pairs are the
        plain Hungarian match.

    Raises:
        ValueError: T > Q, ``max_per_target`` or ``max_total`` < 1, or the cost has
        non-finite entries.
    """
    if max_per_target < 1:
        raise ValueError(f"max_per_target must be at least 1, got {max_per_target}")
    if max_total is not None and max_total < 1:
        raise ValueError(f"max_total must be at least 1 or None, got {max_total}")
    cost_np = _to_numpy_cost(cost)
    num_queries, num_targets = cost_np.shape
    if num_targets == 0:
        return _empty_match()
    rounds = min(max_per_target, num_queries // num_targets)
    if max_total is not None:
        rounds = max(1, min(rounds, max_total // num_targets))
    remaining = np.arange(num_queries)
    query_chunks, target_chunks = [], []
    for _ in range(rounds):
        rows, cols = linear_sum_assignment(cost_np[remaining])
        query_chunks.append(remaining[rows])
        target_chunks.append(cols)
        remaining = np.delete(remaining, rows)
    return (
        torch.as_tensor(np.concatenate(query_chunks), dtype=torch.int64),
        torch.as_tensor(np.concatenate(target_chunks), dtype=torch.int64),
    )


class HungarianMatcher(nn.Module):
    """The location decoder's one-to-one matcher (Deformable DETR's ``HungarianMatcher``).

    cost = cost_class * focal class cost + cost_bbox * L1 + cost_giou * (-GIoU), matched per
    image with :func:`hungarian_match`.

    Args:
        cost_class: weight of the focal class cost (2 in the authors' config).
        cost_bbox: weight of the L1 cost on normalised cxcywh boxes (5).
        cost_giou: weight of the -GIoU cost (2).
        focal_alpha: focal alpha of the class cost.
        focal_gamma: focal gamma of the class cost.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(
        self, logits: Tensor, pred_boxes: Tensor, target_labels: Tensor, target_boxes: Tensor
    ) -> Tensor:
        """Weighted cost of one image.

        Args:
            logits (Tensor): (Q, K) class logits.
            pred_boxes (Tensor): (Q, B) normalised cxcywh boxes, or (Q, 2) mass centres.
            target_labels (Tensor): (T,) int64.
            target_boxes (Tensor): (T, B) in the same form.

        Returns:
            Tensor: (Q, T).
        """
        return self.cost_class * focal_class_cost(
            logits, target_labels, self.focal_alpha, self.focal_gamma
        ) + box_cost(pred_boxes, target_boxes, self.cost_bbox, self.cost_giou)

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        target_labels: Sequence[Tensor],
        target_boxes: Sequence[Tensor],
    ) -> List[MatchIndices]:
        """Matches each image's queries to its things.

        Args:
            pred_logits (Tensor): (N, Q, K) class logits.
            pred_boxes (Tensor): (N, Q, B) normalised cxcywh boxes, or (N, Q, 2) centres.
            target_labels (Sequence[Tensor]): N tensors (T_i,) int64.
            target_boxes (Sequence[Tensor]): N tensors (T_i, B) in the same form.

        Returns:
            List[Tuple[Tensor, Tensor]]: per image, (query_idx, target_idx) of length T_i;
            empty for an image without things.

        Raises:
            ValueError: an image has more things than there are queries (T_i > Q).
        """
        _check_batch(pred_logits, target_labels, target_boxes)
        return [
            hungarian_match(self.cost_matrix(logits, boxes, labels, gt_boxes))
            for logits, boxes, labels, gt_boxes in zip(
                pred_logits, pred_boxes, target_labels, target_boxes
            )
        ]


class MaskDecoderMatcher(nn.Module):
    """One-to-one matcher of the thing mask decoder's queries (the authors'
    ``HungarianAssigner_multi_info``).

    The queries are those the filter (:func:`repeated_hungarian_match`) passed to the thing
    mask decoder; classes and boxes come from the location decoder's last layer, masks from
    the thing mask decoder. Costs from :func:`mask_decoder_matching_cost`, assignment by
    :func:`hungarian_match`.

    Args:
        cost_class: weight of the focal class cost (the authors' 2, doubled to 4).
        cost_bbox: weight of the L1 box cost (5).
        cost_giou: weight of the -GIoU cost (2).
        cost_dice: weight of the Dice cost (2).
        focal_alpha: focal alpha of the class cost.
        focal_gamma: focal gamma of the class cost.
        mask_activation: "none" when masks are already activated (the authors' ReLU head),
            "sigmoid" when they are logits.
    """

    def __init__(
        self,
        cost_class: float = 4.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_dice: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_activation: str = "none",
    ) -> None:
        super().__init__()
        check_mask_activation(mask_activation)
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_activation = mask_activation

    @torch.no_grad()
    def forward(
        self,
        pred_logits: Sequence[Tensor],
        pred_boxes: Optional[Sequence[Tensor]],
        pred_masks: Sequence[Tensor],
        target_labels: Sequence[Tensor],
        target_boxes: Sequence[Tensor],
        target_masks: Sequence[Tensor],
    ) -> List[MatchIndices]:
        """Matches each image's queries to its things, one to one.

        Per-image sequences, because each image passes its own number Q_i of queries.

        Args:
            pred_logits (Sequence[Tensor]): N tensors (Q_i, K) class logits.
            pred_boxes (Sequence[Tensor], optional): N tensors (Q_i, B) boxes or centres;
                None matches without box costs (no location decoder layers).
            pred_masks (Sequence[Tensor]): N tensors (Q_i, H, W) masks.
            target_labels (Sequence[Tensor]): N tensors (T_i,) int64.
            target_boxes (Sequence[Tensor]): N tensors (T_i, B) in the same form.
            target_masks (Sequence[Tensor]): N tensors (T_i, H, W) binary, at the predictions'
                resolution.

        Returns:
            List[Tuple[Tensor, Tensor]]: per image, (query_idx, target_idx) of length T_i.

        Raises:
            ValueError: an image has more things than queries.
        """
        if pred_boxes is None:
            pred_boxes = [None] * len(pred_logits)
        _check_batch(pred_logits, pred_boxes, pred_masks, target_labels, target_boxes, target_masks)
        return [
            hungarian_match(
                mask_decoder_matching_cost(
                    *per_image,
                    cost_class=self.cost_class,
                    cost_bbox=self.cost_bbox,
                    cost_giou=self.cost_giou,
                    cost_dice=self.cost_dice,
                    focal_alpha=self.focal_alpha,
                    focal_gamma=self.focal_gamma,
                    mask_activation=self.mask_activation,
                )
            )
            for per_image in zip(
                pred_logits, pred_boxes, pred_masks, target_labels, target_boxes, target_masks
            )
        ]


def _check_batch(pred_logits: Sequence[Tensor], *per_image_targets: Sequence[Tensor]) -> None:
    """Raises ValueError unless every per-image list has one entry per image."""
    num_images = len(pred_logits)
    lengths = [len(targets) for targets in per_image_targets]
    if any(length != num_images for length in lengths):
        raise ValueError(f"predictions hold {num_images} images but targets hold {lengths}")
