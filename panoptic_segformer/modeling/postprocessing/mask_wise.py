"""Mask-wise merging (Eq. (6) and Algorithm 1 of the paper) and its options.

Pure functions on the tensors of ONE image; every per-pixel step is a vectorised tensor operation
(so it runs on the GPU), only the merging loops in Python, over at most Q queries.

Shape shorthand: Q queries, h x w masks before resizing, H x W output.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor

from panoptic_segformer.modeling.postprocessing.common import (
    MergeOptions,
    SegmentInfo,
    Segments,
    check_exponents,
    check_queries,
    check_unit_interval,
    score_thresholds,
)
from panoptic_segformer.modeling.postprocessing.mask_statistics import (
    MaskStatistics,
    mask_statistics,
)


@dataclass(frozen=True)
class MaskWiseOptions(MergeOptions):
    """Options of mask-wise merging; the defaults are the authors' (R50).

    Args:
        alpha: exponent of the class probability in Eq. (6), >= 0.
        beta: exponent of the mask score in Eq. (6), >= 0.
        thing_score_threshold: minimum confidence of a thing query, in [0, 1].
        stuff_score_threshold: minimum confidence of a stuff query, in [0, 1].
        thing_overlap_threshold: largest kept fraction of a thing mask already painted, in
            [0, 1] (1 - t_keep of Algorithm 1).
        stuff_overlap_threshold: the same for a stuff mask, in [0, 1].
        mask_threshold: binarisation threshold of the mask values, in [0, 1].

    Raises:
        ValueError: naming a threshold outside [0, 1] or a negative alpha or beta.
    """

    alpha: float = 1.0
    beta: float = 2.0
    thing_score_threshold: float = 0.25
    stuff_score_threshold: float = 0.25
    thing_overlap_threshold: float = 0.4
    stuff_overlap_threshold: float = 0.2
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_exponents(self.alpha, self.beta)
        check_unit_interval(
            thing_score_threshold=self.thing_score_threshold,
            stuff_score_threshold=self.stuff_score_threshold,
            thing_overlap_threshold=self.thing_overlap_threshold,
            stuff_overlap_threshold=self.stuff_overlap_threshold,
            mask_threshold=self.mask_threshold,
        )

    def candidates(self, mask_logits: Tensor, scores: Tensor, is_thing: Tensor) -> Tensor:
        peak = mask_logits.flatten(1).amax(dim=1)  # (Q, h, w) -> (Q,) largest value of each mask
        return mask_wise_candidates(peak, scores, is_thing, self)

    def merge(
        self, mask_logits: Tensor, scores: Tensor, labels: Tensor, is_thing: Tensor
    ) -> Tuple[Tensor, List[SegmentInfo]]:
        return mask_wise_merging(mask_logits, scores, labels, is_thing, self)

    def merge_resized(
        self,
        mask_logits: Tensor,
        output_size: Tuple[int, int],
        scores: Tensor,
        labels: Tensor,
        is_thing: Tensor,
    ) -> Tuple[Tensor, List[SegmentInfo]]:
        return mask_wise_merging_resized(mask_logits, output_size, scores, labels, is_thing, self)

    def confidence_exponents(self) -> Tuple[float, float]:
        return self.alpha, self.beta


def mask_wise_merging(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    options: MaskWiseOptions = MaskWiseOptions(),
) -> Tuple[Tensor, List[SegmentInfo]]:
    """Mask-wise merging of one image's query masks into a panoptic segmentation.

    Follows Eq. (6) and Algorithm 1 of the paper with the details of the authors' code:

    1. ``binary = m > mask_threshold``; mask score = sum(m * binary) / (sum(binary) + 1), the
       "+1" taken from the authors' code; confidence s = p^alpha * maskscore^beta.
    2. Visit queries in descending confidence (ties: lower query index first). Skip a query whose
       confidence is below its score threshold (``thing_score_threshold`` or
       ``stuff_score_threshold``, by ``is_thing``), whose binary area is zero, whose overlap
       with already painted pixels exceeds its overlap threshold times its area (things 0.4,
       stuff 0.2, i.e. the paper's t_keep = 0.6 / 0.8), or that has no unassigned pixel left
       (possible only with an overlap threshold of 1). Otherwise paint its still unassigned
       pixels.
    3. Each kept thing query gets a new segment. Stuff queries of one category share ONE segment
       (COCO panoptic allows a single segment per stuff category): a later stuff query of an
       already present category paints its unassigned pixels with that segment's id, and the
       segment keeps the score of its first, most confident query. Its overlap test still counts
       the pixels of that segment as painted, exactly as for any other query.

    Args:
        mask_logits (Tensor): (Q, H, W) float mask values.
        scores (Tensor): (Q,) float class probabilities p.
        labels (Tensor): (Q,) integer category ids.
        is_thing (Tensor): (Q,) bool, True for thing queries.
        options: thresholds and exponents.

    Returns:
        panoptic_seg (Tensor): (H, W) int32 segment ids, 0 = void, on the input's device.
        segments_info (List[dict]): one dict per segment in id order, with keys ``id`` (1-based,
            consecutive), ``category_id`` (int), ``isthing`` (bool) and ``score`` (float, the
            confidence s of Eq. (6)).

    Raises:
        ValueError: on mismatched shapes or dtypes.
    """
    check_queries(mask_logits, scores, labels, is_thing)
    statistics = mask_statistics(mask_logits, options.mask_threshold)
    return _merge(statistics, scores, labels, is_thing, options)


def mask_wise_merging_resized(
    mask_logits: Tensor,
    output_size: Tuple[int, int],
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    options: MaskWiseOptions = MaskWiseOptions(),
) -> Tuple[Tensor, List[SegmentInfo]]:
    """:func:`mask_wise_merging` of masks bilinearly resized to ``output_size``.

    The same result as ``mask_wise_merging(F.interpolate(mask_logits[None], output_size,
    mode="bilinear")[0], ...)``, but the masks are resized a few at a time and only their binary
    form is kept: about 4x less memory at full resolution, and faster.

    Args:
        mask_logits (Tensor): (Q, h, w) low-resolution mask values.
        output_size: (H, W) of the panoptic segmentation.
        scores, labels, is_thing, options: as in :func:`mask_wise_merging`.

    Returns:
        as :func:`mask_wise_merging`.
    """
    check_queries(mask_logits, scores, labels, is_thing)
    statistics = mask_statistics(mask_logits, options.mask_threshold, tuple(output_size))
    return _merge(statistics, scores, labels, is_thing, options)


def _merge(
    statistics: MaskStatistics,
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    options: MaskWiseOptions,
) -> Tuple[Tensor, List[SegmentInfo]]:
    """Algorithm 1 on precomputed mask statistics."""
    binary, areas, mask_scores = statistics.binary, statistics.areas, statistics.mask_scores
    height, width = binary.shape[1:]
    panoptic_seg = torch.zeros(height, width, dtype=torch.int32, device=binary.device)
    if binary.shape[0] == 0:
        return panoptic_seg, []
    # Eq. (6) of the paper
    confidence = scores.to(torch.float32).pow(options.alpha) * mask_scores.pow(options.beta)
    score_threshold = score_thresholds(
        is_thing, options.thing_score_threshold, options.stuff_score_threshold
    )
    # The confidence and empty-mask tests need no painted state: apply them to all queries at
    # once, so the loop below touches pixels only for real candidates.
    candidate = (confidence >= score_threshold) & (areas > 0)
    order = torch.sort(confidence, descending=True, stable=True).indices
    order = order[candidate[order]]

    # One transfer instead of a device sync per query and field.
    order_list = order.tolist()
    areas_list, confidence_list = areas.tolist(), confidence.tolist()
    labels_list, is_thing_list = labels.tolist(), is_thing.tolist()

    # True where no segment has painted yet (kept as such, so testing a query is one AND)
    unassigned = torch.ones(height, width, dtype=torch.bool, device=binary.device)
    segments = Segments()
    for query in order_list:
        area, isthing, category = areas_list[query], is_thing_list[query], labels_list[query]
        # Only the mask's bounding box can change: work on that window.
        y0, y1 = _extent(statistics.rows[query])
        x0, x1 = _extent(statistics.cols[query])
        window = (slice(y0, y1), slice(x0, x1))
        free = binary[query][window] & unassigned[window]
        free_area = int(free.count_nonzero())
        overlap = area - free_area
        overlap_threshold = (
            options.thing_overlap_threshold if isthing else options.stuff_overlap_threshold
        )
        # the t_keep test of Algorithm 1, written as the authors' code writes it; a mask with
        # nothing left to paint (only possible with an overlap threshold of 1) is skipped too,
        # as a segment without pixels is invalid in COCO panoptic
        if overlap / area > overlap_threshold or free_area == 0:
            continue
        segment_id = segments.id_for(category, isthing, confidence_list[query])
        panoptic_seg[window][free] = segment_id
        unassigned[window] &= ~free
    return panoptic_seg, segments.info


def _extent(present: Tensor) -> Tuple[int, int]:
    """First and one-past-last index of the True entries of a non-empty 1-D bool tensor."""
    index = present.nonzero()
    return int(index[0]), int(index[-1]) + 1


def mask_wise_candidates(
    max_mask_values: Tensor,
    scores: Tensor,
    is_thing: Tensor,
    options: MaskWiseOptions = MaskWiseOptions(),
) -> Tensor:
    """Queries that may pass :func:`mask_wise_merging`'s confidence and empty-mask tests.

    Exact pre-filter from an upper bound of each mask: bilinear resizing only averages values,
    so a resized mask never exceeds the largest value of the low-resolution one, and neither
    does its mask score. A query whose p^alpha * max^beta is below its score threshold, or
    whose max is not above ``mask_threshold``, is skipped by the merging whatever the output
    size, so it need not be resized at all. Merging the candidates alone gives the same result
    as merging every query.

    Args:
        max_mask_values (Tensor): (Q,) largest mask value of each query before resizing.
        scores (Tensor): (Q,) class probabilities p.
        is_thing (Tensor): (Q,) bool.
        options: those of the merging.

    Returns:
        Tensor: (Q,) bool, True for the queries to keep.
    """
    # a little slack for float rounding in the resize
    bound = max_mask_values.to(torch.float32).clamp(min=0) * (1 + 1e-5)
    confidence_bound = scores.to(torch.float32).pow(options.alpha) * bound.pow(options.beta)
    threshold = score_thresholds(
        is_thing, options.thing_score_threshold, options.stuff_score_threshold
    )
    return (confidence_bound >= threshold) & (bound > options.mask_threshold)
