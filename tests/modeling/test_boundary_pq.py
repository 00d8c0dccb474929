"""Boundary PQ (panoptic_segformer/utils/boundary_pq.py) against a slow pixel-loop reference of the
official definition (boundary-iou-api), on hand-made segmentations; no detectron2."""

import math
import pickle

import numpy as np
import pytest
from skips import require

from panoptic_segformer.utils.boundary_pq import (
    BoundaryPQStats,
    boundary_iou,
    boundary_pq_image,
    boundary_width,
    label_boundaries,
    mask_boundary,
)

THING, OTHER_THING, STUFF, OTHER_STUFF = 1, 2, 3, 4
CATEGORIES = {
    THING: {"isthing": 1},
    OTHER_THING: {"isthing": 1},
    STUFF: {"isthing": 0},
    OTHER_STUFF: {"isthing": 0},
}


# ---------------------------------------------------------------- the slow reference


def reference_band(pixels, height, width, dilation):
    """The official ``mask_to_boundary`` by explicit loops: the mask padded with one ring of
    zeros, eroded ``dilation`` times by a 3x3 window (neighbours beyond the padded image are
    skipped, as cv2.erode's default border), cropped; the band is the mask minus the erosion.

    Args:
        pixels: set of (row, column) of the mask.

    Returns:
        set of (row, column).
    """
    rows, cols = height + 2, width + 2
    grid = [[int((i - 1, j - 1) in pixels) for j in range(cols)] for i in range(rows)]
    for _ in range(dilation):
        grid = [
            [
                min(
                    grid[a][b]
                    for a in range(i - 1, i + 2)
                    for b in range(j - 1, j + 2)
                    if 0 <= a < rows and 0 <= b < cols
                )
                for j in range(cols)
            ]
            for i in range(rows)
        ]
    return {(i, j) for (i, j) in pixels if not grid[i + 1][j + 1]}


def reference_boundary_pq(gt_ids, gt_segments, pred_ids, pred_segments, dilation):
    """Boundary PQ counts of one image by loops over pixel sets, following the official
    ``pq_compute_single_core`` with ``iou_type="boundary"``: {category: [iou, tp, fp, fn]}."""
    height, width = gt_ids.shape

    def pixels_of(ids, segment_id):
        return {(i, j) for i in range(height) for j in range(width) if ids[i, j] == segment_id}

    void = pixels_of(gt_ids, 0)
    gt = {s["id"]: pixels_of(gt_ids, s["id"]) for s in gt_segments}
    pred = {s["id"]: pixels_of(pred_ids, s["id"]) for s in pred_segments}
    gt_band = {k: reference_band(v, height, width, dilation) for k, v in gt.items()}
    pred_band = {k: reference_band(v, height, width, dilation) for k, v in pred.items()}

    def void_corrected_iou(g, p, void_pixels):
        return len(g & p) / (len(g) + len(p) - len(g & p) - len(p & void_pixels))

    stats = {}
    gt_matched, pred_matched = set(), set()
    for g in gt_segments:
        for p in pred_segments:
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            if not gt[g["id"]] & pred[p["id"]]:
                continue
            iou = void_corrected_iou(gt[g["id"]], pred[p["id"]], void)
            biou = void_corrected_iou(gt_band[g["id"]], pred_band[p["id"]], void)
            if min(iou, biou) > 0.5:
                counts = stats.setdefault(g["category_id"], [0.0, 0, 0, 0])
                counts[0] += min(iou, biou)
                counts[1] += 1
                gt_matched.add(g["id"])
                pred_matched.add(p["id"])
    for g in gt_segments:
        if g["id"] not in gt_matched and not g["iscrowd"]:
            stats.setdefault(g["category_id"], [0.0, 0, 0, 0])[3] += 1
    for p in pred_segments:
        if p["id"] in pred_matched:
            continue
        ignored = len(pred[p["id"]] & void)
        for g in gt_segments:
            if g["iscrowd"] and g["category_id"] == p["category_id"]:
                ignored += len(pred[p["id"]] & gt[g["id"]])
        if ignored / len(pred[p["id"]]) <= 0.5:
            stats.setdefault(p["category_id"], [0.0, 0, 0, 0])[2] += 1
    return stats


