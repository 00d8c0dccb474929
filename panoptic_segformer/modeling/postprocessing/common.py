"""What the mergers and result builders share: input checks, score thresholds, segment ids.

Shape shorthand: Q queries, H x W image.
"""

import abc
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

SegmentInfo = Dict[str, object]


def check_unit_interval(**values: float) -> None:
    """Raises ValueError naming the first value outside [0, 1]."""
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_exponents(alpha: float, beta: float) -> None:
    """Raises ValueError when a confidence exponent of Eq. (6) is negative."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")


def check_queries(
    mask_logits: Tensor, scores: Tensor, labels: Tensor, is_thing: Optional[Tensor] = None
) -> None:
    """Raises ValueError unless the per-query tensors of one image fit together.

    Args:
        mask_logits (Tensor): (Q, H, W) floating mask values.
        scores (Tensor): (Q,) floating class probabilities.
        labels (Tensor): (Q,) integer category ids.
        is_thing (Tensor, optional): (Q,) bool.
    """
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


def score_thresholds(is_thing: Tensor, thing: float, stuff: float) -> Tensor:
    """(Q,) float32 score threshold of every query, by whether it is a thing."""
    return torch.where(
        is_thing,
        torch.tensor(thing, dtype=torch.float32, device=is_thing.device),
        torch.tensor(stuff, dtype=torch.float32, device=is_thing.device),
    )


class Segments:
    """Segment ids in order of creation: a new id per thing, and one shared segment per stuff
    category (COCO panoptic allows a single segment per stuff category); the segment keeps the
    score of the first query that created it.

    Attributes:
        info: one dict per segment in id order: ``id`` (1-based, consecutive), ``category_id``,
            ``isthing`` and ``score``.
    """

    def __init__(self) -> None:
        self.info: List[SegmentInfo] = []
        self._stuff: Dict[int, int] = {}

    def id_for(self, category_id: int, isthing: bool, score: float) -> int:
        """The segment id of a query of ``category_id``, creating the segment when needed."""
        if not isthing and category_id in self._stuff:
            return self._stuff[category_id]
        segment_id = len(self.info) + 1
        self.info.append(
            {"id": segment_id, "category_id": category_id, "isthing": isthing, "score": score}
        )
        if not isthing:
            self._stuff[category_id] = segment_id
        return segment_id


class MergeOptions(abc.ABC):
    """The options of one merging strategy, and the three ways the model applies it.

    Subclasses are frozen dataclasses that check their values once, when built.
    """

    @abc.abstractmethod
    def candidates(self, mask_logits: Tensor, scores: Tensor, is_thing: Tensor) -> Tensor:
        """(Q,) bool: the queries the merging may keep, decided from the masks before they are
        resized (merging only these gives the result of merging all).

        Args:
            mask_logits (Tensor): (Q, h, w) mask values at any size.
            scores (Tensor): (Q,) class probabilities p.
            is_thing (Tensor): (Q,) bool.
        """

    @abc.abstractmethod
    def merge(
        self, mask_logits: Tensor, scores: Tensor, labels: Tensor, is_thing: Tensor
    ) -> Tuple[Tensor, List[SegmentInfo]]:
        """The panoptic segmentation of (Q, H, W) masks at the output size."""

    @abc.abstractmethod
    def merge_resized(
        self,
        mask_logits: Tensor,
        output_size: Tuple[int, int],
        scores: Tensor,
        labels: Tensor,
        is_thing: Tensor,
    ) -> Tuple[Tensor, List[SegmentInfo]]:
        """:meth:`merge` of (Q, h, w) masks bilinearly resized to ``output_size`` (H, W)."""

    @abc.abstractmethod
    def confidence_exponents(self) -> Tuple[float, float]:
        """(alpha, beta) of Eq. (6) for the instance results' scores."""
