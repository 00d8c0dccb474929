"""Each default lives in one place: the core's signatures and dataclasses are the defaults, and
the config (a leaf that imports nothing of the package, so it repeats them as literals) must
agree with them, key by key. A key added to MODEL.PANOPTIC_SEGFORMER fails here until it is
mapped to its core parameter or listed as config-only with a reason."""

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Tuple

import pytest
from skips import require_detectron2

require_detectron2()

from detectron2.config import CfgNode, get_cfg  # noqa: E402

from panoptic_segformer.d2.build import (  # noqa: E402
    PER_BATCH,
    build_criterion,
    inference_options_from_config,
)
from panoptic_segformer.d2.config import add_panoptic_segformer_config  # noqa: E402
from panoptic_segformer.modeling import (  # noqa: E402
    InferenceOptions,
    MaskWiseOptions,
    PanopticSegFormerCriterion,
    PixelArgmaxOptions,
    build_panoptic_segformer,
)
from panoptic_segformer.modeling.backbone import TIMM_BACKBONES, TimmBackbone  # noqa: E402
from panoptic_segformer.modeling.matcher import HungarianMatcher, MaskDecoderMatcher  # noqa: E402

Target = Tuple[Callable[..., Any], str]


def _same(value):
    return value


def _none_if(sentinel):
    """A config value -> the core's, where ``sentinel`` in the config stands for None."""
    return lambda value: None if value == sentinel else value


def _result_type(name: str):
    """An ``*_ON`` switch -> whether ``name`` is among the core's result types."""
    return lambda on: on, lambda result_types: name in result_types


_MERGE_CLASSES = {"mask_wise": MaskWiseOptions, "pixel_argmax": PixelArgmaxOptions}
_BUILD = build_panoptic_segformer
_CRITERION = PanopticSegFormerCriterion
# FOCAL_ALPHA and FOCAL_GAMMA go to the criterion's losses and to both matchers' class costs
_FOCAL = [_CRITERION, HungarianMatcher, MaskDecoderMatcher]