def assert_matches_reference(gt_ids, gt_segments, pred_ids, pred_segments, ratio):
    ours = boundary_pq_image(gt_ids, gt_segments, pred_ids, pred_segments, CATEGORIES, ratio)
    dilation = boundary_width(*gt_ids.shape, dilation_ratio=ratio)
    reference = reference_boundary_pq(gt_ids, gt_segments, pred_ids, pred_segments, dilation)
    counts = {c: [s.iou, s.tp, s.fp, s.fn] for c, s in ours.per_category.items()}
    assert counts.keys() == reference.keys()
    for category, (iou, tp, fp, fn) in reference.items():
        # the IoU sums differ at most by the order of the float additions
        assert counts[category] == [pytest.approx(iou, rel=1e-12, abs=1e-15), tp, fp, fn]
    return ours


# ---------------------------------------------------------------- hand-made scenes


def paint(height, width, boxes):
    """An id map with the boxes ``(id, row0, row1, col0, col1)`` painted in order (0 = VOID)."""
    ids = np.zeros((height, width), dtype=np.int64)
    for segment_id, r0, r1, c0, c1 in boxes:
        ids[r0:r1, c0:c1] = segment_id
    return ids


def gt_info(*segments):
    """Ground-truth segments from ``(id, category_id[, iscrowd])``."""
    return [
        {"id": s[0], "category_id": s[1], "iscrowd": s[2] if len(s) > 2 else 0} for s in segments
    ]


def pred_info(*segments):
    return [{"id": i, "category_id": c} for i, c in segments]


def square_on_stuff(shift):
    """A 40x40 image: stuff everywhere but a 16x16 thing square (rows and columns 12..27),
    the prediction the same with the square moved ``shift`` columns to the right."""
    gt = paint(40, 40, [(7, 0, 40, 0, 40), (5, 12, 28, 12, 28)])
    pred = paint(40, 40, [(3, 0, 40, 0, 40), (9, 12, 28, 12 + shift, 28 + shift)])
    return gt, gt_info((7, STUFF), (5, THING)), pred, pred_info((3, STUFF), (9, THING))


