"""Box conversions, (generalised) IoU, and boxes and mass centres of masks.

Shape shorthand: N and M boxes in two sets, K masks of H x W pixels. Boxes are either
``(cx, cy, w, h)`` ("cxcywh", what the location decoder predicts, normalised to [0, 1]) or
``(x0, y0, x1, y1)`` ("xyxy") with x1 >= x0 and y1 >= y0. Pixel (i, j) covers
[j, j + 1) x [i, i + 1) in pixel units, so a one-pixel mask has a box of area 1.
"""

from typing import Tuple

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Converts centre-size boxes to corner boxes.

    Args:
        boxes (Tensor): (..., 4) as (cx, cy, w, h).

    Returns:
        Tensor: (..., 4) as (x0, y0, x1, y1).
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Converts corner boxes to centre-size boxes.

    Args:
        boxes (Tensor): (..., 4) as (x0, y0, x1, y1).

    Returns:
        Tensor: (..., 4) as (cx, cy, w, h).
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of corner boxes.

    Args:
        boxes (Tensor): (..., 4) as (x0, y0, x1, y1).

    Returns:
        Tensor: (...,) areas.
    """
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_boxes(boxes: Tensor, name: str) -> None:
    """Raises ValueError naming the first box with x1 < x0 or y1 < y0 (NaN fails too)."""
    valid = (boxes[..., 2:] >= boxes[..., :2]).all(-1)
    if not bool(valid.all()):
        index = int((~valid).flatten().nonzero()[0])
        bad = boxes.reshape(-1, 4)[index].tolist()
        raise ValueError(
            f"{name} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0; "
            f"box {index} is {bad} ({int((~valid).sum())} invalid in all)"
        )


def _iou_union_enclosing(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """IoU, union area and enclosing-box area of two broadcastable sets of xyxy boxes."""
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    enclosing_wh = torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(
        boxes1[..., :2], boxes2[..., :2]
    )
    enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]
    return inter / union, union, enclosing


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU of two sets of corner boxes.

    Args:
        boxes1 (Tensor): (N, 4) xyxy.
        boxes2 (Tensor): (M, 4) xyxy.

    Returns:
        Tuple[Tensor, Tensor]: IoU (N, M) and union area (N, M). Two zero-area boxes have a
        union of 0 and an IoU of NaN, as in DETR.
    """
    # (N, 1, 4) against (1, M, 4) broadcasts to all pairs
    iou, union, _ = _iou_union_enclosing(boxes1[:, None], boxes2[None])
    return iou, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, aligned: bool = False) -> Tensor:
    """Generalised IoU: IoU - (enclosing area - union) / enclosing area.

    Follows DETR's ``generalized_box_iou`` (Rezatofighi et al., CVPR 2019), plus an aligned
    mode for losses on matched pairs that skips the (N, M) matrix.

    Args:
        boxes1 (Tensor): (N, 4) xyxy.
        boxes2 (Tensor): (M, 4) xyxy; M == N when ``aligned``.
        aligned: if True, compare box i of each set only with box i of the other.

    Returns:
        Tensor: (N, M) pairwise, or (N,) when ``aligned``; values in [-1, 1].

    Raises:
        ValueError: a box has x1 < x0 or y1 < y0 (degenerate boxes give inf / NaN), or the
            sets differ in length with ``aligned``.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    if aligned:
        if boxes1.shape[0] != boxes2.shape[0]:
            raise ValueError(
                f"aligned GIoU needs as many boxes in each set, got {boxes1.shape[0]} "
                f"and {boxes2.shape[0]}"
            )
        iou, union, enclosing = _iou_union_enclosing(boxes1, boxes2)
    else:
        # (N, 1, 4) against (1, M, 4) broadcasts to all pairs
        iou, union, enclosing = _iou_union_enclosing(boxes1[:, None], boxes2[None])
    return iou - (enclosing - union) / enclosing


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes around binary masks, in pixel edges (detectron2's ``BitMasks`` convention).

    Args:
        masks (Tensor): (K, H, W) bool (or 0/1) masks.

    Returns:
        Tensor: (K, 4) float xyxy in pixels: x0 is the first column, x1 one past the last, so a
        mask of one pixel at (row i, column j) gives (j, i, j + 1, i + 1). Empty masks give
        zeros.
    """
    masks = masks.bool()
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32, device=masks.device)
    if masks.numel() == 0:
        return boxes
    cols = masks.any(dim=1)  # (K, W): which columns hold a pixel
    rows = masks.any(dim=2)  # (K, H): which rows hold a pixel
    non_empty = cols.any(dim=1)
    width, height = masks.shape[2], masks.shape[1]
    col_index = torch.arange(width, device=masks.device)
    row_index = torch.arange(height, device=masks.device)
    # Index of the first / last True along each row of (K, W) or (K, H)
    x0 = torch.where(cols, col_index, width).amin(dim=1)
    x1 = torch.where(cols, col_index, -1).amax(dim=1) + 1
    y0 = torch.where(rows, row_index, height).amin(dim=1)
    y1 = torch.where(rows, row_index, -1).amax(dim=1) + 1
    stacked = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[non_empty] = stacked[non_empty]
    return boxes


def masks_to_centers(masks: Tensor) -> Tensor:
    """Normalised mass centres of masks, the target of the paper's box-free location decoder.

    Sec. 3.3.2 of the paper ("predicting the mass centers of masks instead of bounding boxes",
    Table 6). Pixel (i, j) sits at ((j + 0.5) / W, (i + 0.5) / H), the convention of normalised
    cxcywh boxes, so a filled rectangle's centre equals its box centre. (The authors' code
    places pixels at j / (W - 1) instead; the two differ by under half a pixel.)

    Args:
        masks (Tensor): (K, H, W) bool masks, or non-negative float weights (differentiable,
            for predicted masks).

    Returns:
        Tensor: (K, 2) as (cx, cy) in [0, 1]; zeros for empty masks.
    """
    weights = masks.float() if masks.dtype == torch.bool else masks
    height, width = weights.shape[-2:]
    xs = (torch.arange(width, device=weights.device, dtype=weights.dtype) + 0.5) / width
    ys = (torch.arange(height, device=weights.device, dtype=weights.dtype) + 0.5) / height
    mass = weights.sum(dim=(1, 2))
    # Clamping only matters for empty masks, whose moments are 0, so they come out as (0, 0)
    mass = mass.clamp(min=torch.finfo(weights.dtype).tiny)
    cx = (weights * xs).sum(dim=(1, 2)) / mass
    cy = (weights * ys[:, None]).sum(dim=(1, 2)) / mass
    return torch.stack([cx, cy], dim=-1)
