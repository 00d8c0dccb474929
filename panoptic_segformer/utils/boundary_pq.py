"""Boundary PQ (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021): panoptic quality in which a pair's IoU is min(mask IoU, boundary IoU).

Plain numpy and scipy; no detectron2 (its evaluator is
:class:`panoptic_segformer.d2.evaluation.BoundaryPanopticEvaluator`). The definitions are those of
the authors' boundary-iou-api (github.com/bowenc0221/boundary-iou-api):

* Boundary width (``utils/boundary_utils.py``, ``mask_to_boundary``):
  ``d = max(1, round(dilation_ratio * sqrt(H**2 + W**2)))`` pixels, ``dilation_ratio`` 0.02.
* Boundary band of a segment (same function): the mask minus its erosion, the erosion being
  ``d`` iterations of a 3x3 erosion of the mask padded with one ring of zeros. That is the
  segment's pixels within Chebyshev distance ``d`` of a pixel outside it, the outside of the
  image counting as outside (pixels cut by the image border are boundary). Here one
  ``(2d+1) x (2d+1)`` minimum and maximum filter of the whole label map gives the bands of all
  segments at once.
* Boundary PQ (``coco_panoptic_api/evaluation.py``, ``pq_compute_single_core``), per image: a
  ground-truth segment ``g`` and a predicted ``p`` of the same category (``g`` not crowd) have
  ``IoU = |g & p| / (|g| + |p| - |g & p| - |p & VOID|)`` and the boundary IoU written the same way
  on their bands (VOID = ground-truth id 0); they match when ``min(IoU, boundary IoU) > 0.5``
  (the combined IoU decides the matching, not the mask IoU alone), and the combined IoU is what
  SQ sums. Unmatched non-crowd ground truth is a false negative; an unmatched prediction is a
  false positive unless more than half of it lies on VOID or on crowd ground truth of its
  category. Per category ``PQ = sum of matched IoUs / (TP + FP / 2 + FN / 2)``; a summary averages
  the categories that occur (TP + FP + FN > 0), as panopticapi's ``pq_compute``.

Differences from the official code, none of which changes a COCO result: areas are counted in the
id maps (panopticapi reads ground-truth areas from the json; COCO keeps them equal), a prediction
is tested against all crowd segments of its category (panopticapi keeps the last one; COCO has at
most one per category and image), bands are computed without the official's sentinel id (which
can collide with a segment id), and a summary with no category of a kind (e.g. no thing in any
image) gives NaN for it where panopticapi's ``pq_average`` divides by zero (NaN, as detectron2's
COCOEvaluator reports a category without ground truth).
"""

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "DILATION_RATIO",
    "VOID",
    "BoundaryPQStats",
    "CategoryStats",
    "boundary_iou",
    "boundary_pq_image",
    "boundary_width",
    "label_boundaries",
    "mask_boundary",
]

VOID = 0  # unlabelled pixels of a COCO panoptic id map
DILATION_RATIO = 0.02  # boundary width as a fraction of the image diagonal (Cheng et al.)
OUTSIDE = -1  # label of the pixels beyond the image border (no segment has it)

Segment = Mapping[str, object]  # "id", "category_id" and, for ground truth, "iscrowd"


def boundary_width(height: int, width: int, dilation_ratio: float = DILATION_RATIO) -> int:
    """The band width ``d`` in pixels: ``dilation_ratio`` times the image diagonal, rounded
    (Python's round, half to even, as the official code), at least 1."""
    if height <= 0 or width <= 0:
        raise ValueError(f"the image size must be positive, got {height} x {width}")
    if dilation_ratio <= 0:
        raise ValueError(f"dilation_ratio must be positive, got {dilation_ratio}")
    return max(1, int(round(dilation_ratio * math.sqrt(height**2 + width**2))))


