"""The model's parts from a detectron2 config: the core model with its criterion and inference
options, and the dataset's class ids. The only place that reads ``MODEL.PANOPTIC_SEGFORMER``
(apart from the meta-architecture's own keys); every module below it takes plain arguments.
"""

from typing import Callable, Dict, List, Sequence, Tuple

from panoptic_segformer.modeling import (
    InferenceOptions,
    MaskWiseOptions,
    PanopticSegFormerCriterion,
    PanopticSegFormerCore,
    PixelArgmaxOptions,
    QuerySizes,
    build_panoptic_segformer,
    query_sizes,
)
from panoptic_segformer.modeling.inference import check_thing_classes
from panoptic_segformer.modeling.matcher import HungarianMatcher, MaskDecoderMatcher
from panoptic_segformer.modeling.postprocessing import MergeOptions

__all__ = [
    "THING_CLASS_KEYS",
    "build_criterion",
    "build_model_from_config",
    "class_id_maps",
    "inference_options_from_config",
    "merge_options_from_config",
]


def build_model_from_config(cfg, in_channels: Sequence[int]) -> PanopticSegFormerCore:
    """The core model of ``MODEL.PANOPTIC_SEGFORMER``, without a backbone.

    Args:
        cfg: a config with Panoptic SegFormer's keys.
        in_channels: channels of the backbone maps fed to the neck, finest first.
    """
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    check_thing_classes(
        ps.TEST.THING_CLASSES_FROM, ps.DEC_LAYERS, ps.THING_CLASS_WEIGHT, THING_CLASS_KEYS
    )
    return build_panoptic_segformer(
        None,
        in_channels,
        num_thing_classes=ps.NUM_THING_CLASSES,
        num_stuff_classes=ps.NUM_STUFF_CLASSES,
        d_model=ps.HIDDEN_DIM,
        num_feature_levels=ps.NUM_FEATURE_LEVELS,
        n_heads=ps.NHEADS,
        n_points=ps.N_POINTS,
        d_ffn=ps.DIM_FEEDFORWARD,
        dropout=ps.DROPOUT,
        num_encoder_layers=ps.ENC_LAYERS,
        num_decoder_layers=ps.DEC_LAYERS,
        num_queries=ps.NUM_QUERIES + _query_sizes(ps).joint_extra,
        num_thing_mask_layers=ps.THING_MASK_LAYERS,
        num_stuff_mask_layers=ps.STUFF_MASK_LAYERS,
        mask_mlp_ratio=ps.MASK_MLP_RATIO,
        box_free=ps.BOX_FREE,
        joint_matching=ps.JOINT_MATCHING,
        encoder_checkpointing=ps.ENCODER_CHECKPOINTING,
        mask_decoder_checkpointing=ps.MASK_DECODER_CHECKPOINTING,
        criterion=build_criterion(cfg),
        inference=inference_options_from_config(cfg),
    )


def _query_sizes(ps) -> QuerySizes:
    return query_sizes(ps.NUM_THING_CLASSES, ps.NUM_STUFF_CLASSES, ps.JOINT_MATCHING)


def _mask_wise_options(test) -> MaskWiseOptions:
    return MaskWiseOptions(
        alpha=test.ALPHA,
        beta=test.BETA,
        thing_score_threshold=test.THING_SCORE_THRESHOLD,
        stuff_score_threshold=test.STUFF_SCORE_THRESHOLD,
        thing_overlap_threshold=test.THING_OVERLAP_THRESHOLD,
        stuff_overlap_threshold=test.STUFF_OVERLAP_THRESHOLD,
        mask_threshold=test.MASK_THRESHOLD,
    )


def _pixel_argmax_options(test) -> PixelArgmaxOptions:
    return PixelArgmaxOptions(
        score_threshold=test.PIXEL_SCORE_THRESHOLD,
        mask_threshold=test.MASK_THRESHOLD,
        class_weighted=test.PIXEL_ARGMAX_CLASS_WEIGHTED,
    )


# MODEL.PANOPTIC_SEGFORMER.TEST.MERGE -> its options from the TEST keys
_MERGE_OPTIONS: Dict[str, Callable[..., MergeOptions]] = {
    "mask_wise": _mask_wise_options,
    "pixel_argmax": _pixel_argmax_options,
}


def merge_options_from_config(cfg) -> MergeOptions:
    """The merging ``MODEL.PANOPTIC_SEGFORMER.TEST.MERGE`` names, with its options.

    Raises:
        ValueError: naming an unknown ``MERGE`` or a bad option value.
    """
    test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    if test.MERGE not in _MERGE_OPTIONS:
        raise ValueError(
            f"MODEL.PANOPTIC_SEGFORMER.TEST.MERGE must be one of {sorted(_MERGE_OPTIONS)}, got "
            f"{test.MERGE!r}"
        )
    return _MERGE_OPTIONS[test.MERGE](test)


def inference_options_from_config(cfg) -> InferenceOptions:
    """The inference settings of ``MODEL.PANOPTIC_SEGFORMER.TEST``. With joint matching the
    thing queries also find the stuff segments, so they keep ``MAX_DETECTIONS`` +
    ``NUM_STUFF_CLASSES`` detections (153 on COCO: room for 100 things and every stuff class)."""
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    test = ps.TEST
    result_types = [
        name
        for name, on in (
            ("panoptic_seg", test.PANOPTIC_ON),
            ("instances", test.INSTANCE_ON),
            ("sem_seg", test.SEMANTIC_ON),
        )
        if on
    ]
    return InferenceOptions(
        max_detections=test.MAX_DETECTIONS + _query_sizes(ps).joint_extra,
        mask_decoder_layers=test.MASK_DECODER_LAYERS or None,
        merge=merge_options_from_config(cfg),
        result_types=result_types,
        thing_classes_from=test.THING_CLASSES_FROM,
    )


