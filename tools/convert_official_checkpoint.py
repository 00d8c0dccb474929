#!/usr/bin/env python
"""Converts a checkpoint of the authors' mmdet code into a detectron2 checkpoint of this project.

The authors' implementation (github.com/zhiqi-li/Panoptic-SegFormer, mmdet 2.12 / mmcv 1.3.4)
saves ``{"state_dict": ..., "meta": ...}`` holding the detector's ``backbone.*``, ``neck.*`` and
``bbox_head.*`` tensors. Every tensor is renamed to the ``PanopticSegFormer`` meta-architecture
built from ``--config-file``, and the result is checked against that model: each input tensor is
either renamed or explicitly ignored (below), each model entry is filled exactly once and every
shape is equal; otherwise the tool refuses, naming the keys. The output,
``{"model": ..., "__author__": ...}``, loads as ``MODEL.WEIGHTS``; a summary of the counts per
part is printed and written to ``<output>.json``, with the config to evaluate it with (this
project's config of the authors' release for that backbone: score thresholds 0.25 for R50 and
R101, 0.3 for Swin-L and PVTv2-B5; no padding; test size 800 / 1333), its
``train_net.py --eval-only`` command, and a warning for every one of these settings that
``--config-file`` and ``--opts`` set otherwise. The input is read as data (``torch.load`` with
``weights_only=True``: tensors, numbers, strings, lists, tuples and dicts, which is all an mmcv
checkpoint's ``state_dict``, ``meta`` and ``optimizer`` hold); a file asking for anything else
could run code, and is refused with a ``pickle.UnpicklingError`` naming it.

No tensor needs a reshape, split or merge: both query embeddings are one (Q, 2C) table in both
codes, split the same way (location decoder: position then content, as Deformable DETR; stuff
queries: content then position), the mask decoder's self-attention ``qkv`` Linear has
``nn.MultiheadAttention``'s ``in_proj`` layout (q, k, v blocks, heads contiguous in each), and
class rows need no permutation: the authors number COCO's categories in category-id order
(things 0-79, stuff 80-132), the model order on detectron2's COCO panoptic metadata.

Rules, official module prefix -> ours; the rest of a key (``weight``, ``bias``, ``running_mean``
...) is kept. ``N`` is any index, ``i`` a stage, ``[ML]`` ``blocks.N`` of ``things_mask_head`` /
``stuff_mask_head`` -> ``layers.N`` of ``things`` / ``stuff``::

  backbone: mmdet ResNet -> detectron2 ResNet (FrozenBN keeps weight, bias and running stats)
    backbone.conv1 / backbone.bn1         backbone.stem.conv1 / backbone.stem.conv1.norm
    backbone.layer{i}.N.conv{k}           backbone.res{i+1}.N.conv{k}
    backbone.layer{i}.N.bn{k}             backbone.res{i+1}.N.conv{k}.norm
    backbone.layer{i}.N.downsample.0 / 1  backbone.res{i+1}.N.shortcut / shortcut.norm
  backbone: original Swin / PVTv2 -> timm feature extractor (backbone.net.model)
    backbone.norm{i} (Swin only)          backbone.net.norms.{position of stage i in outputs}
    backbone.*                            timm's checkpoint_filter_fn of the family (as for
                                          MODEL.TIMM.PRETRAINED), then timm's feature names
                                          (a flattened nn.Sequential child: layers.0 -> layers_0)
  neck: mmdet ChannelMapper (ConvModule: conv without bias, GroupNorm "gn")
    neck.convs.N.conv / .gn               model.neck.lateral_convs.N.0 / .1
    neck.extra_convs.N.conv / .gn         model.neck.extra_convs.N.0 / .1
  encoder: bbox_head.transformer.encoder.layers.N (mmcv BaseTransformerLayer) -> .encoder.layers.N
    bbox_head.transformer.level_embeds    model.level_embed
    attentions.0 (MSDeformAttn)           self_attn
    norms.0 / norms.1                     norm1 / ffn.norm
    ffns.0.layers.0.0 / ffns.0.layers.1   ffn.linear1 / ffn.linear2
  location decoder: bbox_head.transformer.decoder.layers.N -> model.location_decoder.layers.N
    attentions.0.attn (nn.MultiheadAttn)  self_attn
    attentions.1 (MSDeformAttn)           cross_attn
    norms.0 / norms.1 / norms.2           norm1 / norm2 / ffn.norm
    ffns.0.layers.0.0 / ffns.0.layers.1   ffn.linear1 / ffn.linear2
    bbox_head.transformer.reference_points  model.location_decoder.reference_points
    bbox_head.query_embedding             model.location_decoder.query_embed
    bbox_head.cls_branches.N              model.location_decoder.class_heads.N
    bbox_head.reg_branches.N.0 / .2 / .4  model.location_decoder.box_heads.N.layers.0 / .1 / .2
  mask decoder: bbox_head.{things,stuff}_mask_head -> model.mask_decoder.{things,stuff}
    [ML].self_attention.qkv.weight/.bias  layers.N.self_attn.in_proj_weight / in_proj_bias
    [ML].self_attention.proj / .norm3     layers.N.self_attn.out_proj / norm_self
    [ML].attn.q / .k / .v / .proj         layers.N.cross_attn.q_proj / k_proj / v_proj / out_proj
    [ML].attn.linear_l{1,2,3}.0           layers.N.cross_attn.to_mask.level_maps.{0,1,2}
    [ML].attn.linear.0                    layers.N.cross_attn.to_mask.fuse
    [ML].head_norm1 / .head_norm2         layers.N.norm_cross / ffn.norm
    [ML].mlp.fc1 / .mlp.fc2               layers.N.ffn.linear1 / ffn.linear2
    attnen.q / .k / .linear_l{1,2,3}.0 / .linear.0
                                          tail.q_proj / k_proj / to_mask.level_maps.{0,1,2} / fuse
    bbox_head.stuff_query                 model.mask_decoder.stuff_query
    bbox_head.cls_thing_branches.N        model.mask_decoder.thing_class_heads.N
    bbox_head.cls_stuff_branches.N        model.mask_decoder.stuff_class_heads.N

Ignored, with the reasons in ``IGNORED`` (and counted per reason in the summary):
``backbone.*.num_batches_tracked``, Swin's ``backbone.*.relative_position_index`` and
``bbox_head.reg_branches2.*`` (box heads of the thing mask decoder, zero-weighted losses only).

Example:
  python tools/convert_official_checkpoint.py --config-file configs/r50.yaml \\
      --input panoptic_segformer_r50_2x.pth --output r50_converted.pth
"""

