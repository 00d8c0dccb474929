"""Which config evaluates a converted authors' checkpoint, and what a config sets otherwise.

The authors released checkpoints of four backbones (R50, R101, Swin-L, PVTv2-B5), each with an
mmdet config; this project has a config that reproduces each (``AUTHORS_CONFIGS``). Their
inference settings are the same but for the mask-wise merging's score thresholds (0.25 for R50
and R101, 0.3 for Swin-L and PVTv2-B5): no padding, test size 800 / 1333. :func:`use_with` names
that config and its ``train_net.py --eval-only`` command for a detectron2 config (read as
``cfg.MODEL...``, so this module imports nothing of detectron2) and lists every one of these
settings the config sets otherwise; :func:`format_summary` prints it below the conversion's
counts (:meth:`panoptic_segformer.d2.official_checkpoint.ConversionReport.summary`).
"""

from typing import Dict, Tuple

# The authors' released configs (configs/panformer/panformer_*_coco_panoptic.py on base.py), by
# backbone: this project's config that reproduces each, and the inference settings it must keep.
# Only the mask-wise merging's score thresholds differ between backbones.
_TEST = "MODEL.PANOPTIC_SEGFORMER.TEST."
_AUTHORS_TEST = {
    "INPUT.SIZE_DIVISIBILITY": 1,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
}
AUTHORS_CONFIGS: Dict[str, Tuple[str, str, float]] = {
    # backbone (backbone_of) -> (name, our config file, thing and stuff score threshold)
    "resnet50": ("R50", "configs/r50.yaml", 0.25),
    "resnet101": ("R101", "configs/r101.yaml", 0.25),
    "swin_large": ("Swin-L", "configs/swin_l.yaml", 0.3),
    "pvt_v2_b5": ("PVTv2-B5", "configs/pvtv2_b5.yaml", 0.3),
}


def backbone_of(cfg) -> str:
    """The config's backbone: ``resnet<depth>`` for detectron2's ResNets, else
    ``MODEL.TIMM.NAME``."""
    if cfg.MODEL.BACKBONE.NAME == "D2TimmBackbone":
        return cfg.MODEL.TIMM.NAME
    return f"resnet{cfg.MODEL.RESNETS.DEPTH}"


def authors_settings(threshold: float) -> Dict[str, object]:
    """The inference settings of the authors' config whose score thresholds are ``threshold``."""
    return {
        **_AUTHORS_TEST,
        _TEST + "THING_SCORE_THRESHOLD": threshold,
        _TEST + "STUFF_SCORE_THRESHOLD": threshold,
    }


def _config_value(cfg, key: str) -> object:
    node = cfg
    for name in key.split("."):
        node = node[name]
    return node


def use_with(cfg, output: str) -> Dict[str, object]:
    """Which config the converted checkpoint is evaluated with, and how the given ``cfg``
    differs from the authors' inference settings for its backbone.

    Returns:
        ``backbone``, ``config_file`` (this project's config of the authors' release with that
        backbone), ``settings`` (the authors' values of the keys that decide the inference),
        ``differences`` (one line per key ``cfg`` sets otherwise) and ``evaluate`` (the
        ``train_net.py --eval-only`` command); for a backbone the authors released no
        checkpoint of, ``config_file`` is None and the rest is empty.
    """
    backbone = backbone_of(cfg)
    if backbone not in AUTHORS_CONFIGS:
        return {"backbone": backbone, "config_file": None, "settings": {}, "differences": []}
    name, config_file, threshold = AUTHORS_CONFIGS[backbone]
    settings = authors_settings(threshold)
    differences = [
        f"{key} is {_config_value(cfg, key)} here, {value} in the authors' {name} config"
        for key, value in settings.items()
        if _config_value(cfg, key) != value
    ]
    return {
        "backbone": name,
        "config_file": config_file,
        "settings": settings,
        "differences": differences,
        "evaluate": f"python train_net.py --config-file {config_file} --eval-only "
        f"MODEL.WEIGHTS {output}",
    }


def format_summary(summary: Dict[str, object]) -> str:
    """The summary as a table: tensors and elements per part, then the ignored tensors, then
    the config to evaluate with (``use_with``) and its warnings."""
    lines = [f"{'part':<18}{'tensors':>9}{'elements':>14}"]
    for name, counts in summary["parts"].items():
        lines.append(f"{name:<18}{counts['tensors']:>9}{counts['elements']:>14,}")
    lines.append(f"{'converted':<18}{summary['converted_tensors']:>9}")
    for entry in summary["ignored"]:
        lines.append(f"ignored {entry['tensors']:>5} tensors: {entry['reason']}")
    use = summary.get("use_with")
    if use and use["config_file"]:
        thresholds = use["settings"][_TEST + "THING_SCORE_THRESHOLD"]
        lines.append(
            f"use with {use['config_file']} (the authors' {use['backbone']} settings: score "
            f"thresholds {thresholds}, no padding, test size 800 / 1333):"
        )
        lines.append(f"  {use['evaluate']}")
        lines.extend(f"warning: {line}" for line in use["differences"])
    elif use:
        lines.append(f"the authors released no {use['backbone']} checkpoint to compare with")
    return "\n".join(lines)
