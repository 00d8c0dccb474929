"""Post-processing: mask-wise merging against a loop transcription of Algorithm 1, its rules one at
a time, the pixel-wise argmax baseline, instance results, the semantic map and input errors."""

import dataclasses

import pytest
import torch

from panoptic_segformer.modeling.postprocessing import (
    MaskWiseOptions,
    PixelArgmaxOptions,
    instance_results,
    mask_statistics,
    mask_wise_candidates,
    mask_wise_merging,
    mask_wise_merging_resized,
    pixel_wise_argmax,
    semantic_map,
)


def reference_merging(
    masks,
    scores,
    labels,
    is_thing,
    alpha=1.0,
    beta=2.0,
    thing_score_threshold=0.25,
    stuff_score_threshold=0.25,
    thing_overlap_threshold=0.4,
    stuff_overlap_threshold=0.2,
    mask_threshold=0.5,
):
    """Algorithm 1 with the authors' details, one pixel at a time in float64 Python numbers.

    Also returns the painted queries and the number of queries dropped by the overlap rule.
    """
    num_queries, height, width = masks.shape
    values = masks.double().tolist()
    confidence = []
    for q in range(num_queries):
        inside = [v for row in values[q] for v in row if v > mask_threshold]
        mask_score = sum(inside) / (len(inside) + 1)
        confidence.append(float(scores[q]) ** alpha * mask_score**beta)
    order = sorted(range(num_queries), key=lambda q: -confidence[q])  # stable: ties by index
    seg = [[0] * width for _ in range(height)]
    infos, stuff_ids, painted, overlap_dropped = [], {}, [], 0
    for q in order:
        thing = bool(is_thing[q])
        if confidence[q] < (thing_score_threshold if thing else stuff_score_threshold):
            continue
        pixels = [
            (h, w) for h in range(height) for w in range(width) if values[q][h][w] > mask_threshold
        ]
        if not pixels:
            continue
        free = [(h, w) for h, w in pixels if seg[h][w] == 0]
        overlap_threshold = thing_overlap_threshold if thing else stuff_overlap_threshold
        if (len(pixels) - len(free)) / len(pixels) > overlap_threshold or not free:
            overlap_dropped += 1
            continue
        painted.append(q)
        category = int(labels[q])
        if not thing and category in stuff_ids:
            segment_id = stuff_ids[category]
        else:
            segment_id = len(infos) + 1
            infos.append((segment_id, category, thing, confidence[q]))
            if not thing:
                stuff_ids[category] = segment_id
        for h, w in free:
            seg[h][w] = segment_id
    return torch.tensor(seg, dtype=torch.int32), infos, painted, overlap_dropped