import argparse
import importlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from panoptic_segformer.modeling.backbone import (  # noqa: E402
    checkpoint_filter_fn_of,
    import_timm,
    read_state_dict,
)

AUTHOR = "Panoptic-SegFormer (official) converted"
_SHOWN = 30  # keys named per kind of problem in an error


@dataclass(frozen=True)
class Rule:
    """Renames a module: ``official`` is a regex matched from the start of a key up to a dot
    boundary, ``ours`` its ``re.Match.expand`` template; the rest of the key is kept."""

    official: str
    ours: str


@dataclass(frozen=True)
class Ignore:
    """Official keys (a regex matching the whole key) deliberately left out, and why."""

    official: str
    reason: str


IGNORED = (
    Ignore(
        r"backbone\..*\.num_batches_tracked",
        "BatchNorm's step counter: training-only (mmdet's BN, requires_grad=False and "
        "norm_eval=True, never updates statistics); detectron2's FrozenBN has no such buffer",
    ),
    Ignore(
        r"backbone\..*\.relative_position_index",
        "Swin's constant relative-position index (a persistent buffer in the original code); "
        "timm recomputes it as a non-persistent buffer",
    ),
    Ignore(
        r"bbox_head\.reg_branches2\..*",
        "box heads on the thing mask-decoder layers: dead weights, read only by auxiliary box "
        "losses the authors multiply by 0 (loss_single_panoptic: 'We let this loss be 0'), "
        "never at inference; this model has no such heads",
    ),
)