def class_id_maps(metadata, num_things: int, num_stuff: int) -> Tuple[List[int], List[int]]:
    """The dataset's contiguous ids of the model's thing and stuff classes, in model order.

    Args:
        metadata: detectron2 ``Metadata`` of the dataset; without
            ``thing_dataset_id_to_contiguous_id`` the ids are taken as things first
            ([0, K) then [K, K + Z)).
        num_things, num_stuff: K and Z of the model.

    Raises:
        ValueError: when the dataset's thing or stuff category counts are not K and Z.
    """
    things = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    stuff = getattr(metadata, "stuff_dataset_id_to_contiguous_id", None)
    if things is None or stuff is None:
        return list(range(num_things)), list(range(num_things, num_things + num_stuff))
    thing_ids, stuff_ids = sorted(things.values()), sorted(stuff.values())
    if len(thing_ids) != num_things or len(stuff_ids) != num_stuff:
        raise ValueError(
            f"dataset {metadata.name!r} has {len(thing_ids)} thing and {len(stuff_ids)} stuff "
            f"categories but the model has MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES="
            f"{num_things} and NUM_STUFF_CLASSES={num_stuff}"
        )
    return thing_ids, stuff_ids


PER_BATCH = -1.0  # LAMBDA_THINGS / LAMBDA_STUFF: recomputed per batch (the authors' code)


def _fixed_lambdas(ps) -> bool:
    """Whether ``LAMBDA_THINGS`` and ``LAMBDA_STUFF`` are fixed weights (both >= 0) rather than
    per batch (both -1).

    Raises:
        ValueError: only one of them is set, or one is negative other than -1.
    """
    values = {"LAMBDA_THINGS": ps.LAMBDA_THINGS, "LAMBDA_STUFF": ps.LAMBDA_STUFF}
    for key, value in values.items():
        if value < 0 and value != PER_BATCH:
            raise ValueError(
                f"MODEL.PANOPTIC_SEGFORMER.{key} must be >= 0 (a fixed weight) or -1 (per "
                f"batch), got {value}"
            )
    per_batch = [key for key, value in values.items() if value == PER_BATCH]
    if len(per_batch) == 1:
        (unset,) = per_batch
        (fixed,) = set(values) - {unset}
        raise ValueError(
            f"MODEL.PANOPTIC_SEGFORMER.{fixed} is {values[fixed]} but {unset} is -1 (per batch): "
            "set both >= 0 for fixed weights, or both to -1"
        )
    return not per_batch


# how the thing-class rule (check_thing_classes) names its arguments here: by their keys
THING_CLASS_KEYS = {
    "thing_classes_from": "MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASSES_FROM",
    "num_decoder_layers": "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS",
    "thing_class_weight": "MODEL.PANOPTIC_SEGFORMER.THING_CLASS_WEIGHT",
}


def build_criterion(cfg) -> PanopticSegFormerCriterion:
    """The losses and matchers of ``MODEL.PANOPTIC_SEGFORMER``. With joint matching the filter's
    cap grows by the stuff queries too (``MAX_SELECTED`` + ``NUM_STUFF_CLASSES``, 353 on COCO)."""
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    fixed = _fixed_lambdas(ps)
    focal = dict(focal_alpha=ps.FOCAL_ALPHA, focal_gamma=ps.FOCAL_GAMMA)
    # with joint matching the thing queries predict every class and there are no stuff queries
    sizes = _query_sizes(ps)
    return PanopticSegFormerCriterion(
        sizes.query_classes,
        sizes.stuff_queries,
        matcher=HungarianMatcher(
            cost_class=ps.MATCHER.CLASS_COST,
            cost_bbox=ps.MATCHER.BBOX_COST,
            cost_giou=ps.MATCHER.GIOU_COST,
            **focal,
        ),
        mask_matcher=MaskDecoderMatcher(
            cost_class=ps.MASK_MATCHER.CLASS_COST,
            cost_bbox=ps.MASK_MATCHER.BBOX_COST,
            cost_giou=ps.MASK_MATCHER.GIOU_COST,
            cost_dice=ps.MASK_MATCHER.DICE_COST,
            **focal,
        ),
        class_weight=ps.CLASS_WEIGHT,
        bbox_weight=ps.BBOX_WEIGHT,
        giou_weight=ps.GIOU_WEIGHT,
        mask_weight=ps.MASK_WEIGHT,
        stuff_class_factor=ps.STUFF_CLASS_FACTOR,
        thing_class_weight=ps.THING_CLASS_WEIGHT,
        max_per_target=ps.MAX_PER_TARGET,
        max_selected=ps.MAX_SELECTED + sizes.joint_extra,
        lambda_things=ps.LAMBDA_THINGS if fixed else None,
        lambda_stuff=ps.LAMBDA_STUFF if fixed else None,
        deep_supervision=ps.DEEP_SUPERVISION,
        **focal,
    )