def random_scene(seed, height=24, width=32):
    """Random boxes of things, stuff, a crowd and VOID as ground truth; a prediction that keeps,
    shifts, grows, relabels or drops each, plus extra segments."""
    rng = np.random.default_rng(seed)
    gt_boxes, gt_segments, pred_boxes, pred_segments = [], [], [], []
    for k in range(9):
        r0, c0 = int(rng.integers(0, height - 3)), int(rng.integers(0, width - 3))
        r1, c1 = r0 + int(rng.integers(2, height // 2)), c0 + int(rng.integers(2, width // 2))
        category = int(rng.choice(list(CATEGORIES)))
        crowd = int(k == 4)
        gt_boxes.append((10 + k, r0, r1, c0, c1))
        gt_segments.append((10 + k, category, crowd))
        change = int(rng.integers(0, 5))
        if change == 4:  # missed
            continue
        dr, dc = (0, 0) if change == 0 else (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
        grow = int(change == 2)
        if change == 3:
            category = int(rng.choice(list(CATEGORIES)))
        pred_boxes.append((20 + k, max(r0 + dr, 0), r1 + dr + grow, max(c0 + dc, 0), c1 + dc))
        pred_segments.append((20 + k, category))
    pred_boxes.append((40, 0, height // 3, 0, width // 4))  # an extra, partly on other segments
    pred_segments.append((40, STUFF))
    gt_boxes.append((0, height - 4, height, width - 6, width))  # VOID corner
    gt, pred = paint(height, width, gt_boxes), paint(height, width, pred_boxes)
    gt_segments = [s for s in gt_segments if (gt == s[0]).any()]
    pred_segments = [s for s in pred_segments if (pred == s[0]).any()]
    return gt, gt_info(*gt_segments), pred, pred_info(*pred_segments)


# ---------------------------------------------------------------- tests


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width(100, 100) == 3  # round(0.02 * 141.4) = round(2.83)
    assert boundary_width(427, 640) == 15  # a COCO image: round(0.02 * 769.4) = round(15.39)
    assert boundary_width(1024, 2048) == 46  # Cityscapes: round(45.8)
    assert boundary_width(5, 5) == 1  # round(0.14) = 0, raised to the minimum of 1
    assert boundary_width(40, 40, dilation_ratio=0.05) == 3  # round(2.83)
    with pytest.raises(ValueError, match="image size must be positive, got 0 x 5"):
        boundary_width(0, 5)
    with pytest.raises(ValueError, match="dilation_ratio must be positive, got -0.1"):
        boundary_width(5, 5, dilation_ratio=-0.1)


def test_band_hand_values():
    # the whole image: a ring of width 3 along the border (it cuts the mask)
    assert mask_boundary(np.ones((40, 40), bool), 0.05).sum() == 40 * 40 - 34 * 34
    # a 10x10 square inside, d = 1: its one-pixel outline, 100 - 8 * 8
    square = np.zeros((30, 30), bool)
    square[10:20, 10:20] = True
    band = mask_boundary(square)
    assert band.sum() == 36 and not band[11:19, 11:19].any() and band[10, 10:20].all()
    # thin objects are all boundary: a 1-pixel line and a 2-pixel bar, at d = 1 and d = 4
    for ratio in (0.02, 0.1):
        for rows in (slice(15, 16), slice(15, 17)):
            thin = np.zeros((30, 30), bool)
            thin[rows, 3:27] = True
            assert np.array_equal(mask_boundary(thin, ratio), thin)
    assert not mask_boundary(np.zeros((30, 30), bool)).any()


@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.2])
def test_bands_match_the_reference(ratio):
    # random blobs, many cut by the image border, each band against the pixel loops
    rng = np.random.default_rng(0)
    labels = (rng.random((18, 22)) < 0.5).astype(np.int64)
    labels[6:12, 8:20] = 2
    labels[:, :3] = 3  # a stripe along the left border
    dilation = boundary_width(18, 22, dilation_ratio=ratio)
    union = label_boundaries(labels, dilation)
    for value in range(4):
        mask = labels == value
        pixels = set(zip(*np.nonzero(mask)))
        expected = reference_band(pixels, 18, 22, dilation)
        assert set(zip(*np.nonzero(mask_boundary(mask, ratio)))) == expected
        assert set(zip(*np.nonzero(union & mask))) == expected


def test_bands_match_the_official_opencv_recipe():
    cv2 = require("cv2", "the official recipe uses OpenCV")
    rng = np.random.default_rng(1)
    for ratio in (0.02, 0.05):
        mask = (rng.random((90, 120)) < 0.6).astype(np.uint8)
        mask[20:70, 30:100] = 1
        d = boundary_width(90, 120, dilation_ratio=ratio)
        padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
        assert np.array_equal(mask_boundary(mask, ratio), (mask - eroded).astype(bool))


def test_boundary_iou_of_a_square_moved_by_one_pixel():
    gt, _, pred, _ = square_on_stuff(shift=1)
    gt_mask, pred_mask = gt == 5, pred == 9
    # d = 3 (40x40, ratio 0.05): each band is 16^2 - 10^2 = 156 pixels; they share the square's
    # common part (16 x 15 = 240) less both interiors (rows 15..24, columns 15..25: 110), 130:
    # boundary IoU 130 / (156 + 156 - 130) = 5/7, below the mask IoU 240 / 272 = 15/17
    assert boundary_iou(gt_mask, pred_mask, 0.05) == pytest.approx(5 / 7, rel=1e-12)
    # d = 1: bands of 16^2 - 14^2 = 60 pixels share only the top and bottom rows, 2 x 15:
    # 30 / (60 + 60 - 30) = 1/3
    assert boundary_iou(gt_mask, pred_mask, 0.02) == pytest.approx(1 / 3, rel=1e-12)
    # a 2-pixel-wide bar is all boundary: boundary IoU = mask IoU = 28 / 32
    bar = np.zeros((30, 30), bool)
    bar[10:12, 3:18] = True
    assert boundary_iou(bar, np.roll(bar, 1, axis=1)) == pytest.approx(28 / 32, rel=1e-12)
    with pytest.raises(ValueError, match=r"mask shapes differ: \(30, 30\) and \(30, 31\)"):
        boundary_iou(bar, np.zeros((30, 31), bool))
    with pytest.raises(ValueError, match="two empty masks"):
        boundary_iou(np.zeros((3, 3)), np.zeros((3, 3)))


def test_shifted_square_scores_min_of_mask_and_boundary_iou():
    ours = assert_matches_reference(*square_on_stuff(shift=1), ratio=0.05)
    thing = ours[THING]
    assert (thing.tp, thing.fp, thing.fn) == (1, 0, 0)
    assert thing.iou == pytest.approx(5 / 7, rel=1e-12)  # the hand value above, not 15/17
    # at d = 1 the combined IoU 1/3 decides the matching (as the official code): the mask IoU
    # 15/17 would match, the pair does not
    ours = assert_matches_reference(*square_on_stuff(shift=1), ratio=0.02)
    assert (ours[THING].tp, ours[THING].fp, ours[THING].fn) == (0, 1, 1)


def test_perfect_prediction_scores_100():
    gt, gt_segments, _, _ = random_scene(seed=3)
    pred_segments = pred_info(*[(s["id"], s["category_id"]) for s in gt_segments])
    ours = assert_matches_reference(gt, gt_segments, gt, pred_segments, 0.02)
    summary = ours.summarize(CATEGORIES)
    for name in ("All", "Things", "Stuff"):
        assert summary[name]["n"] > 0
        assert summary[name]["pq"] == summary[name]["sq"] == summary[name]["rq"] == 1.0
    # the crowd segment predicted as a segment of its category is ignored, not a false positive
    assert sum(s.fp for s in ours.per_category.values()) == 0


@pytest.mark.parametrize("ratio", [0.02, 0.1])
def test_thin_structures_match_the_reference(ratio):
    gt = paint(
        24, 32, [(8, 0, 24, 0, 32), (1, 5, 6, 2, 30), (2, 10, 12, 4, 28), (3, 15, 22, 20, 21)]
    )
    pred = paint(
        24, 32, [(9, 0, 24, 0, 32), (4, 5, 6, 3, 30), (5, 11, 13, 4, 28), (6, 15, 22, 20, 22)]
    )
    ours = assert_matches_reference(
        gt,
        gt_info((8, STUFF), (1, THING), (2, THING), (3, OTHER_THING)),
        pred,
        pred_info((9, STUFF), (4, THING), (5, THING), (6, OTHER_THING)),
        ratio,
    )
    assert ours[THING].tp == 1  # the line shortened by one pixel matches, the bar moved does not


@pytest.mark.parametrize("ratio", [0.02, 0.1])
def test_segments_cut_by_the_image_border_match_the_reference(ratio):
    # stuff along the top and left borders, things in three corners, VOID along the bottom
    gt = paint(
        20,
        28,
        [
            (1, 0, 20, 0, 28),
            (2, 0, 8, 0, 28),
            (3, 12, 20, 20, 28),
            (4, 0, 5, 22, 28),
            (0, 18, 20, 0, 12),
        ],
    )
    pred = paint(
        20,
        28,
        [
            (6, 0, 20, 0, 28),
            (7, 0, 7, 0, 28),
            (8, 12, 20, 21, 28),
            (9, 0, 6, 22, 28),
            (5, 17, 20, 0, 9),
        ],
    )
    assert_matches_reference(
        gt,
        gt_info((1, OTHER_STUFF), (2, STUFF), (3, THING), (4, THING)),
        pred,
        pred_info((6, OTHER_STUFF), (7, STUFF), (8, THING), (9, THING), (5, OTHER_THING)),
        ratio,
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_scenes_match_the_reference(seed):
    assert_matches_reference(*random_scene(seed), ratio=0.02 if seed % 2 else 0.1)


def test_void_is_left_out_of_both_unions():
    # a 10x10 thing on VOID, predicted 4 columns too wide (all on VOID), d = 1 (40x40): mask IoU
    # 100 / (100 + 140 - 100 - 40) = 1; the outlines (36 and 44 pixels) share the top, bottom
    # and left sides (28), the predicted one has 16 pixels on VOID: 28 / (36 + 44 - 28 - 16)
    gt = paint(40, 40, [(5, 10, 20, 10, 20)])
    pred = paint(40, 40, [(9, 10, 20, 10, 24)])
    ours = assert_matches_reference(gt, gt_info((5, THING)), pred, pred_info((9, THING)), 0.02)
    assert ours[THING].tp == 1 and ours[THING].iou == pytest.approx(7 / 9, rel=1e-12)


def test_void_and_crowd_are_not_false_positives():
    gt = paint(30, 30, [(1, 0, 30, 0, 30), (0, 0, 10, 0, 10), (2, 15, 30, 15, 30)])
    segments = gt_info((1, STUFF), (2, THING, 1))
    cases = {  # prediction box -> false positives of its category
        (0, 10, 0, 12): 0,  # 100 of 120 pixels on VOID
        (15, 30, 12, 30): 0,  # 225 of 270 on the crowd of its category
        (0, 10, 0, 30): 1,  # 100 of 300 on VOID
    }
    for (r0, r1, c0, c1), fp in cases.items():
        pred = paint(30, 30, [(3, r0, r1, c0, c1)])
        ours = assert_matches_reference(gt, segments, pred, pred_info((3, THING)), 0.02)
        assert ours[THING].fp == fp and ours[STUFF].fn == 1
    # on a crowd of another category, it is a false positive
    pred = paint(30, 30, [(3, 15, 30, 12, 30)])
    ours = boundary_pq_image(gt, segments, pred, pred_info((3, OTHER_THING)), CATEGORIES)
    assert ours[OTHER_THING].fp == 1


def test_summary_layout_and_missing_kinds():
    stats = BoundaryPQStats()
    stats[STUFF].iou, stats[STUFF].tp, stats[STUFF].fp = 1.5, 2, 2
    stats[OTHER_STUFF].fn = 1
    copy = pickle.loads(pickle.dumps(stats))  # detectron2's comm.gather pickles it
    copy += stats
    assert (copy[STUFF].iou, copy[STUFF].tp, copy[STUFF].fp, copy[OTHER_STUFF].fn) == (3.0, 4, 4, 2)
    summary = stats.summarize(CATEGORIES)
    assert set(summary) == {"All", "Things", "Stuff", "per_class"}
    # STUFF: PQ 1.5 / (2 + 1) = 0.5, SQ 0.75, RQ 2/3; OTHER_STUFF: all 0
    assert summary["per_class"][STUFF] == pytest.approx({"pq": 0.5, "sq": 0.75, "rq": 2 / 3})
    assert summary["Stuff"] == pytest.approx({"pq": 0.25, "sq": 0.375, "rq": 1 / 3, "n": 2})
    assert summary["All"] == summary["Stuff"]
    # no thing category occurs: NaN, not panopticapi's ZeroDivisionError
    assert summary["Things"]["n"] == 0
    assert all(math.isnan(summary["Things"][k]) for k in ("pq", "sq", "rq"))
    assert summary["per_class"][THING] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_bad_inputs_are_named():
    gt, gt_segments, pred, pred_segments = square_on_stuff(shift=0)
    with pytest.raises(ValueError, match=r"got \(40, 40\) and \(40, 39\)"):
        boundary_pq_image(gt, gt_segments, pred[:, 1:], pred_segments, CATEGORIES)
    with pytest.raises(ValueError, match=r"predicted ids \[9\] are in the map but not listed"):
        boundary_pq_image(gt, gt_segments, pred, pred_segments[:1], CATEGORIES)
    extra = pred_segments + pred_info((11, THING))
    with pytest.raises(ValueError, match=r"predicted segments \[11\] are listed but absent"):
        boundary_pq_image(gt, gt_segments, pred, extra, CATEGORIES)
    with pytest.raises(ValueError, match=r"predicted segments have unknown category ids \[99\]"):
        boundary_pq_image(gt, gt_segments, pred, pred_info((3, STUFF), (9, 99)), CATEGORIES)
    with pytest.raises(ValueError, match=r"ground-truth segment ids repeat: \[7\]"):
        boundary_pq_image(gt, gt_segments + gt_segments[:1], pred, pred_segments, CATEGORIES)
    with pytest.raises(ValueError, match="predicted segment id 0 is reserved for VOID"):
        boundary_pq_image(gt, gt_segments, pred, pred_info((0, STUFF)), CATEGORIES)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\*\*31\), got \[-1, 0\]"):
        label_boundaries(-np.eye(3, dtype=np.int64), 1)