def _indexed(official: str, ours: str, renames: Sequence[Tuple[str, str]]) -> List[Rule]:
    """Rules for ``official.N.<a>`` -> ``ours.N.<b>`` for every (a, b) of ``renames``."""
    return [
        Rule(rf"{re.escape(official)}\.(\d+)\.{re.escape(a)}", rf"{ours}.\1.{b}")
        for a, b in renames
    ]


# mmcv 1.3 BaseTransformerLayer, operation order (self_attn, norm, ffn, norm)
_ENCODER_LAYER = (
    ("attentions.0", "self_attn"),
    ("norms.0", "norm1"),
    ("ffns.0.layers.0.0", "ffn.linear1"),
    ("ffns.0.layers.1", "ffn.linear2"),
    ("norms.1", "ffn.norm"),
)
# operation order (self_attn, norm, cross_attn, norm, ffn, norm)
_DECODER_LAYER = (
    ("attentions.0.attn", "self_attn"),
    ("norms.0", "norm1"),
    ("attentions.1", "cross_attn"),
    ("norms.1", "norm2"),
    ("ffns.0.layers.0.0", "ffn.linear1"),
    ("ffns.0.layers.1", "ffn.linear2"),
    ("norms.2", "ffn.norm"),
)
# nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) -> MLP.layers
_BOX_HEAD = (("0", "layers.0"), ("2", "layers.1"), ("4", "layers.2"))
_MASK_ATTENTION = (
    ("linear_l1.0", "to_mask.level_maps.0"),
    ("linear_l2.0", "to_mask.level_maps.1"),
    ("linear_l3.0", "to_mask.level_maps.2"),
    ("linear.0", "to_mask.fuse"),
)
# mask_head.py Block (self_attention only in the stuff stack)
_MASK_BLOCK = (
    ("self_attention.qkv.weight", "self_attn.in_proj_weight"),
    ("self_attention.qkv.bias", "self_attn.in_proj_bias"),
    ("self_attention.proj", "self_attn.out_proj"),
    ("norm3", "norm_self"),
    ("attn.q", "cross_attn.q_proj"),
    ("attn.k", "cross_attn.k_proj"),
    ("attn.v", "cross_attn.v_proj"),
    ("attn.proj", "cross_attn.out_proj"),
    *((f"attn.{a}", f"cross_attn.{b}") for a, b in _MASK_ATTENTION),
    ("head_norm1", "norm_cross"),
    ("mlp.fc1", "ffn.linear1"),
    ("mlp.fc2", "ffn.linear2"),
    ("head_norm2", "ffn.norm"),
)
# mask_head.py AttentionTail
_MASK_TAIL = (("q", "q_proj"), ("k", "k_proj"), *_MASK_ATTENTION)

HEAD_RULES: Tuple[Rule, ...] = (
    Rule(r"neck\.convs\.(\d+)\.conv", r"model.neck.lateral_convs.\1.0"),
    Rule(r"neck\.convs\.(\d+)\.gn", r"model.neck.lateral_convs.\1.1"),
    Rule(r"neck\.extra_convs\.(\d+)\.conv", r"model.neck.extra_convs.\1.0"),
    Rule(r"neck\.extra_convs\.(\d+)\.gn", r"model.neck.extra_convs.\1.1"),
    Rule(r"bbox_head\.transformer\.level_embeds", "model.level_embed"),
    *_indexed("bbox_head.transformer.encoder.layers", "model.encoder.layers", _ENCODER_LAYER),
    *_indexed(
        "bbox_head.transformer.decoder.layers", "model.location_decoder.layers", _DECODER_LAYER
    ),
    Rule(r"bbox_head\.transformer\.reference_points", "model.location_decoder.reference_points"),
    Rule(r"bbox_head\.query_embedding", "model.location_decoder.query_embed"),
    Rule(r"bbox_head\.cls_branches\.(\d+)", r"model.location_decoder.class_heads.\1"),
    *_indexed("bbox_head.reg_branches", "model.location_decoder.box_heads", _BOX_HEAD),
    *(
        rule
        for theirs, ours in (("things_mask_head", "things"), ("stuff_mask_head", "stuff"))
        for rule in (
            *_indexed(
                f"bbox_head.{theirs}.blocks", f"model.mask_decoder.{ours}.layers", _MASK_BLOCK
            ),
            *(
                Rule(
                    rf"bbox_head\.{theirs}\.attnen\.{re.escape(a)}",
                    f"model.mask_decoder.{ours}.tail.{b}",
                )
                for a, b in _MASK_TAIL
            ),
        )
    ),
    Rule(r"bbox_head\.stuff_query", "model.mask_decoder.stuff_query"),
    Rule(r"bbox_head\.cls_thing_branches\.(\d+)", r"model.mask_decoder.thing_class_heads.\1"),
    Rule(r"bbox_head\.cls_stuff_branches\.(\d+)", r"model.mask_decoder.stuff_class_heads.\1"),
)

