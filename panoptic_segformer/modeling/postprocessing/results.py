"""Instance and semantic results from the query masks of one image.

Shape shorthand: Q queries, H x W image (masks already resized to the output size), K kept
instances, C classes.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from panoptic_segformer.modeling.box_ops import masks_to_boxes
from panoptic_segformer.modeling.postprocessing.common import (
    check_exponents,
    check_queries,
    check_unit_interval,
)
from panoptic_segformer.modeling.postprocessing.mask_statistics import mask_statistics


class InstanceResults(NamedTuple):
    """Instance-segmentation output for one image, sorted by descending score.

    Attributes:
        masks (Tensor): (K, H, W) bool binary masks.
        boxes (Tensor): (K, 4) float XYXY boxes enclosing the masks, zeros for an empty mask.
        scores (Tensor): (K,) float scores.
        classes (Tensor): (K,) int64 category ids.
    """

    masks: Tensor
    boxes: Tensor
    scores: Tensor
    classes: Tensor


def instance_results(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    mask_threshold: float = 0.5,
    max_detections: int = 100,
    alpha: float = 1.0,
    beta: float = 2.0,
) -> InstanceResults:
    """Instance-segmentation results from the thing queries of one image.

    The score of a detection is the confidence of Eq. (6), p^alpha * maskscore^beta with the
    mask score sum(m * binary) / (sum(binary) + 1) of mask-wise merging: the authors' code
    scores its instance results with the same confidence as its merging (p * maskscore^2). The
    ``max_detections`` best scores are kept, in descending order.

    Args:
        mask_logits (Tensor): (Q, H, W) float mask values of the thing queries.
        scores (Tensor): (Q,) float class probabilities p.
        labels (Tensor): (Q,) integer category ids.
        mask_threshold: binarisation threshold of the mask values, in [0, 1].
        max_detections: the most detections returned, >= 0.
        alpha: exponent of the class probability, >= 0.
        beta: exponent of the mask score, >= 0.

    Returns:
        InstanceResults: masks (K, H, W) bool, boxes (K, 4) XYXY float in pixel edges from
        ``box_ops.masks_to_boxes`` (a one-pixel mask at (i, j) gives (j, i, j + 1, i + 1); zeros
        for an empty mask), scores (K,) float32, classes (K,) int64, K = min(Q, max_detections).

    Raises:
        ValueError: on mismatched shapes or dtypes, a threshold outside [0, 1], a negative
            ``max_detections``, alpha or beta.
    """
    check_queries(mask_logits, scores, labels)
    check_unit_interval(mask_threshold=mask_threshold)
    if max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    check_exponents(alpha, beta)

    statistics = mask_statistics(mask_logits, mask_threshold)
    detection_scores = scores.to(torch.float32).pow(alpha) * statistics.mask_scores.pow(beta)
    num_kept = min(max_detections, detection_scores.numel())
    top_scores, top = detection_scores.topk(num_kept, sorted=True)
    masks = statistics.binary[top]
    return InstanceResults(
        masks=masks, boxes=masks_to_boxes(masks), scores=top_scores, classes=labels[top].long()
    )


def semantic_map(mask_logits: Tensor, scores: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class semantic scores: for class c, the max over queries of label c of p * m.

    A pixel of class c scores max_{q : labels[q] = c} p_q * m_q[h, w]; a class that no query
    predicts scores 0 everywhere. ``argmax(dim=0)`` of the result is a semantic segmentation.

    Args:
        mask_logits (Tensor): (Q, H, W) float mask values.
        scores (Tensor): (Q,) float class probabilities p.
        labels (Tensor): (Q,) integer category ids in [0, num_classes).
        num_classes: number of classes C, >= 1.

    Returns:
        Tensor: (C, H, W) in the dtype of ``mask_logits``.

    Raises:
        ValueError: on mismatched shapes or dtypes, num_classes < 1 or a label out of range.
    """
    check_queries(mask_logits, scores, labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    height, width = mask_logits.shape[1:]
    weighted = scores.to(mask_logits.dtype)[:, None, None] * mask_logits  # (Q, H, W)
    index = labels.long()[:, None, None].expand_as(weighted)
    out = weighted.new_zeros(num_classes, height, width)
    # include_self=False: a predicted class gets the true max (even if negative); others stay 0
    return out.scatter_reduce_(0, index, weighted, reduce="amax", include_self=False)
