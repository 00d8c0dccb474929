"""Inference post-processing: per-query masks to panoptic, instance and semantic results.

Pure functions on the tensors of ONE image; no model, no config. Everything per pixel is a
vectorised tensor operation (so it runs on the GPU); only ``mask_wise_merging`` loops in Python,
over at most Q queries.

Shape shorthand: Q queries, H x W image (masks already resized to the output size), K kept
instances, C classes.

Mask values are taken as given and thresholded at ``mask_threshold``: in the authors' code they
are ReLU outputs compared with 0.5, not sigmoid probabilities.
"""

import inspect
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from panoptic_segformer.modeling.box_ops import masks_to_boxes

__all__ = [
    "InstanceResults",
    "instance_results",
    "mask_wise_candidates",
    "mask_wise_merging",
    "mask_wise_merging_resized",
    "merge_options",
    "pixel_wise_argmax",
    "semantic_map",
]

SegmentInfo = Dict[str, object]


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


def _check_unit_interval(**thresholds: float) -> None:
    for name, value in thresholds.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_queries(
    mask_logits: Tensor, scores: Tensor, labels: Tensor, is_thing: Optional[Tensor] = None
) -> None:
    if mask_logits.dim() != 3 or not mask_logits.is_floating_point():
        raise ValueError(
            f"mask_logits must be a floating (Q, H, W) tensor, got dtype {mask_logits.dtype} "
            f"and shape {tuple(mask_logits.shape)}"
        )
    num_queries = mask_logits.shape[0]
    if scores.shape != (num_queries,) or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a floating ({num_queries},) tensor to match mask_logits "
            f"{tuple(mask_logits.shape)}, got dtype {scores.dtype} and shape {tuple(scores.shape)}"
        )
    if labels.shape != (num_queries,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer ({num_queries},) tensor to match mask_logits "
            f"{tuple(mask_logits.shape)}, got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    if is_thing is not None and (is_thing.shape != (num_queries,) or is_thing.dtype != torch.bool):
        raise ValueError(
            f"is_thing must be a bool ({num_queries},) tensor to match mask_logits "
            f"{tuple(mask_logits.shape)}, got dtype {is_thing.dtype} and shape "
            f"{tuple(is_thing.shape)}"
        )


class _Quality(NamedTuple):
    binary: Tensor  # (Q, H, W) bool, mask value above the threshold
    areas: Tensor  # (Q,) int64 pixel counts of binary
    mask_scores: Tensor  # (Q,) float32, sum(m * binary) / (area + 1)
    # (a superset of the next two is fine: they only bound the merging's windows)
    rows: Tensor  # (Q, H) bool, rows holding a pixel of binary
    cols: Tensor  # (Q, W) bool, columns holding a pixel of binary


# Queries per block in _mask_quality: a few full-size masks and their temporaries fit in the
# CPU's last-level cache, so each mask is read from memory once (about 2x faster at 800x1333).
_QUALITY_BLOCK = 4


def _mask_quality(
    mask_logits: Tensor, mask_threshold: float, output_size: Optional[Tuple[int, int]] = None
) -> _Quality:
    """Binary masks, their areas, extents and the average mask value inside them.

    Masks to resize are resized block by block, so the resized float masks never exist all at
    once and each block is still in cache when its statistics are taken.

    Args:
        mask_logits (Tensor): (Q, H, W) mask values, or (Q, h, w) ones to resize.
        mask_threshold: a pixel belongs to the mask where its value is strictly above this.
        output_size: (H, W) to bilinearly resize the masks to first (as ``F.interpolate``,
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
    for start in range(0, num_queries, _QUALITY_BLOCK):
        block = slice(start, start + _QUALITY_BLOCK)
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
    return _Quality(binary, areas, mask_scores, rows, cols)


def _bilinear_sources(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """(4, size_out) input indices that a bilinear resize (align_corners=False) may read for
    each output index: the two it interpolates, with one more either side for rounding."""
    scale = size_in / size_out
    positions = torch.arange(size_out, dtype=torch.float64) + 0.5
    first = (positions * scale - 0.5).clamp(min=0).floor().long()
    offsets = torch.arange(-1, 3)[:, None]
    return (first[None] + offsets).clamp(0, size_in - 1).to(device)


def _score_thresholds(is_thing: Tensor, thing: float, stuff: float) -> Tensor:
    """(Q,) float32 score threshold of every query, by whether it is a thing."""
    return torch.where(
        is_thing,
        torch.tensor(thing, dtype=torch.float32, device=is_thing.device),
        torch.tensor(stuff, dtype=torch.float32, device=is_thing.device),
    )


def _extent(present: Tensor) -> Tuple[int, int]:
    """First and one-past-last index of the True entries of a non-empty 1-D bool tensor."""
    index = present.nonzero()
    return int(index[0]), int(index[-1]) + 1


class _Segments:
    """Segment ids in order of creation: a new id per thing, and one shared segment per stuff
    category (COCO panoptic allows a single segment per stuff category); the segment keeps the
    score of the first query that created it."""

    def __init__(self) -> None:
        self.info: List[SegmentInfo] = []
        self._stuff: Dict[int, int] = {}

    def id_for(self, category_id: int, isthing: bool, score: float) -> int:
        if not isthing and category_id in self._stuff:
            return self._stuff[category_id]
        segment_id = len(self.info) + 1
        self.info.append(
            {"id": segment_id, "category_id": category_id, "isthing": isthing, "score": score}
        )
        if not isthing:
            self._stuff[category_id] = segment_id
        return segment_id


def mask_wise_merging(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 2.0,
    thing_score_threshold: float = 0.25,
    stuff_score_threshold: float = 0.25,
    thing_overlap_threshold: float = 0.4,
    stuff_overlap_threshold: float = 0.2,
    mask_threshold: float = 0.5,
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
        alpha: exponent of the class probability in Eq. (6), >= 0.
        beta: exponent of the mask score in Eq. (6), >= 0.
        thing_score_threshold: minimum confidence of a thing query, in [0, 1].
        stuff_score_threshold: minimum confidence of a stuff query, in [0, 1].
        thing_overlap_threshold: largest kept fraction of a thing mask already painted, in [0, 1].
        stuff_overlap_threshold: largest kept fraction of a stuff mask already painted, in [0, 1].
        mask_threshold: binarisation threshold of the mask values, in [0, 1].

    Returns:
        panoptic_seg (Tensor): (H, W) int32 segment ids, 0 = void, on the input's device.
        segments_info (List[dict]): one dict per segment in id order, with keys ``id`` (1-based,
            consecutive), ``category_id`` (int), ``isthing`` (bool) and ``score`` (float, the
            confidence s of Eq. (6)).

    Raises:
        ValueError: on mismatched shapes or dtypes, a threshold outside [0, 1] or a negative
            alpha or beta.
    """
    options = dict(
        alpha=alpha,
        beta=beta,
        thing_score_threshold=thing_score_threshold,
        stuff_score_threshold=stuff_score_threshold,
        thing_overlap_threshold=thing_overlap_threshold,
        stuff_overlap_threshold=stuff_overlap_threshold,
        mask_threshold=mask_threshold,
    )
    _check_merge_arguments(mask_logits, scores, labels, is_thing, options)
    return _merge(_mask_quality(mask_logits, mask_threshold), scores, labels, is_thing, options)


def mask_wise_merging_resized(
    mask_logits: Tensor,
    output_size: Tuple[int, int],
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    **options: float,
) -> Tuple[Tensor, List[SegmentInfo]]:
    """:func:`mask_wise_merging` of masks bilinearly resized to ``output_size``.

    The same result as ``mask_wise_merging(F.interpolate(mask_logits[None], output_size,
    mode="bilinear")[0], ...)``, but the masks are resized a few at a time and only their binary
    form is kept: about 4x less memory at full resolution, and faster.

    Args:
        mask_logits (Tensor): (Q, h, w) low-resolution mask values.
        output_size: (H, W) of the panoptic segmentation.
        scores, labels, is_thing: as in :func:`mask_wise_merging`.
        **options: the keyword arguments of :func:`mask_wise_merging`.

    Returns:
        as :func:`mask_wise_merging`.
    """
    options = merge_options(mask_wise_merging, options, "mask_wise_merging")
    _check_merge_arguments(mask_logits, scores, labels, is_thing, options)
    quality = _mask_quality(mask_logits, options["mask_threshold"], tuple(output_size))
    return _merge(quality, scores, labels, is_thing, options)


def merge_options(
    merger: Callable[..., object], overrides: Dict[str, float], context: str
) -> Dict[str, float]:
    """The keyword-only options of a merging function, its defaults filled in.

    Args:
        merger: :func:`mask_wise_merging` or :func:`pixel_wise_argmax`.
        overrides: options to set.
        context: names the caller in the error message.

    Raises:
        ValueError: naming the options ``merger`` does not take.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(merger).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown options {unknown} for {context}; known: {sorted(defaults)}")
    return {**defaults, **overrides}


def _check_merge_arguments(
    mask_logits: Tensor, scores: Tensor, labels: Tensor, is_thing: Tensor, options: Dict
) -> None:
    _check_queries(mask_logits, scores, labels, is_thing)
    _check_unit_interval(
        **{k: v for k, v in options.items() if k.endswith("threshold")},
    )
    if options["alpha"] < 0 or options["beta"] < 0:
        raise ValueError(
            f"alpha and beta must be >= 0, got alpha={options['alpha']}, beta={options['beta']}"
        )


def _merge(
    quality: _Quality,
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    options: Dict[str, float],
) -> Tuple[Tensor, List[SegmentInfo]]:
    """Algorithm 1 on precomputed mask statistics, with the checked keyword options of
    :func:`mask_wise_merging`."""
    binary, areas, mask_scores = quality.binary, quality.areas, quality.mask_scores
    height, width = binary.shape[1:]
    panoptic_seg = torch.zeros(height, width, dtype=torch.int32, device=binary.device)
    if binary.shape[0] == 0:
        return panoptic_seg, []
    # Eq. (6) of the paper
    confidence = scores.to(torch.float32).pow(options["alpha"]) * mask_scores.pow(options["beta"])
    score_threshold = _score_thresholds(
        is_thing, options["thing_score_threshold"], options["stuff_score_threshold"]
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
    segments = _Segments()
    for query in order_list:
        area, isthing, category = areas_list[query], is_thing_list[query], labels_list[query]
        # Only the mask's bounding box can change: work on that window.
        y0, y1 = _extent(quality.rows[query])
        x0, x1 = _extent(quality.cols[query])
        window = (slice(y0, y1), slice(x0, x1))
        free = binary[query][window] & unassigned[window]
        free_area = int(free.count_nonzero())
        overlap = area - free_area
        overlap_threshold = options[
            "thing_overlap_threshold" if isthing else "stuff_overlap_threshold"
        ]
        # the t_keep test of Algorithm 1, written as the authors' code writes it; a mask with
        # nothing left to paint (only possible with an overlap threshold of 1) is skipped too,
        # as a segment without pixels is invalid in COCO panoptic
        if overlap / area > overlap_threshold or free_area == 0:
            continue
        segment_id = segments.id_for(category, isthing, confidence_list[query])
        panoptic_seg[window][free] = segment_id
        unassigned[window] &= ~free
    return panoptic_seg, segments.info


def mask_wise_candidates(
    max_mask_values: Tensor,
    scores: Tensor,
    is_thing: Tensor,
    *,
    alpha: float,
    beta: float,
    thing_score_threshold: float,
    stuff_score_threshold: float,
    mask_threshold: float,
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
        alpha, beta, thing_score_threshold, stuff_score_threshold, mask_threshold: as in
            :func:`mask_wise_merging`.

    Returns:
        Tensor: (Q,) bool, True for the queries to keep.
    """
    # a little slack for float rounding in the resize
    bound = max_mask_values.to(torch.float32).clamp(min=0) * (1 + 1e-5)
    confidence_bound = scores.to(torch.float32).pow(alpha) * bound.pow(beta)
    threshold = _score_thresholds(is_thing, thing_score_threshold, stuff_score_threshold)
    return (confidence_bound >= threshold) & (bound > mask_threshold)


def pixel_wise_argmax(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    *,
    score_threshold: float = 0.25,
    mask_threshold: float = 0.5,
    class_weighted: bool = True,
) -> Tuple[Tensor, List[SegmentInfo]]:
    """The pixel-wise argmax baselines of the paper's Table 7.

    Table 7's "(p*)" variant "considers both class probability and mask prediction probability in
    its pixel-wise argmax strategy [3]" (MaskFormer); its "(p)" is the plain pixel-wise argmax of
    DETR, over the mask values alone. The rule implemented here:

    1. Drop queries with class probability p below ``score_threshold``.
    2. Each pixel takes the remaining query q* = argmax_q p_q * m_q[h, w] ("(p*)",
       ``class_weighted``) or q* = argmax_q m_q[h, w] ("(p)"); ties: lowest index.
    3. The pixel is void if no query remains or m_{q*}[h, w] <= ``mask_threshold`` (the winner's
       own mask does not cover it), as in MaskFormer's panoptic inference.
    4. Every query that wins at least one pixel is a segment, in query order; stuff queries of
       one category share one segment, as in ``mask_wise_merging``. DETR's and MaskFormer's
       extra filters (e.g. dropping segments that keep too little of their mask) are left out:
       they are the "tricks" the paper contrasts its method with.

    Args:
        mask_logits (Tensor): (Q, H, W) float mask values.
        scores (Tensor): (Q,) float class probabilities p.
        labels (Tensor): (Q,) integer category ids.
        is_thing (Tensor): (Q,) bool, True for thing queries.
        score_threshold: minimum class probability of a query, in [0, 1].
        mask_threshold: binarisation threshold of the mask values, in [0, 1].
        class_weighted: weight the mask values by the class probability in the argmax.

    Returns:
        panoptic_seg (Tensor): (H, W) int32 segment ids, 0 = void.
        segments_info (List[dict]): keys ``id``, ``category_id``, ``isthing``, ``score`` (the
            class probability p of the segment's first query).

    Raises:
        ValueError: on mismatched shapes or dtypes or a threshold outside [0, 1].
    """
    _check_queries(mask_logits, scores, labels, is_thing)
    _check_unit_interval(score_threshold=score_threshold, mask_threshold=mask_threshold)

    height, width = mask_logits.shape[1:]
    panoptic_seg = torch.zeros(height, width, dtype=torch.int32, device=mask_logits.device)
    kept = (scores >= score_threshold).nonzero().squeeze(1)  # (Q',) original query indices
    if kept.numel() == 0:
        return panoptic_seg, []

    masks = mask_logits[kept]
    weighted = scores[kept, None, None] * masks if class_weighted else masks
    winner = weighted.argmax(dim=0)  # (H, W) index into kept
    covered = masks.gather(0, winner[None]).squeeze(0) > mask_threshold

    # Map each kept query to its segment id (0 where it wins no pixel).
    segment_of = torch.zeros(len(kept), dtype=torch.int32, device=mask_logits.device)
    segments = _Segments()
    kept_list, labels_list = kept.tolist(), labels.tolist()
    is_thing_list, scores_list = is_thing.tolist(), scores.tolist()
    for local in torch.unique(winner[covered]).tolist():  # sorted, so in query order
        query = kept_list[local]
        segment_of[local] = segments.id_for(
            labels_list[query], is_thing_list[query], scores_list[query]
        )
    panoptic_seg = torch.where(covered, segment_of[winner], panoptic_seg)
    return panoptic_seg, segments.info


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
    mask score sum(m * binary) / (sum(binary) + 1) of ``mask_wise_merging``: the authors' code
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
    _check_queries(mask_logits, scores, labels)
    _check_unit_interval(mask_threshold=mask_threshold)
    if max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")

    quality = _mask_quality(mask_logits, mask_threshold)
    binary, mask_scores = quality.binary, quality.mask_scores
    detection_scores = scores.to(torch.float32).pow(alpha) * mask_scores.pow(beta)
    num_kept = min(max_detections, detection_scores.numel())
    top_scores, top = detection_scores.topk(num_kept, sorted=True)
    masks = binary[top]
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
    _check_queries(mask_logits, scores, labels)
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