# mmdet ResNet (layer1..layer4) -> detectron2 ResNet (res2..res5)
RESNET_RULES: Tuple[Rule, ...] = (
    Rule(r"backbone\.conv1", "backbone.stem.conv1"),
    Rule(r"backbone\.bn1", "backbone.stem.conv1.norm"),
    *(
        rule
        for i in range(1, 5)
        for rule in (
            Rule(rf"backbone\.layer{i}\.(\d+)\.conv(\d)", rf"backbone.res{i + 1}.\1.conv\2"),
            Rule(rf"backbone\.layer{i}\.(\d+)\.bn(\d)", rf"backbone.res{i + 1}.\1.conv\2.norm"),
            Rule(rf"backbone\.layer{i}\.(\d+)\.downsample\.0", rf"backbone.res{i + 1}.\1.shortcut"),
            Rule(
                rf"backbone\.layer{i}\.(\d+)\.downsample\.1",
                rf"backbone.res{i + 1}.\1.shortcut.norm",
            ),
        )
    ),
)

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


# report parts: name -> prefixes of our keys
PARTS: Dict[str, Tuple[str, ...]] = {
    "backbone": ("backbone.",),
    "neck": ("model.neck.",),
    "encoder": ("model.encoder.", "model.level_embed"),
    "location decoder": ("model.location_decoder.",),
    "mask decoder": ("model.mask_decoder.",),
}


def part_of(key: str) -> str:
    """The part (a key of ``PARTS``) of one of our keys, "other" for none."""
    return next((p for p, prefixes in PARTS.items() if key.startswith(prefixes)), "other")


def _listed(items: Sequence[str]) -> str:
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


class ConversionError(ValueError):
    """The checkpoint does not convert to the model; every problem is named.

    Attributes:
        unmapped: official keys no rule or ignore entry covers.
        unexpected: "official -> ours" renames onto names the model lacks (or filled twice).
        missing: our keys no official tensor fills.
        mismatched: "official -> ours: checkpoint (shape) vs model (shape)".
    """

    def __init__(
        self, unmapped: List[str], unexpected: List[str], missing: List[str], mismatched: List[str]
    ) -> None:
        self.unmapped, self.unexpected, self.missing = unmapped, unexpected, missing
        self.mismatched = mismatched
        problems = [
            f"{len(keys)} {what}: {_listed(keys)}"
            for keys, what in (
                (unmapped, "checkpoint tensors match no rule"),
                (unexpected, "checkpoint tensors map to no (or an already filled) model entry"),
                (missing, "model entries are not filled"),
                (mismatched, "shapes differ"),
            )
            if keys
        ]
        super().__init__("the checkpoint does not convert to this model: " + "; ".join(problems))


@dataclass
class ConversionReport:
    """What happened to every official tensor.

    Attributes:
        renamed: official key -> our key.
        ignored: official key -> the reason (an ``IGNORED`` entry).
        numel: our key -> number of elements.
    """

    renamed: Dict[str, str] = field(default_factory=dict)
    ignored: Dict[str, str] = field(default_factory=dict)
    numel: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> Dict[str, object]:
        """Counts per part (tensors and elements), ignored tensors per reason, totals."""
        parts = {name: {"tensors": 0, "elements": 0} for name in PARTS}
        for ours in self.renamed.values():
            counts = parts.setdefault(part_of(ours), {"tensors": 0, "elements": 0})
            counts["tensors"] += 1
            counts["elements"] += self.numel[ours]
        return {
            "parts": parts,
            "converted_tensors": len(self.renamed),
            "ignored_tensors": len(self.ignored),
            "ignored": [
                {"reason": r, "tensors": n} for r, n in Counter(self.ignored.values()).items()
            ],
        }


