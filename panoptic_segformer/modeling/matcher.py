"""Bipartite matching of thing queries to ground-truth things.

Two matchers, as in the authors' training recipe (Sec. 3.4 of the paper; the "Training" table of
the implementation notes):

* :class:`HungarianMatcher` for the location decoder: one-to-one Hungarian matching on
  2 * focal class cost + 5 * L1 box cost + 2 * (-GIoU), Deformable DETR's matcher.
* :func:`repeated_hungarian_match` on the location decoder's last-layer costs selects the
  queries of each object for the thing mask decoder (the authors' "filter" assigner). Its first
  round is the one-to-one match of that layer, and by default it is the only one: the authors'
  released ``HungarianAssigner_filter`` is configured for ``max_pos = 3`` rounds but tests for
  its early exit after setting the matched rows to INF, so it always stops after one round.
  More rounds (up to 3 per object) are a switch.
* :class:`MaskDecoderMatcher` for the selected queries: one-to-one Hungarian matching on the
  same costs with class weight 4, plus 2 * Dice cost on the thing mask decoder's last masks at
  their stride 8 (the authors' ``HungarianAssigner_multi_info``). Only its matches get mask
  targets.

The costs are those of :mod:`panoptic_segformer.modeling.matching_costs`.

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

from panoptic_segformer.modeling.losses import check_mask_activation
from panoptic_segformer.modeling.matching_costs import (
    box_cost,
    focal_class_cost,
    mask_decoder_matching_cost,
)

MatchIndices = Tuple[Tensor, Tensor]


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
    cost: Tensor, max_per_target: int = 1, max_total: Optional[int] = None
) -> MatchIndices:
    """Hungarian matching repeated on the unmatched queries: up to ``max_per_target`` each.

    The authors' "filter" assigner as configured (``max_pos = 3``; their released code runs
    one round, ``max_per_target=1``). Round r runs Hungarian on the queries no
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
            target_masks (Sequence[Tensor]): N tensors (T_i, H, W), binary masks at the
                predictions' resolution (the criterion resizes them bilinearly to the mask
                decoder's stride 8, as the authors' ``DiceCost`` does).

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