def label_boundaries(labels: np.ndarray, dilation: int) -> np.ndarray:
    """The pixels within Chebyshev distance ``dilation`` of a pixel with another label or of the
    image border: the union of every label's boundary band.

    Args:
        labels (ndarray): (H, W) non-negative integer labels.
        dilation: the band width ``d`` (see :func:`boundary_width`).

    Returns:
        (H, W) bool.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D map, got shape {labels.shape}")
    if dilation < 1:
        raise ValueError(f"dilation must be at least 1, got {dilation}")
    if labels.size and (labels.min() < 0 or labels.max() >= 2**31):
        raise ValueError(
            f"labels must lie in [0, 2**31), got [{labels.min()}, {labels.max()}]; map ids to "
            "dense labels first"
        )
    labels = labels.astype(np.int32)
    size = 2 * dilation + 1
    # pixels beyond the border read OUTSIDE, like the official ring of zeros: cv2.erode's own
    # border is neutral, so a window crossing the image border meets that ring either way
    lowest = ndimage.minimum_filter(labels, size=size, mode="constant", cval=OUTSIDE)
    highest = ndimage.maximum_filter(labels, size=size, mode="constant", cval=OUTSIDE)
    return (lowest != labels) | (highest != labels)


def mask_boundary(mask: np.ndarray, dilation_ratio: float = DILATION_RATIO) -> np.ndarray:
    """The boundary band of a binary mask (``G_d & G`` of the paper; the official
    ``mask_to_boundary``), of width :func:`boundary_width` of the mask's size.

    Args:
        mask (ndarray): (H, W) bool or 0/1.

    Returns:
        (H, W) bool.
    """
    mask = np.asarray(mask).astype(bool)
    dilation = boundary_width(*mask.shape, dilation_ratio=dilation_ratio)
    return mask & label_boundaries(mask.astype(np.int32), dilation)


def boundary_iou(
    gt_mask: np.ndarray, pred_mask: np.ndarray, dilation_ratio: float = DILATION_RATIO
) -> float:
    """Boundary IoU of two (H, W) binary masks: the IoU of their boundary bands (no VOID term).

    Raises:
        ValueError: if the shapes differ or both masks are empty.
    """
    if np.shape(gt_mask) != np.shape(pred_mask):
        raise ValueError(f"mask shapes differ: {np.shape(gt_mask)} and {np.shape(pred_mask)}")
    gt_band = mask_boundary(gt_mask, dilation_ratio)
    pred_band = mask_boundary(pred_mask, dilation_ratio)
    union = np.count_nonzero(gt_band | pred_band)
    if union == 0:
        raise ValueError("boundary IoU of two empty masks is undefined")
    return np.count_nonzero(gt_band & pred_band) / union


@dataclass
class CategoryStats:
    """Boundary PQ counts of one category: ``iou`` sums min(IoU, boundary IoU) over the TPs."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: "CategoryStats") -> "CategoryStats":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class BoundaryPQStats:
    """Per-category :class:`CategoryStats`, summed over images with ``+=`` (picklable, so
    detectron2's ``comm.gather`` can collect it from every process)."""

    def __init__(self) -> None:
        self.per_category: Dict[int, CategoryStats] = defaultdict(CategoryStats)

    def __getitem__(self, category_id: int) -> CategoryStats:
        return self.per_category[category_id]

    def __iadd__(self, other: "BoundaryPQStats") -> "BoundaryPQStats":
        for category_id, stats in other.per_category.items():
            self.per_category[category_id] += stats
        return self

    def average(
        self, categories: Mapping[int, Mapping[str, object]], isthing: Optional[bool] = None
    ) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]]]:
        """PQ, SQ, RQ averaged over the categories that occur, as panopticapi's ``pq_average``.

        Args:
            categories: category id -> info with ``isthing``.
            isthing: only things (True), only stuff (False) or all (None).

        Returns:
            ``{"pq", "sq", "rq", "n"}`` (fractions; NaN when no category of the kind occurs,
            ``n`` = categories averaged) and per category ``{"pq", "sq", "rq"}`` (zeros for
            one that does not occur).
        """
        totals, per_class = np.zeros(3), {}
        n = 0
        for category_id, info in categories.items():
            if isthing is not None and bool(info["isthing"]) != isthing:
                continue
            stats = self.per_category.get(category_id, CategoryStats())
            if stats.tp + stats.fp + stats.fn == 0:
                per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denominator = stats.tp + 0.5 * stats.fp + 0.5 * stats.fn
            values = (
                stats.iou / denominator,
                stats.iou / stats.tp if stats.tp else 0.0,
                stats.tp / denominator,
            )
            per_class[category_id] = dict(zip(("pq", "sq", "rq"), values))
            totals += values
        pq, sq, rq = (float(v) for v in (totals / n if n else np.full(3, math.nan)))
        return {"pq": pq, "sq": sq, "rq": rq, "n": n}, per_class

    def summarize(self, categories: Mapping[int, Mapping[str, object]]) -> Dict[str, object]:
        """panopticapi's ``pq_compute`` layout: ``"All"``, ``"Things"``, ``"Stuff"`` (each
        ``{"pq", "sq", "rq", "n"}``, fractions) and ``"per_class"`` (of ``"All"``)."""
        results: Dict[str, object] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = self.average(categories, isthing)
            if isthing is None:
                results["per_class"] = per_class
        return results


