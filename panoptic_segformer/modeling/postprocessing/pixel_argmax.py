"""The pixel-wise argmax baselines of the paper's Table 7 and their options.

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
    check_queries,
    check_unit_interval,
)
from panoptic_segformer.modeling.postprocessing.mask_statistics import resize_masks
from panoptic_segformer.modeling.postprocessing.mask_wise import MaskWiseOptions


@dataclass(frozen=True)
class PixelArgmaxOptions(MergeOptions):
    """Options of the pixel-wise argmax.

    Args:
        score_threshold: minimum class probability of a query, in [0, 1].
        mask_threshold: binarisation threshold of the mask values, in [0, 1].
        class_weighted: weight the mask values by the class probability in the argmax
            (Table 7's "(p*)", its MaskFormer row); False (default) is its plain "(p)", the
            paper's Panoptic SegFormer row.

    Raises:
        ValueError: naming a threshold outside [0, 1].
    """

    score_threshold: float = 0.25
    # the same binarisation default as mask-wise merging
    mask_threshold: float = MaskWiseOptions.mask_threshold
    class_weighted: bool = False

    def __post_init__(self) -> None:
        check_unit_interval(
            score_threshold=self.score_threshold, mask_threshold=self.mask_threshold
        )

    def candidates(self, mask_logits: Tensor, scores: Tensor, is_thing: Tensor) -> Tensor:
        return scores >= self.score_threshold

    def merge(
        self, mask_logits: Tensor, scores: Tensor, labels: Tensor, is_thing: Tensor
    ) -> Tuple[Tensor, List[SegmentInfo]]:
        return pixel_wise_argmax(mask_logits, scores, labels, is_thing, self)

    def merge_resized(
        self,
        mask_logits: Tensor,
        output_size: Tuple[int, int],
        scores: Tensor,
        labels: Tensor,
        is_thing: Tensor,
    ) -> Tuple[Tensor, List[SegmentInfo]]:
        resized = resize_masks(mask_logits, output_size)
        return pixel_wise_argmax(resized, scores, labels, is_thing, self)

    def confidence_exponents(self) -> Tuple[float, float]:
        # no confidence of its own: the instance results take mask-wise merging's default
        # exponents, the authors' p * s^2
        return MaskWiseOptions.alpha, MaskWiseOptions.beta


def pixel_wise_argmax(
    mask_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    options: PixelArgmaxOptions = PixelArgmaxOptions(),
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
       one category share one segment, as in mask-wise merging. DETR's and MaskFormer's extra
       filters (e.g. dropping segments that keep too little of their mask) are left out: they
       are the "tricks" the paper contrasts its method with.

    Args:
        mask_logits (Tensor): (Q, H, W) float mask values.
        scores (Tensor): (Q,) float class probabilities p.
        labels (Tensor): (Q,) integer category ids.
        is_thing (Tensor): (Q,) bool, True for thing queries.
        options: thresholds and the class weighting.

    Returns:
        panoptic_seg (Tensor): (H, W) int32 segment ids, 0 = void.
        segments_info (List[dict]): keys ``id``, ``category_id``, ``isthing``, ``score`` (the
            class probability p of the segment's first query).

    Raises:
        ValueError: on mismatched shapes or dtypes.
    """
    check_queries(mask_logits, scores, labels, is_thing)
    height, width = mask_logits.shape[1:]
    panoptic_seg = torch.zeros(height, width, dtype=torch.int32, device=mask_logits.device)
    kept = (scores >= options.score_threshold).nonzero().squeeze(1)  # (Q',) original indices
    if kept.numel() == 0:
        return panoptic_seg, []

    masks = mask_logits[kept]
    weighted = scores[kept, None, None] * masks if options.class_weighted else masks
    winner = weighted.argmax(dim=0)  # (H, W) index into kept
    covered = masks.gather(0, winner[None]).squeeze(0) > options.mask_threshold

    # Map each kept query to its segment id (0 where it wins no pixel).
    segment_of = torch.zeros(len(kept), dtype=torch.int32, device=mask_logits.device)
    segments = Segments()
    kept_list, labels_list = kept.tolist(), labels.tolist()
    is_thing_list, scores_list = is_thing.tolist(), scores.tolist()
    for local in torch.unique(winner[covered]).tolist():  # sorted, so in query order
        query = kept_list[local]
        segment_of[local] = segments.id_for(
            labels_list[query], is_thing_list[query], scores_list[query]
        )
    panoptic_seg = torch.where(covered, segment_of[winner], panoptic_seg)
    return panoptic_seg, segments.info