def _rename(rules: Sequence[Rule], key: str) -> Optional[str]:
    for rule in rules:
        match = re.match(rule.official + r"(?=\.|$)", key)
        if match:
            return match.expand(rule.ours) + key[match.end() :]
    return None


def _ignore_reason(key: str) -> Optional[str]:
    return next((i.reason for i in IGNORED if re.fullmatch(i.official, key)), None)


def _timm_rules(model: nn.Module) -> Tuple[List[Rule], Optional[nn.Module]]:
    """For a timm backbone: the rules of the Swin output norms, and the timm feature
    extractor; for any other backbone: no rules and None."""
    net = getattr(model.backbone, "net", None)
    features = getattr(net, "model", None)
    if features is None or not hasattr(features, "feature_info"):
        return [], None
    # the authors' Swin adds a LayerNorm "norm{i}" to each output stage i
    stages = features.feature_info.out_indices if len(net.norms) else ()
    rules = [Rule(rf"backbone\.norm{i}", f"backbone.net.norms.{j}") for j, i in enumerate(stages)]
    return rules, features


def _convert_timm(
    official: Dict[str, Tensor], features: nn.Module
) -> Tuple[Dict[str, str], List[str]]:
    """Renames the original Swin / PVTv2 release names (``backbone.*``) to our timm feature
    extractor's, through the family's ``checkpoint_filter_fn``, the function timm (and
    ``TimmBackbone``'s MODEL.TIMM.PRETRAINED) uses for these releases.

    Returns:
        official key -> our key, and a description of each official tensor that did not come
        through unchanged (dropped, or resized by timm because its shape does not fit).
    """
    timm = import_timm()
    architecture = features.pretrained_cfg["architecture"]
    filter_fn = checkpoint_filter_fn_of(timm, architecture)
    with torch.device("meta"):  # names and shapes only
        full = timm.create_model(architecture, pretrained=False)
    stripped = {key[len("backbone.") :]: tensor for key, tensor in official.items()}
    # timm passes tensors it only renames through: identity tells where each one came from
    source = {id(tensor): key for key, tensor in official.items()}
    # timm's feature extractors name the children of a flattened nn.Sequential "a_b" for "a.b"
    children: Dict[str, str] = {}
    for name, child in full.named_children():
        if isinstance(child, nn.Sequential):
            children.update({f"{name}.{c}": f"{name}_{c}" for c, _ in child.named_children()})
        else:
            children[name] = name
    renamed: Dict[str, str] = {}
    for key, tensor in filter_fn(stripped, full).items():
        if id(tensor) not in source:
            continue  # resized by timm: its source is reported as not converted
        parts = key.split(".")
        head = ".".join(parts[:2]) if ".".join(parts[:2]) in children else parts[0]
        ours = children.get(head, head) + key[len(head) :]
        renamed[source[id(tensor)]] = "backbone.net.model." + ours
    not_converted = [
        f"{key}: checkpoint {tuple(official[key].shape)} dropped or resized by timm's "
        f"checkpoint_filter_fn for {architecture}"
        for key in official
        if key not in renamed
    ]
    return renamed, not_converted