# MODEL.PANOPTIC_SEGFORMER key -> (config value -> core value, [(core callable, parameter)]).
# A two-element first entry is (config value -> x, core default -> x) instead.
CORE_PARAMETERS: Dict[str, Tuple[Any, List[Target]]] = {
    "NUM_THING_CLASSES": (_same, [(_BUILD, "num_thing_classes")]),
    "NUM_STUFF_CLASSES": (_same, [(_BUILD, "num_stuff_classes")]),
    "HIDDEN_DIM": (_same, [(_BUILD, "d_model")]),
    "NUM_FEATURE_LEVELS": (_same, [(_BUILD, "num_feature_levels")]),
    "NHEADS": (_same, [(_BUILD, "n_heads")]),
    "N_POINTS": (_same, [(_BUILD, "n_points")]),
    "DIM_FEEDFORWARD": (_same, [(_BUILD, "d_ffn")]),
    "DROPOUT": (_same, [(_BUILD, "dropout")]),
    "ENC_LAYERS": (_same, [(_BUILD, "num_encoder_layers")]),
    "DEC_LAYERS": (_same, [(_BUILD, "num_decoder_layers")]),
    "NUM_QUERIES": (_same, [(_BUILD, "num_queries")]),
    "THING_MASK_LAYERS": (_same, [(_BUILD, "num_thing_mask_layers")]),
    "STUFF_MASK_LAYERS": (_same, [(_BUILD, "num_stuff_mask_layers")]),
    "MASK_MLP_RATIO": (_same, [(_BUILD, "mask_mlp_ratio")]),
    "BOX_FREE": (_same, [(_BUILD, "box_free")]),
    "JOINT_MATCHING": (_same, [(_BUILD, "joint_matching")]),
    "ENCODER_CHECKPOINTING": (_same, [(_BUILD, "encoder_checkpointing")]),
    "MASK_DECODER_CHECKPOINTING": (_same, [(_BUILD, "mask_decoder_checkpointing")]),
    "DEEP_SUPERVISION": (_same, [(_CRITERION, "deep_supervision")]),
    "CLASS_WEIGHT": (_same, [(_CRITERION, "class_weight")]),
    "BBOX_WEIGHT": (_same, [(_CRITERION, "bbox_weight")]),
    "GIOU_WEIGHT": (_same, [(_CRITERION, "giou_weight")]),
    "MASK_WEIGHT": (_same, [(_CRITERION, "mask_weight")]),
    "STUFF_CLASS_FACTOR": (_same, [(_CRITERION, "stuff_class_factor")]),
    "THING_CLASS_WEIGHT": (_same, [(_CRITERION, "thing_class_weight")]),
    "FOCAL_ALPHA": (_same, [(target, "focal_alpha") for target in _FOCAL]),
    "FOCAL_GAMMA": (_same, [(target, "focal_gamma") for target in _FOCAL]),
    "MAX_PER_TARGET": (_same, [(_CRITERION, "max_per_target")]),
    "MAX_SELECTED": (_same, [(_CRITERION, "max_selected")]),
    # -1: per batch, the core's None
    "LAMBDA_THINGS": (_none_if(PER_BATCH), [(_CRITERION, "lambda_things")]),
    "LAMBDA_STUFF": (_none_if(PER_BATCH), [(_CRITERION, "lambda_stuff")]),
    "MATCHER.CLASS_COST": (_same, [(HungarianMatcher, "cost_class")]),
    "MATCHER.BBOX_COST": (_same, [(HungarianMatcher, "cost_bbox")]),
    "MATCHER.GIOU_COST": (_same, [(HungarianMatcher, "cost_giou")]),
    "MASK_MATCHER.CLASS_COST": (_same, [(MaskDecoderMatcher, "cost_class")]),
    "MASK_MATCHER.BBOX_COST": (_same, [(MaskDecoderMatcher, "cost_bbox")]),
    "MASK_MATCHER.GIOU_COST": (_same, [(MaskDecoderMatcher, "cost_giou")]),
    "MASK_MATCHER.DICE_COST": (_same, [(MaskDecoderMatcher, "cost_dice")]),
    "TEST.PANOPTIC_ON": (_result_type("panoptic_seg"), [(InferenceOptions, "result_types")]),
    "TEST.INSTANCE_ON": (_result_type("instances"), [(InferenceOptions, "result_types")]),
    "TEST.SEMANTIC_ON": (_result_type("sem_seg"), [(InferenceOptions, "result_types")]),
    "TEST.MAX_DETECTIONS": (_same, [(InferenceOptions, "max_detections")]),
    # 0: every layer, the core's None
    "TEST.MASK_DECODER_LAYERS": (_none_if(0), [(InferenceOptions, "mask_decoder_layers")]),
    "TEST.MERGE": ((_MERGE_CLASSES.get, type), [(InferenceOptions, "merge")]),
    "TEST.THING_CLASSES_FROM": (_same, [(InferenceOptions, "thing_classes_from")]),
    "TEST.ALPHA": (_same, [(MaskWiseOptions, "alpha")]),
    "TEST.BETA": (_same, [(MaskWiseOptions, "beta")]),
    "TEST.THING_SCORE_THRESHOLD": (_same, [(MaskWiseOptions, "thing_score_threshold")]),
    "TEST.STUFF_SCORE_THRESHOLD": (_same, [(MaskWiseOptions, "stuff_score_threshold")]),
    "TEST.THING_OVERLAP_THRESHOLD": (_same, [(MaskWiseOptions, "thing_overlap_threshold")]),
    "TEST.STUFF_OVERLAP_THRESHOLD": (_same, [(MaskWiseOptions, "stuff_overlap_threshold")]),
    # one binarisation threshold for both mergings
    "TEST.MASK_THRESHOLD": (
        _same,
        [(MaskWiseOptions, "mask_threshold"), (PixelArgmaxOptions, "mask_threshold")],
    ),
    "TEST.PIXEL_SCORE_THRESHOLD": (_same, [(PixelArgmaxOptions, "score_threshold")]),
    "TEST.PIXEL_ARGMAX_CLASS_WEIGHTED": (_same, [(PixelArgmaxOptions, "class_weighted")]),
}

# keys with no core parameter to agree with, and why
CONFIG_ONLY: Dict[str, str] = {
    "IN_FEATURES": "names of detectron2 backbone outputs, an argument of the meta-architecture "
    "(required, no default); the core's builder takes their channels instead",
}