def random_case(seed, num_queries=12, height=16, width=24):
    """Overlapping rectangles of high values on a low, sparse background; things and stuff mixed,
    with repeated stuff categories."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(num_queries, height, width, generator=gen) * 0.6
    masks *= torch.rand(num_queries, height, width, generator=gen) < 0.3
    for q in range(num_queries):
        y0 = int(torch.randint(0, height - 3, (1,), generator=gen))
        x0 = int(torch.randint(0, width - 3, (1,), generator=gen))
        # at most a third of the image per side, so that several masks survive
        y1 = y0 + int(torch.randint(3, min(height // 3, height - y0) + 1, (1,), generator=gen))
        x1 = x0 + int(torch.randint(3, min(width // 3, width - x0) + 1, (1,), generator=gen))
        block = masks[q, y0:y1, x0:x1]
        masks[q, y0:y1, x0:x1] = 0.5 + torch.rand(block.shape, generator=gen)
    scores = 0.3 + 0.7 * torch.rand(num_queries, generator=gen)
    is_thing = torch.arange(num_queries) % 2 == 0
    labels = torch.where(
        is_thing, torch.arange(num_queries) % 3, 10 + torch.arange(num_queries) % 2
    )
    return masks, scores, labels, is_thing


def box_mask(height, width, rows, cols, value=1.0):
    mask = torch.zeros(height, width)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = value
    return mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha,beta", [(1.0, 2.0), (2.0, 1.0)])
def test_mask_wise_merging_matches_loop_reference(seed, alpha, beta):
    masks, scores, labels, is_thing = random_case(seed)
    options = MaskWiseOptions(alpha=alpha, beta=beta)
    seg, infos = mask_wise_merging(masks, scores, labels, is_thing, options)
    ref_seg, ref_infos, _, _ = reference_merging(masks, scores, labels, is_thing, alpha, beta)
    assert len(ref_infos) >= 3  # the case exercises painting, not only skipping
    assert seg.dtype == torch.int32 and seg.shape == (16, 24)
    assert torch.equal(seg, ref_seg)
    assert [(i["id"], i["category_id"], i["isthing"]) for i in infos] == [r[:3] for r in ref_infos]
    assert [i["score"] for i in infos] == pytest.approx([r[3] for r in ref_infos], rel=1e-5)


def test_random_cases_exercise_every_rule():
    """Over the seeded cases, the reference drops queries for overlap and merges stuff queries."""
    overlap_cases = merge_cases = 0
    for seed in range(6):
        masks, scores, labels, is_thing = random_case(seed)
        _, infos, painted, overlap_dropped = reference_merging(masks, scores, labels, is_thing)
        stuff_painted = [q for q in painted if not is_thing[q]]
        stuff_segments = [info for info in infos if not info[2]]
        overlap_cases += overlap_dropped > 0
        merge_cases += len(stuff_painted) > len(stuff_segments)
    assert overlap_cases >= 3
    assert merge_cases >= 3


@pytest.mark.parametrize("seed", range(3))
def test_segments_partition_the_image(seed):
    masks, scores, labels, is_thing = random_case(seed)
    seg, infos = mask_wise_merging(masks, scores, labels, is_thing)
    ids = [i["id"] for i in infos]
    assert ids == list(range(1, len(infos) + 1))
    assert set(seg.unique().tolist()) <= {0, *ids}
    for info in infos:
        assert (seg == info["id"]).any()
    # every painted pixel lies inside some query's binary mask
    assert not ((seg > 0) & ~(masks > 0.5).any(dim=0)).any()
    stuff = [i["category_id"] for i in infos if not i["isthing"]]
    assert len(stuff) == len(set(stuff))


def test_confidence_known_values_include_plus_one():
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, :4] = torch.tensor([0.8, 0.6, 0.9, 0.4])  # 0.4 is outside the binary mask
    labels, is_thing = torch.tensor([3]), torch.tensor([True])
    # mask score = (0.8 + 0.6 + 0.9) / (3 + 1) = 0.575, not 2.3 / 3
    _, infos = mask_wise_merging(mask, torch.tensor([0.9]), labels, is_thing)
    assert infos[0]["score"] == pytest.approx(0.9 * 0.575**2, rel=1e-6)
    options = MaskWiseOptions(alpha=2.0, beta=1.0)
    _, infos = mask_wise_merging(mask, torch.tensor([0.9]), labels, is_thing, options)
    assert infos[0]["score"] == pytest.approx(0.81 * 0.575, rel=1e-6)


@pytest.mark.parametrize("isthing", [True, False])
def test_score_threshold_just_below_dropped_just_above_kept(isthing):
    mask = box_mask(6, 6, (0, 3), (0, 3))[None]  # area 9, mask score 9 / 10
    p_at_threshold = 0.3 / 0.9**2
    labels, is_thing = torch.tensor([1]), torch.tensor([isthing])
    options = MaskWiseOptions(thing_score_threshold=0.3, stuff_score_threshold=0.3)
    seg, infos = mask_wise_merging(
        mask, torch.tensor([p_at_threshold - 1e-3]), labels, is_thing, options
    )
    assert infos == [] and not seg.any()
    seg, infos = mask_wise_merging(
        mask, torch.tensor([p_at_threshold + 1e-3]), labels, is_thing, options
    )
    assert len(infos) == 1 and int((seg == 1).sum()) == 9


def test_thing_and_stuff_use_their_own_score_threshold():
    masks = torch.stack([box_mask(6, 6, (0, 3), (0, 3)), box_mask(6, 6, (3, 6), (3, 6))])
    scores = torch.tensor([0.5, 0.5])  # confidence 0.5 * 0.81 = 0.405 for both
    labels, is_thing = torch.tensor([1, 2]), torch.tensor([True, False])
    options = MaskWiseOptions(thing_score_threshold=0.3, stuff_score_threshold=0.5)
    _, infos = mask_wise_merging(masks, scores, labels, is_thing, options)
    assert [(i["category_id"], i["isthing"]) for i in infos] == [(1, True)]
    options = MaskWiseOptions(thing_score_threshold=0.5, stuff_score_threshold=0.3)
    _, infos = mask_wise_merging(masks, scores, labels, is_thing, options)
    assert [(i["category_id"], i["isthing"]) for i in infos] == [(2, False)]


@pytest.mark.parametrize(
    "second_cols,isthing,kept",
    [
        ((7, 17), True, True),  # 30% of the second mask already painted: 0.3 <= 0.4
        ((5, 15), True, False),  # 50% > 0.4
        ((7, 17), False, False),  # stuff: 30% > 0.2
        ((9, 19), False, True),  # stuff: 10% <= 0.2
    ],
)
def test_overlap_rule(second_cols, isthing, kept):
    first = box_mask(10, 20, (0, 10), (0, 10), value=1.0)
    second = box_mask(10, 20, (0, 10), second_cols, value=1.0)
    masks = torch.stack([first, second])
    scores = torch.tensor([0.9, 0.8])  # the first is painted first
    seg, infos = mask_wise_merging(
        masks, scores, torch.tensor([1, 2]), torch.tensor([True, isthing])
    )
    assert int((seg == 1).sum()) == 100
    if kept:
        overlap = 10 - second_cols[0]
        assert len(infos) == 2 and infos[1]["category_id"] == 2
        assert int((seg == 2).sum()) == 100 - 10 * overlap  # only unassigned pixels are painted
        assert torch.equal(seg == 2, second.bool() & ~first.bool())
    else:
        assert len(infos) == 1 and int((seg > 0).sum()) == 100


def test_a_mask_with_nothing_left_to_paint_makes_no_segment():
    # with overlap threshold 1 the t_keep test keeps everything; a fully covered mask must
    # still not make a segment (COCO panoptic rejects segments without pixels)
    first = box_mask(10, 20, (0, 10), (0, 10), value=1.0)
    inside = box_mask(10, 20, (2, 8), (2, 8), value=1.0)
    seg, infos = mask_wise_merging(
        torch.stack([first, inside]),
        torch.tensor([0.9, 0.8]),
        torch.tensor([1, 2]),
        torch.tensor([True, True]),
        MaskWiseOptions(thing_overlap_threshold=1.0),
    )
    assert [info["category_id"] for info in infos] == [1]
    assert torch.equal(seg, first.to(torch.int32))


def test_stuff_of_one_category_is_one_segment_things_are_not():
    masks = torch.stack(
        [
            box_mask(8, 8, (0, 4), (0, 4)),  # stuff 20
            box_mask(8, 8, (4, 8), (4, 8)),  # stuff 20 again, disjoint
            box_mask(8, 8, (0, 4), (4, 8)),  # thing 1
            box_mask(8, 8, (4, 8), (0, 4)),  # thing 1 again, disjoint
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels, is_thing = torch.tensor([20, 20, 1, 1]), torch.tensor([False, False, True, True])
    seg, infos = mask_wise_merging(masks, scores, labels, is_thing)
    assert [(i["id"], i["category_id"], i["isthing"]) for i in infos] == [
        (1, 20, False),
        (2, 1, True),
        (3, 1, True),
    ]
    expected = torch.tensor([[1, 2], [3, 1]], dtype=torch.int32).repeat_interleave(4, 0)
    assert torch.equal(seg, expected.repeat_interleave(4, 1))
    assert infos[0]["score"] == pytest.approx(0.9 * (16 / 17) ** 2)  # the first query's score


def test_empty_inputs_give_all_void():
    seg, infos = mask_wise_merging(
        torch.zeros(0, 5, 7),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
    )
    assert infos == [] and seg.shape == (5, 7) and seg.dtype == torch.int32 and not seg.any()
    masks = torch.full((3, 5, 7), 0.5)  # nothing strictly above the threshold
    seg, infos = mask_wise_merging(
        masks, torch.ones(3), torch.tensor([1, 2, 3]), torch.tensor([True, False, True])
    )
    assert infos == [] and not seg.any()


def test_pixel_wise_argmax_hand_built():
    masks = torch.tensor(
        [
            [[1.0, 0.5, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0]],  # thing 1, p 0.9
            [[0.6, 1.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0]],  # thing 2, p 0.5
            [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # stuff 5, p 0.8
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.9, 0.0]],  # stuff 5, p 0.6: same segment
            [[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]],  # p 0.1 < score_threshold: ignored
        ]
    )
    scores = torch.tensor([0.9, 0.5, 0.8, 0.6, 0.1])
    labels = torch.tensor([1, 2, 5, 5, 7])
    is_thing = torch.tensor([True, True, False, False, True])
    # Table 7's "(p*)", class-weighted: (0,1): 0.5 * 1.0 beats 0.9 * 0.5; (1,0): query 0 wins with 0.36 > 0.30 but its own mask
    # value 0.4 is below 0.5, so the pixel is void although query 1 covers it.
    weighted = PixelArgmaxOptions(class_weighted=True)
    seg, infos = pixel_wise_argmax(masks, scores, labels, is_thing, weighted)
    expected = torch.tensor([[1, 2, 3, 0], [0, 0, 3, 0]], dtype=torch.int32)
    assert torch.equal(seg, expected)
    assert [(i["id"], i["category_id"], i["isthing"]) for i in infos] == [
        (1, 1, True),
        (2, 2, True),
        (3, 5, False),
    ]
    assert [i["score"] for i in infos] == pytest.approx([0.9, 0.5, 0.8])
    strict = PixelArgmaxOptions(score_threshold=0.95, class_weighted=True)
    seg, infos = pixel_wise_argmax(masks, scores, labels, is_thing, strict)
    assert infos == [] and not seg.any()
    # Table 7's plain "(p)", the default: the argmax of the mask values alone. (0,0): query
    # 0's 1.0 beats 0.6; (0,1): query 1's 1.0 beats 0.5; (1,0): query 1's 0.6 now beats 0.4 and
    # covers the pixel, which the class-weighted argmax left void.
    seg, infos = pixel_wise_argmax(masks, scores, labels, is_thing)
    assert torch.equal(seg, torch.tensor([[1, 2, 3, 0], [2, 0, 3, 0]], dtype=torch.int32))
    # where the class weighting decides: p 0.9 x 0.6 beats p 0.3 x 0.9, the mask values do not
    masks = torch.tensor([[[0.6]], [[0.9]]])
    two = (torch.tensor([0.9, 0.3]), torch.tensor([1, 2]), torch.tensor([True, True]))
    assert pixel_wise_argmax(masks, *two, weighted)[1][0]["category_id"] == 1
    assert pixel_wise_argmax(masks, *two)[1][0]["category_id"] == 2


def test_instance_results_hand_built():
    masks = torch.zeros(4, 6, 8)
    masks[0, 1:4, 2:5] = 1.0  # rows 1-3, columns 2-4: mask score 9 / 10
    masks[1] = 0.3  # empty after thresholding
    masks[2, 5, 7] = 2.0  # one pixel in the corner: mask score 2 / 2
    masks[3, 0, 0] = 2.0  # one pixel: mask score 1
    scores, labels = torch.tensor([0.5, 0.9, 0.8, 0.42]), torch.tensor([4, 5, 6, 7])
    # scored as the authors: p * maskscore^2; query 3 (0.42 * 1) now ranks above query 0
    # (0.5 * 0.9^2 = 0.405), which p * maskscore (0.45) would have put first
    result = instance_results(masks, scores, labels, max_detections=4)
    assert result.scores.tolist() == pytest.approx([0.8, 0.42, 0.405, 0.0])
    assert result.classes.tolist() == [6, 7, 4, 5]
    assert result.boxes.tolist() == [
        [7.0, 5.0, 8.0, 6.0],
        [0.0, 0.0, 1.0, 1.0],
        [2.0, 1.0, 5.0, 4.0],
        [0.0] * 4,
    ]
    assert result.masks.dtype == torch.bool and torch.equal(result.masks[2], masks[0] > 0.5)
    assert not result.masks[3].any()
    top = instance_results(masks, scores, labels, max_detections=2)
    assert top.masks.shape == (2, 6, 8) and top.classes.tolist() == [6, 7]
    plain = instance_results(masks, scores, labels, alpha=1.0, beta=1.0)
    assert plain.scores.tolist() == pytest.approx([0.8, 0.45, 0.42, 0.0])


def test_semantic_map_hand_built():
    masks = torch.tensor([[[1.0, 0.2]], [[0.3, 0.4]], [[0.6, 0.0]]])  # (3, 1, 2)
    scores, labels = torch.tensor([0.5, 1.0, 0.5]), torch.tensor([0, 0, 2])
    out = semantic_map(masks, scores, labels, num_classes=3)
    expected = torch.tensor([[[0.5, 0.4]], [[0.0, 0.0]], [[0.3, 0.0]]])
    assert out.shape == (3, 1, 2)
    torch.testing.assert_close(out, expected)


def test_bad_inputs_raise():
    masks, scores = torch.rand(2, 4, 4), torch.rand(2)
    labels, is_thing = torch.tensor([1, 2]), torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"mask_logits must be a floating \(Q, H, W\).*\(2, 16\)"):
        mask_wise_merging(masks.flatten(1), scores, labels, is_thing)
    with pytest.raises(ValueError, match=r"scores must be a floating \(2,\).*shape \(3,\)"):
        mask_wise_merging(masks, torch.rand(3), labels, is_thing)
    with pytest.raises(ValueError, match=r"labels must be an integer.*torch.float32"):
        mask_wise_merging(masks, scores, labels.float(), is_thing)
    with pytest.raises(ValueError, match=r"is_thing must be a bool.*torch.int64"):
        mask_wise_merging(masks, scores, labels, is_thing.long())
    with pytest.raises(ValueError, match=r"thing_overlap_threshold must be in \[0, 1\], got 1.5"):
        MaskWiseOptions(thing_overlap_threshold=1.5)
    with pytest.raises(ValueError, match=r"stuff_score_threshold must be in \[0, 1\], got -0.1"):
        MaskWiseOptions(stuff_score_threshold=-0.1)
    with pytest.raises(ValueError, match=r"mask_threshold must be in \[0, 1\], got -0.1"):
        MaskWiseOptions(mask_threshold=-0.1)
    with pytest.raises(ValueError, match=r"alpha and beta must be >= 0, got alpha=1.0, beta=-2"):
        MaskWiseOptions(beta=-2)
    with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\], got 2"):
        PixelArgmaxOptions(score_threshold=2)
    with pytest.raises(ValueError, match=r"mask_threshold must be in \[0, 1\], got 1.5"):
        PixelArgmaxOptions(mask_threshold=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskWiseOptions().alpha = 2.0  # checked once, so never changed after
    with pytest.raises(ValueError, match=r"max_detections must be >= 0, got -1"):
        instance_results(masks, scores, labels, max_detections=-1)
    with pytest.raises(ValueError, match=r"alpha and beta must be >= 0, got alpha=1.0, beta=-1"):
        instance_results(masks, scores, labels, beta=-1)
    with pytest.raises(ValueError, match=r"num_classes must be >= 1, got 0"):
        semantic_map(masks, scores, labels, num_classes=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got values in \[1, 2\]"):
        semantic_map(masks, scores, labels, num_classes=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidates_prefilter_is_exact(seed):
    # merging only the pre-filtered queries gives exactly the result of merging all of them
    g = torch.Generator().manual_seed(seed)
    num_queries = 40
    low = (torch.randn(num_queries, 6, 9, generator=g) * 0.25 + 0.2).relu()
    low[:5] *= 3  # a few masks well above 1: mask scores above 1 too
    scores = torch.rand(num_queries, generator=g) ** 2
    labels = torch.randint(0, 6, (num_queries,), generator=g)
    is_thing = labels < 3
    full = torch.nn.functional.interpolate(low[None], size=(45, 70), mode="bilinear")[0]
    keep = mask_wise_candidates(low.flatten(1).amax(1), scores, is_thing)
    assert torch.equal(MaskWiseOptions().candidates(low, scores, is_thing), keep)
    assert 0 < int(keep.sum()) < num_queries  # the filter does something here
    seg_all, info_all = mask_wise_merging(full, scores, labels, is_thing)
    seg_kept, info_kept = mask_wise_merging(full[keep], scores[keep], labels[keep], is_thing[keep])
    assert torch.equal(seg_all, seg_kept)
    assert info_all == info_kept
    # every query it drops is one the merging skips: its confidence is under the threshold
    mask_scores = mask_statistics(full, 0.5).mask_scores
    confidence = scores * mask_scores**2
    assert torch.all((confidence[~keep] < 0.25) | ((full[~keep] > 0.5).flatten(1).sum(1) == 0))


def test_resized_merging_equals_resizing_first():
    g = torch.Generator().manual_seed(3)
    low = (torch.randn(11, 5, 7, generator=g) * 0.4 + 0.4).relu()
    scores = torch.rand(11, generator=g)
    labels = torch.randint(0, 4, (11,), generator=g)
    is_thing = labels < 2
    full = torch.nn.functional.interpolate(low[None], size=(37, 51), mode="bilinear")[0]
    options = MaskWiseOptions(thing_score_threshold=0.1, stuff_overlap_threshold=0.3)
    expected = mask_wise_merging(full, scores, labels, is_thing, options)
    got = mask_wise_merging_resized(low, (37, 51), scores, labels, is_thing, options)
    assert len(expected[1]) >= 2
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    via_options = options.merge_resized(low, (37, 51), scores, labels, is_thing)
    assert torch.equal(via_options[0], expected[0]) and via_options[1] == expected[1]


@pytest.mark.parametrize("size", [(37, 51), (8, 9), (5, 7), (3, 4), (64, 15)])
def test_resized_quality_windows_cover_the_masks(size):
    # the merging's windows come from the small masks when resizing; they must hold every
    # pixel of the resized binary mask (up-, same- and down-sizing, non-integer scales)
    g = torch.Generator().manual_seed(size[0])
    low = (torch.randn(9, 5, 7, generator=g) * 0.5 + 0.2).relu()
    resized = mask_statistics(low, 0.5, size)
    full = torch.nn.functional.interpolate(low[None], size=size, mode="bilinear")[0]
    exact = mask_statistics(full, 0.5)
    assert torch.equal(resized.binary, exact.binary)
    assert torch.equal(resized.areas, exact.areas)
    torch.testing.assert_close(resized.mask_scores, exact.mask_scores)
    assert torch.all(resized.rows >= exact.rows) and torch.all(resized.cols >= exact.cols)
    assert exact.rows.any()


def test_options_apply_their_own_merging():
    masks, scores, labels, is_thing = random_case(4)
    low = masks[:, ::2, ::2].contiguous()  # (12, 8, 12), resized back to (16, 24)
    full = torch.nn.functional.interpolate(low[None], size=(16, 24), mode="bilinear")[0]
    argmax = PixelArgmaxOptions(score_threshold=0.5, class_weighted=False)
    assert torch.equal(argmax.candidates(low, scores, is_thing), scores >= 0.5)
    seg, infos = argmax.merge_resized(low, (16, 24), scores, labels, is_thing)
    expected_seg, expected_infos = pixel_wise_argmax(full, scores, labels, is_thing, argmax)
    assert expected_infos and infos == expected_infos and torch.equal(seg, expected_seg)
    empty_seg, empty_infos = argmax.merge_resized(
        low[:0], (16, 24), scores[:0], labels[:0], is_thing[:0]
    )
    assert empty_infos == [] and empty_seg.shape == (16, 24) and not empty_seg.any()
    # the instance results' exponents: the merging's own, or the authors' 1 and 2
    assert argmax.confidence_exponents() == (1.0, 2.0)
    assert MaskWiseOptions(alpha=0.5, beta=3.0).confidence_exponents() == (0.5, 3.0)
    mask_wise = MaskWiseOptions(thing_score_threshold=0.1)
    seg, infos = mask_wise.merge(full, scores, labels, is_thing)
    expected_seg, expected_infos = mask_wise_merging(full, scores, labels, is_thing, mask_wise)
    assert expected_infos and infos == expected_infos and torch.equal(seg, expected_seg)
