"""The model at inference: its settings, and the thing queries that go on to the mask decoder.

Shape shorthand: N images, Q thing queries, K classes of the thing queries, Z stuff queries,
k kept thing queries, C channels, H1 x W1 the stride-8 level, B box coordinates.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from panoptic_segformer.modeling.decoupled_mask_decoder import DecoupledMaskDecoder
from panoptic_segformer.modeling.postprocessing import RESULT_TYPES, MaskWiseOptions, MergeOptions

# where the classes of the thing queries come from at inference
THING_CLASS_SOURCES = ("location_decoder", "mask_decoder")

# how check_thing_classes names its arguments, unless the caller names them otherwise
_ARGUMENT_NAMES = {
    "thing_classes_from": "thing_classes_from",
    "num_decoder_layers": "num_decoder_layers",
    "thing_class_weight": "the criterion's thing_class_weight",
}


def check_thing_classes(
    thing_classes_from: str,
    num_decoder_layers: int,
    thing_class_weight: Optional[float],
    names: Optional[Mapping[str, str]] = None,
) -> None:
    """The rule of where the thing classes may come from: something must classify them, and
    what classifies them must be trained. A location decoder of 0 layers predicts no classes,
    so they must come from the mask decoder; the mask decoder's class heads learn only with a
    positive class loss weight.

    Args:
        thing_classes_from: "location_decoder" or "mask_decoder" (:class:`InferenceOptions`).
        num_decoder_layers: layers of the location decoder, >= 0.
        thing_class_weight: the criterion's weight of the thing mask decoder's class loss; None
            for a model without a criterion (nothing to check about its training).
        names: how the error names the three arguments (by their argument names, without it);
            the detectron2 layer names its config keys.

    Raises:
        ValueError: naming the arguments, when the rule is broken.
    """
    name = {**_ARGUMENT_NAMES, **(names or {})}
    source, layers, weight = (
        name["thing_classes_from"],
        name["num_decoder_layers"],
        name["thing_class_weight"],
    )
    if num_decoder_layers < 0:
        raise ValueError(f"{layers} must be >= 0, got {num_decoder_layers}")
    if num_decoder_layers == 0 and thing_classes_from == "location_decoder":
        raise ValueError(
            f"{layers} is 0: a location decoder of 0 layers predicts no classes, so set {source} "
            f"to 'mask_decoder' (and {weight} > 0 to train its class heads)"
        )
    if thing_classes_from == "mask_decoder" and thing_class_weight is not None:
        if thing_class_weight <= 0:
            raise ValueError(
                f"{source} is 'mask_decoder' but {weight} is {thing_class_weight}; make it "
                "positive: the mask decoder's class heads are never trained otherwise (e.g. "
                "4.0, the weight the stuff class loss runs at: the class weight x the stuff "
                "class factor)"
            )


@dataclass(frozen=True)
class InferenceOptions:
    """Inference settings of :class:`PanopticSegFormerCore`, checked once when built.

    Args:
        max_detections: thing queries kept at inference, the top-k of the Q x K class scores
            of the location decoder (the authors' 100), >= 1.
        mask_decoder_layers: early exit after this many mask-decoder layers (paper Table 10),
            >= 1; None runs every layer and the tail.
        merge: :class:`MaskWiseOptions` (Algorithm 1) or :class:`PixelArgmaxOptions` (paper
            Table 7).
        result_types: what the post-processing returns, any of "panoptic_seg", "instances" and
            "sem_seg" (stored as a tuple). Panoptic only by default: the other two need every
            query's mask at full resolution, several times the cost of the merging.
        thing_classes_from: the classes and scores of things come from the location decoder's
            last class head ("location_decoder", the authors' code) or from the thing mask
            decoder's last class head ("mask_decoder", paper Sec. 3.3.3).

    Raises:
        ValueError: naming the bad value.
    """

    max_detections: int = 100
    mask_decoder_layers: Optional[int] = None
    merge: MergeOptions = field(default_factory=MaskWiseOptions)
    result_types: Sequence[str] = ("panoptic_seg",)
    thing_classes_from: str = "location_decoder"

    def __post_init__(self) -> None:
        # a frozen dataclass sets its own fields through object.__setattr__
        object.__setattr__(self, "result_types", tuple(self.result_types))
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be positive, got {self.max_detections}")
        if self.mask_decoder_layers is not None and self.mask_decoder_layers < 1:
            raise ValueError(
                f"mask_decoder_layers must be positive or None (all), got "
                f"{self.mask_decoder_layers}"
            )
        if not isinstance(self.merge, MergeOptions):
            raise ValueError(
                f"merge must be MaskWiseOptions or PixelArgmaxOptions, got {self.merge!r}"
            )
        unknown = sorted(set(self.result_types) - set(RESULT_TYPES))
        if unknown or not self.result_types:
            raise ValueError(
                f"result_types must be a non-empty subset of {RESULT_TYPES}, got "
                f"{list(self.result_types)}"
            )
        if self.thing_classes_from not in THING_CLASS_SOURCES:
            raise ValueError(
                f"thing_classes_from must be one of {THING_CLASS_SOURCES}, got "
                f"{self.thing_classes_from!r}"
            )


def predict(
    located: Dict[str, Tensor],
    mask_decoder: DecoupledMaskDecoder,
    memory: Tensor,
    shapes: List[Tuple[int, int]],
    padding: Tensor,
    options: InferenceOptions,
) -> Dict[str, Tensor]:
    """The inference outputs: the k best thing queries and every stuff query through the mask
    decoder, with their classes and scores.

    Args:
        located: the location decoder's outputs: ``queries`` (N, Q, C), ``pred_logits`` and
            ``pred_boxes`` (lists per layer of (N, Q, K) and (N, Q, B); empty without layers).
        mask_decoder: the query-decoupled mask decoder.
        memory (Tensor): (N, S, C) encoder tokens of the mask decoder's levels.
        shapes: (H_l, W_l) of those levels.
        padding (Tensor): (N, S) bool, True at padding tokens.
        options: the inference settings.

    Returns:
        ``thing_masks`` (N, k, H1, W1), ``thing_scores`` (N, k), ``thing_labels`` (N, k),
        ``stuff_masks`` (N, Z, H1, W1), ``stuff_scores`` (N, Z), and ``thing_boxes`` (N, k, B)
        with location decoder layers.
    """
    layers, k = options.mask_decoder_layers, options.max_detections
    queries = located["queries"]
    if options.thing_classes_from == "location_decoder":
        # Top-k of the location decoder's (Q x K) sigmoid scores; a query may be kept for
        # several classes.
        top_scores, query_idx, labels = _top_detections(located["pred_logits"][-1], k)
        things = mask_decoder.forward_things(
            _gather(queries, query_idx), memory, shapes, padding, layers, last_mask_only=True
        )
        thing_masks = things["masks"][-1]
    else:
        # The mask decoder classifies (Sec. 3.3.3). It runs on the location decoder's k best
        # queries (by their highest class score), as in training it runs on those the filter
        # selects near the things; without location decoder layers, on all.
        if len(located["pred_logits"]):
            best = located["pred_logits"][-1].amax(dim=-1)  # (N, Q)
            candidates = best.topk(min(k, best.shape[1]), dim=1).indices
        else:
            candidates = torch.arange(queries.shape[1], device=queries.device)
            candidates = candidates[None].expand(queries.shape[0], -1)
        things = mask_decoder.forward_things(
            _gather(queries, candidates), memory, shapes, padding, layers, last_mask_only=True
        )
        top_scores, local_idx, labels = _top_detections(things["logits"][-1], k)
        query_idx = candidates.gather(1, local_idx)
        thing_masks = _gather(things["masks"][-1], local_idx)
    stuff = mask_decoder.forward_stuff(memory, shapes, padding, layers, last_mask_only=True)
    outputs = {
        "thing_masks": thing_masks,
        "thing_scores": top_scores,
        "thing_labels": labels,
        "stuff_masks": stuff["masks"][-1],
        "stuff_scores": stuff["logits"][-1].sigmoid(),
    }
    if len(located["pred_boxes"]):
        outputs["thing_boxes"] = _gather(located["pred_boxes"][-1], query_idx)
    return outputs


def _top_detections(logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-k of the (N, Q, K) sigmoid class scores over queries x classes: scores, query
    indices and classes, each (N, min(k, Q K))."""
    num_classes = logits.shape[-1]
    scores = logits.sigmoid().flatten(1)  # (N, Q*K)
    top_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top_scores, top // num_classes, top % num_classes


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values (N, Q, ...) at the (N, k) query indices -> (N, k, ...)."""
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, expanded.expand(-1, -1, *values.shape[2:]))
