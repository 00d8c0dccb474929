"""The authors' mmdet checkpoints as this project's: the rename rules and the conversion.

The authors' implementation (github.com/zhiqi-li/Panoptic-SegFormer, mmdet 2.12 / mmcv 1.3.4)
saves ``{"state_dict": ..., "meta": ...}`` holding the detector's ``backbone.*``, ``neck.*`` and
``bbox_head.*`` tensors. :func:`convert_state_dict` renames every tensor to the name it has in
the ``PanopticSegFormer`` meta-architecture, or leaves it out for a reason in ``IGNORED``, and
checks the result against the model: each official tensor is renamed or ignored, each model
entry is filled exactly once and every shape is equal; otherwise it raises
:class:`ConversionError`, naming the keys. The renames are the rule tables below: mmdet's ResNet
to detectron2's (``RESNET_RULES``), the original Swin and PVTv2 releases to timm's feature
extractor through timm's own ``checkpoint_filter_fn`` (as for MODEL.TIMM.PRETRAINED), and the
ChannelMapper neck, the mmcv encoder and location decoder layers and the mask decoder
(``HEAD_RULES``); a rule renames a module prefix and keeps the rest of the key (``weight``,
``bias``, ``running_mean`` ...).

No tensor needs a reshape, split or merge: both query embeddings are one (Q, 2C) table in both
codes, split the same way (location decoder: position then content, as Deformable DETR; stuff
queries: content then position), the mask decoder's self-attention ``qkv`` Linear has
``nn.MultiheadAttention``'s ``in_proj`` layout (q, k, v blocks, heads contiguous in each), and
class rows need no permutation: the authors number COCO's categories in category-id order
(things 0-79, stuff 80-132), the model order on detectron2's COCO panoptic metadata.

Plain PyTorch (and timm for its backbones). Which config evaluates a converted checkpoint is
:mod:`panoptic_segformer.d2.official_settings`; the command line is
``tools/convert_official_checkpoint.py``.
"""

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from panoptic_segformer.modeling.backbone import checkpoint_filter_fn_of, import_timm

AUTHOR = "Panoptic-SegFormer (official) converted"  # a converted file's __author__
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

# mmdet ChannelMapper (ConvModule: conv, GroupNorm "gn") -> nn.Sequential(conv, norm); mmcv
# BaseTransformerLayers, the mask heads' blocks (``blocks.N``) and attention tails (``attnen``)
# -> our layers, by the tables above
HEAD_RULES: Tuple[Rule, ...] = (
    Rule(r"neck\.convs\.(\d+)\.conv", r"core.neck.lateral_convs.\1.0"),
    Rule(r"neck\.convs\.(\d+)\.gn", r"core.neck.lateral_convs.\1.1"),
    Rule(r"neck\.extra_convs\.(\d+)\.conv", r"core.neck.extra_convs.\1.0"),
    Rule(r"neck\.extra_convs\.(\d+)\.gn", r"core.neck.extra_convs.\1.1"),
    Rule(r"bbox_head\.transformer\.level_embeds", "core.level_embed"),
    *_indexed("bbox_head.transformer.encoder.layers", "core.encoder.layers", _ENCODER_LAYER),
    *_indexed(
        "bbox_head.transformer.decoder.layers", "core.location_decoder.layers", _DECODER_LAYER
    ),
    Rule(r"bbox_head\.transformer\.reference_points", "core.location_decoder.reference_points"),
    Rule(r"bbox_head\.query_embedding", "core.location_decoder.query_embed"),
    Rule(r"bbox_head\.cls_branches\.(\d+)", r"core.location_decoder.class_heads.\1"),
    *_indexed("bbox_head.reg_branches", "core.location_decoder.box_heads", _BOX_HEAD),
    *(
        rule
        for theirs, ours in (("things_mask_head", "things"), ("stuff_mask_head", "stuff"))
        for rule in (
            *_indexed(
                f"bbox_head.{theirs}.blocks", f"core.mask_decoder.{ours}.layers", _MASK_BLOCK
            ),
            *(
                Rule(
                    rf"bbox_head\.{theirs}\.attnen\.{re.escape(a)}",
                    f"core.mask_decoder.{ours}.tail.{b}",
                )
                for a, b in _MASK_TAIL
            ),
        )
    ),
    Rule(r"bbox_head\.stuff_query", "core.mask_decoder.stuff_query"),
    Rule(r"bbox_head\.cls_thing_branches\.(\d+)", r"core.mask_decoder.thing_class_heads.\1"),
    Rule(r"bbox_head\.cls_stuff_branches\.(\d+)", r"core.mask_decoder.stuff_class_heads.\1"),
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

# report parts: name -> prefixes of our keys
PARTS: Dict[str, Tuple[str, ...]] = {
    "backbone": ("backbone.",),
    "neck": ("core.neck.",),
    "encoder": ("core.encoder.", "core.level_embed"),
    "location decoder": ("core.location_decoder.",),
    "mask decoder": ("core.mask_decoder.",),
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