def _segment_ids(segments: Sequence[Segment], what: str) -> np.ndarray:
    """The ``id`` of each segment, in order; raises on VOID or repeated ids."""
    ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    if (ids == VOID).any():
        raise ValueError(f"{what} segment id {VOID} is reserved for VOID")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what} segment ids repeat: {unique[counts > 1].tolist()}")
    return ids


def _dense_labels(id_map: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Maps an id map to 0 (VOID), i + 1 (segment_ids[i]) and len(segment_ids) + 1 (any other
    id)."""
    n = len(segment_ids)
    dense = np.full(id_map.shape, n + 1, dtype=np.int64)
    if n:
        order = np.argsort(segment_ids)
        position = np.searchsorted(segment_ids[order], id_map).clip(max=n - 1)
        found = segment_ids[order][position] == id_map
        dense[found] = order[position[found]] + 1
    dense[id_map == VOID] = 0
    return dense


def _pair_counts(gt: np.ndarray, n_gt: int, pred: np.ndarray, n_pred: int) -> np.ndarray:
    """(n_gt + 2, n_pred + 2) pixel counts of every (ground-truth, predicted) dense label pair."""
    pairs = gt.ravel() * (n_pred + 2) + pred.ravel()
    counts = np.bincount(pairs, minlength=(n_gt + 2) * (n_pred + 2))
    return counts.reshape(n_gt + 2, n_pred + 2)


def _bands(dense: np.ndarray, n: int, dilation: int) -> np.ndarray:
    """A dense label map with each segment's pixels off its boundary band moved to the "other"
    label n + 1 (VOID stays VOID)."""
    keep = label_boundaries(dense, dilation) | (dense == VOID)
    return np.where(keep, dense, n + 1)


def _void_corrected_iou(counts: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """IoU of every (ground-truth, predicted) segment pair from their pair counts, the predicted
    pixels on VOID left out of the union (panopticapi); 0 where not ``candidates``.

    Args:
        counts (ndarray): (G + 2, P + 2) from :func:`_pair_counts`.
        candidates (ndarray): (G, P) bool.

    Returns:
        (G, P) float.
    """
    intersection = counts[1:-1, 1:-1]  # (G, P): without VOID and other labels
    gt_area = counts.sum(axis=1)[1:-1]
    pred_area = counts.sum(axis=0)[1:-1]
    union = gt_area[:, None] + pred_area[None, :] - intersection - counts[0, 1:-1][None, :]
    iou = np.zeros(intersection.shape)
    np.divide(intersection, union, out=iou, where=candidates)
    return iou


def boundary_pq_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Segment],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Segment],
    categories: Iterable[int],
    dilation_ratio: float = DILATION_RATIO,
) -> BoundaryPQStats:
    """Boundary PQ counts of one image (see the module docstring for the definition).

    Args:
        gt_ids (ndarray): (H, W) integer ground-truth segment ids, 0 = VOID.
        gt_segments: ``id``, ``category_id`` and ``iscrowd`` of each ground-truth segment; ids
            in ``gt_ids`` that are not listed match nothing.
        pred_ids (ndarray): (H, W) integer predicted segment ids, 0 = VOID.
        pred_segments: ``id`` and ``category_id`` of each predicted segment.
        categories: the known category ids.
        dilation_ratio: boundary width as a fraction of the image diagonal.

    Returns:
        The image's counts, to be summed over images and summarized.

    Raises:
        ValueError: if the shapes differ, an id repeats or is 0, a predicted id of the map is
            not listed or a listed one is absent from the map, or a category is unknown.
    """
    gt_ids, pred_ids = np.asarray(gt_ids, dtype=np.int64), np.asarray(pred_ids, dtype=np.int64)
    if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
        raise ValueError(
            f"ground truth and prediction must be id maps of one shape, got {gt_ids.shape} and "
            f"{pred_ids.shape}"
        )
    categories = set(categories)
    for what, segments in (("ground-truth", gt_segments), ("predicted", pred_segments)):
        unknown = sorted({s["category_id"] for s in segments} - categories)
        if unknown:
            raise ValueError(f"{what} segments have unknown category ids {unknown}")
    gt_list = _segment_ids(gt_segments, "ground-truth")
    pred_list = _segment_ids(pred_segments, "predicted")
    n_gt, n_pred = len(gt_list), len(pred_list)
    gt, pred = _dense_labels(gt_ids, gt_list), _dense_labels(pred_ids, pred_list)
    unlisted = np.unique(pred_ids[pred == n_pred + 1])
    if unlisted.size:
        raise ValueError(f"predicted ids {unlisted.tolist()} are in the map but not listed")
    counts = _pair_counts(gt, n_gt, pred, n_pred)
    pred_area = counts.sum(axis=0)[1:-1]
    if (pred_area == 0).any():
        missing = pred_list[pred_area == 0].tolist()
        raise ValueError(f"predicted segments {missing} are listed but absent from the map")

    dilation = boundary_width(*gt.shape, dilation_ratio=dilation_ratio)
    band_counts = _pair_counts(
        _bands(gt, n_gt, dilation), n_gt, _bands(pred, n_pred, dilation), n_pred
    )

    gt_category = np.array([s["category_id"] for s in gt_segments], dtype=np.int64)
    pred_category = np.array([s["category_id"] for s in pred_segments], dtype=np.int64)
    crowd = np.array([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=bool)
    same_category = gt_category[:, None] == pred_category[None, :]  # (G, P)
    candidates = same_category & ~crowd[:, None] & (counts[1:-1, 1:-1] > 0)
    combined = np.minimum(
        _void_corrected_iou(counts, candidates), _void_corrected_iou(band_counts, candidates)
    )
    matched = candidates & (combined > 0.5)  # (G, P): at most one True per row and column

    stats = BoundaryPQStats()
    for g, p in zip(*np.nonzero(matched)):
        stats[int(gt_category[g])].tp += 1
        stats[int(gt_category[g])].iou += float(combined[g, p])
    for g in np.nonzero(~matched.any(axis=1) & ~crowd)[0]:
        stats[int(gt_category[g])].fn += 1
    # an unmatched prediction mostly on VOID or on crowd of its category is no false positive
    on_crowd = (counts[1:-1, 1:-1] * (same_category & crowd[:, None])).sum(axis=0)
    ignored = (counts[0, 1:-1] + on_crowd) / pred_area > 0.5
    for p in np.nonzero(~matched.any(axis=0) & ~ignored)[0]:
        stats[int(pred_category[p])].fp += 1
    return stats