# MODEL.TIMM key -> (config value -> core value, [(core callable, parameter)])
_STAGES = ("res2", "res3", "res4", "res5")  # detectron2's names of the timm stages
TIMM_PARAMETERS: Dict[str, Tuple[Any, List[Target]]] = {
    "OUT_FEATURES": (lambda names: tuple(_STAGES.index(n) for n in names),
                     [(TimmBackbone, "out_indices")]),  # fmt: skip
    "PRETRAINED": (lambda path: path or None, [(TimmBackbone, "pretrained_path")]),
}
TIMM_CONFIG_ONLY: Dict[str, str] = {
    "NAME": "a name of the core's build_backbone_by_name, checked against TIMM_BACKBONES below",
    "DROP_PATH_RATE": "negative keeps each backbone's own rate (build_backbone_by_name's), checked below",
}


def _config() -> CfgNode:
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    return cfg


def _leaves(node: CfgNode, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def core_default(target: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of a core function or class: a dataclass's field of an
    instance built with every default (a default factory included), else the signature's."""
    if dataclasses.is_dataclass(target):
        return getattr(target(), name)
    default = inspect.signature(target).parameters[name].default
    assert default is not inspect.Parameter.empty, f"{target.__name__}({name}) has no default"
    return default


def _expected(convert, config_value, core_value):
    if isinstance(convert, tuple):
        from_config, from_core = convert
        return from_config(config_value), from_core(core_value)
    return convert(config_value), core_value


def test_every_key_is_mapped_or_config_only():
    cfg = _config()
    keys = set(_leaves(cfg.MODEL.PANOPTIC_SEGFORMER))
    assert not set(CORE_PARAMETERS) & set(CONFIG_ONLY)
    assert sorted(keys - set(CORE_PARAMETERS) - set(CONFIG_ONLY)) == [], "unmapped keys"
    assert sorted((set(CORE_PARAMETERS) | set(CONFIG_ONLY)) - keys) == [], "stale entries"
    timm = set(_leaves(cfg.MODEL.TIMM))
    assert not set(TIMM_PARAMETERS) & set(TIMM_CONFIG_ONLY)
    assert timm == set(TIMM_PARAMETERS) | set(TIMM_CONFIG_ONLY)


@pytest.mark.parametrize("key", sorted(CORE_PARAMETERS))
def test_config_default_is_the_core_default(key):
    value = _leaves(_config().MODEL.PANOPTIC_SEGFORMER)[key]
    convert, targets = CORE_PARAMETERS[key]
    for target, name in targets:
        ours, core = _expected(convert, value, core_default(target, name))
        assert ours == core, f"MODEL.PANOPTIC_SEGFORMER.{key}={value!r} but {target.__name__}" \
            f"({name}={core_default(target, name)!r})"  # fmt: skip


@pytest.mark.parametrize("key", sorted(TIMM_PARAMETERS))
def test_timm_config_default_is_the_core_default(key):
    value = _config().MODEL.TIMM[key]
    convert, targets = TIMM_PARAMETERS[key]
    for target, name in targets:
        assert convert(value) == core_default(target, name), (key, target.__name__, name)


def test_timm_backbone_names_are_the_cores():
    cfg = _config()
    assert cfg.MODEL.TIMM.NAME in TIMM_BACKBONES
    assert cfg.MODEL.TIMM.DROP_PATH_RATE < 0  # each backbone's own, as build_backbone_by_name has it
    from panoptic_segformer.d2.backbone import TIMM_BACKBONES as D2_NAMES

    assert D2_NAMES is TIMM_BACKBONES  # one list of names, the core's


def test_default_config_builds_the_core_defaults():
    # the whole of what d2/build.py reads from the default config, against the core's defaults
    cfg = _config()
    assert inference_options_from_config(cfg) == InferenceOptions()
    built, default = build_criterion(cfg), PanopticSegFormerCriterion(80, 53)

    def settings(module):
        return {k: v for k, v in vars(module).items() if not k.startswith("_")}

    assert settings(built) == settings(default)
    for name in ("matcher", "mask_matcher"):
        assert settings(getattr(built, name)) == settings(getattr(default, name)), name
