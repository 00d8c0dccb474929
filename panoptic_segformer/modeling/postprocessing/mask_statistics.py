"""Binary masks and the statistics the merging and the instance scores read from them.

Mask values are taken as given and thresholded at ``mask_threshold``: in the authors' code they
are ReLU outputs compared with 0.5, not sigmoid probabilities.

Shape shorthand: Q queries, h x w masks before resizing, H x W after.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class MaskStatistics(NamedTuple):
    """Binary masks, their areas, extents and the average mask value inside them.

    Attributes:
        binary (Tensor): (Q, H, W) bool, mask value strictly above the threshold.
        areas (Tensor): (Q,) int64 pixel counts of ``binary``.
        mask_scores (Tensor): (Q,) float32 sum(m * binary) / (area + 1).
        rows (Tensor): (Q, H) bool, rows holding a pixel of ``binary``, or a superset (they only
            bound the merging's windows).
        cols (Tensor): (Q, W) bool, the same for columns.
    """

    binary: Tensor
    areas: Tensor
    mask_scores: Tensor
    rows: Tensor
    cols: Tensor


# Queries per block in mask_statistics: a few full-size masks and their temporaries fit in the
# CPU's last-level cache, so each mask is read from memory once (about 2x faster at 800x1333).
_BLOCK = 4


def mask_statistics(
    mask_logits: Tensor, mask_threshold: float, output_size: Optional[Tuple[int, int]] = None
) -> MaskStatistics:
    """Binary masks and their statistics, optionally after a bilinear resize.

    Masks to resize are resized block by block, so the resized float masks never exist all at
    once and each block is still in cache when its statistics are taken; the result is that of
    resizing all of them with one ``F.interpolate`` first.

    Args:
        mask_logits (Tensor): (Q, H, W) mask values, or (Q, h, w) ones to resize.
        mask_threshold: a pixel belongs to the mask where its value is strictly above this.
        output_size: (H, W) to resize the masks to first (``F.interpolate``, bilinear,
            ``align_corners=False``); None when the masks are already at size.
    """
    num_queries = mask_logits.shape[0]
    height, width = mask_logits.shape[1:] if output_size is None else output_size
    device = mask_logits.device
    binary = torch.empty(num_queries, height, width, dtype=torch.bool, device=device)
    areas = torch.empty(num_queries, dtype=torch.int64, device=device)
    inside = torch.empty(num_queries, dtype=torch.float32, device=device)
    rows = torch.empty(num_queries, height, dtype=torch.bool, device=device)
    cols = torch.empty(num_queries, width, dtype=torch.bool, device=device)
    if output_size is not None:
        row_sources = _bilinear_sources(mask_logits.shape[1], height, device)
        col_sources = _bilinear_sources(mask_logits.shape[2], width, device)
    for start in range(0, num_queries, _BLOCK):
        block = slice(start, start + _BLOCK)
        values = mask_logits[block]
        if output_size is not None:
            values = F.interpolate(values[None], size=output_size, mode="bilinear")[0]
        torch.gt(values, mask_threshold, out=binary[block])
        # bool reductions go through int64; a uint8 view with an int32 sum is faster
        as_bytes = binary[block].view(torch.uint8)
        areas[block] = as_bytes.flatten(1).sum(dim=1, dtype=torch.int32)  # (B, H*W) -> (B,)
        # m * binary in one pass (x if x > threshold else 0); in place on our own resized copy
        threshold = F.threshold if output_size is None else F.threshold_
        inside[block] = (
            threshold(values, mask_threshold, 0.0).flatten(1).sum(1, dtype=torch.float32)
        )
        if output_size is None:
            rows[block] = as_bytes.amax(dim=2).bool()
            cols[block] = as_bytes.amax(dim=1).bool()
        else:
            # Cheaper from the small masks: a resized pixel can only be above the threshold if
            # one of the input pixels it reads is (up to rounding, hence the slack), so these
            # rows and columns cover the binary mask; they only bound the merging's windows.
            hot = mask_logits[block] > mask_threshold - 1e-6  # (B, h, w)
            rows[block] = hot.any(dim=2)[:, row_sources].any(dim=1)  # (B, 4, H) -> (B, H)
            cols[block] = hot.any(dim=1)[:, col_sources].any(dim=1)
    # "average" of Eq. (6); the "+1" in the denominator is the authors' code (guards empty masks)
    mask_scores = inside / (areas.to(torch.float32) + 1.0)
    return MaskStatistics(binary, areas, mask_scores, rows, cols)


def resize_masks(mask_logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """(Q, h, w) masks bilinearly resized (``align_corners=False``) to (Q, H, W) = ``size``."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, *size))
    return F.interpolate(mask_logits[None], size=tuple(size), mode="bilinear")[0]


def _bilinear_sources(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """(4, size_out) input indices that a bilinear resize (align_corners=False) may read for
    each output index: the two it interpolates, with one more either side for rounding."""
    scale = size_in / size_out
    positions = torch.arange(size_out, dtype=torch.float64) + 0.5
    first = (positions * scale - 0.5).clamp(min=0).floor().long()
    offsets = torch.arange(-1, 3)[:, None]
    return (first[None] + offsets).clamp(0, size_in - 1).to(device)