def convert_state_dict(
    official: Mapping[str, Tensor], model: nn.Module
) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Renames the authors' tensors to ``model``'s names and checks them against it.

    Args:
        official: the authors' ``state_dict`` (``backbone.*``, ``neck.*``, ``bbox_head.*``).
        model: the detectron2 ``PanopticSegFormer`` to convert for; only its state dict's names
            and shapes are read (its tensors may be on the meta device).

    Returns:
        our state dict (the official tensors themselves, renamed) and the report.

    Raises:
        ConversionError: when an official tensor is neither renamed nor ignored, a renamed one
            has no (or an already filled) entry in the model, a model entry stays unfilled, or
            a shape differs.
    """
    expected = model.state_dict()
    backbone_rules, timm_features = _timm_rules(model)
    if timm_features is None:
        backbone_rules = list(RESNET_RULES)
    rules = [*backbone_rules, *HEAD_RULES]
    report = ConversionReport()
    unmapped: List[str] = []
    unexpected: List[str] = []
    mismatched: List[str] = []
    timm_keys: Dict[str, Tensor] = {}
    for key, tensor in official.items():
        reason = _ignore_reason(key)
        ours = None if reason else _rename(rules, key)
        if reason:
            report.ignored[key] = reason
        elif ours is not None:
            report.renamed[key] = ours
        elif timm_features is not None and key.startswith("backbone."):
            timm_keys[key] = tensor
        else:
            unmapped.append(key)
    if timm_keys:
        renamed, not_converted = _convert_timm(timm_keys, timm_features)
        report.renamed.update(renamed)
        mismatched += not_converted

    converted: Dict[str, Tensor] = {}
    for key, ours in report.renamed.items():
        tensor = official[key]
        if ours not in expected or ours in converted:
            unexpected.append(f"{key} -> {ours}")
        elif tensor.shape != expected[ours].shape:
            mismatched.append(
                f"{key} -> {ours}: checkpoint {tuple(tensor.shape)} vs model "
                f"{tuple(expected[ours].shape)}"
            )
        else:
            converted[ours] = tensor
    filled = set(report.renamed.values())  # a mis-shaped tensor is reported once, as such
    missing = [key for key in expected if key not in filled]
    if unmapped or unexpected or missing or mismatched:
        raise ConversionError(unmapped, unexpected, missing, mismatched)
    report.numel = {key: tensor.numel() for key, tensor in converted.items()}
    # in the model's order, so the file reads like the model
    return {key: converted[key] for key in expected}, report


def setup_cfg(config_file: str, opts: Sequence[str]):
    """The detectron2 config of ``config_file`` with Panoptic SegFormer's keys and ``opts``."""

    from panoptic_segformer.config import get_config

    return get_config(config_file, opts)


def build_model_for_conversion(cfg) -> nn.Module:
    """The config's meta-architecture for its state dict's names and shapes: its sub-modules are
    built on the meta device (a model of any size in a moment and without memory), the
    meta-architecture itself on the CPU (it computes its class maps from its ids); ImageNet
    weights (MODEL.TIMM.PRETRAINED) are not read."""
    from detectron2.modeling import META_ARCH_REGISTRY

    importlib.import_module("panoptic_segformer")  # registers the meta-architecture, backbones
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.TIMM.PRETRAINED = ""
    architecture = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    # torch.device as a context: factory calls of this thread only, nothing patched
    with torch.device("meta"):
        parts = architecture.from_config(cfg)
    return architecture(**parts)


def format_summary(summary: Dict[str, object]) -> str:
    """The summary as a table: tensors and elements per part, then the ignored tensors."""
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint of the authors' mmdet Panoptic SegFormer "
        "(github.com/zhiqi-li/Panoptic-SegFormer) into this project's detectron2 format.",
        epilog="Refuses, naming the keys, when a tensor is left unmapped, a model entry is not "
        "filled or a shape differs. Writes OUTPUT and a summary OUTPUT.json.",
    )
    parser.add_argument(
        "--config-file", required=True, help="this project's config, e.g. configs/r50.yaml"
    )
    parser.add_argument("--input", required=True, help="the authors' checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Converts ``--input`` for ``--config-file``; returns the exit status (1 on refusal)."""
    args = parse_args(argv)
    official = read_state_dict(args.input)
    cfg = setup_cfg(args.config_file, args.opts)
    model = build_model_for_conversion(cfg)
    try:
        state_dict, report = convert_state_dict(official, model)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.save({"model": state_dict, "__author__": AUTHOR}, args.output)
    summary = {
        "input": str(args.input),
        "config_file": str(args.config_file),
        "opts": list(args.opts),
        "output": str(args.output),
        **report.summary(),
        "use_with": use_with(cfg, str(args.output)),
    }
    Path(f"{args.output}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {args.output} and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
