"""The authors' mmdet checkpoints become ours, or the conversion refuses: the rules and the
report (``panoptic_segformer.d2.official_checkpoint`` and ``official_settings``), and the command
line ``tools/convert_official_checkpoint.py``.

The authors' names and shapes are generated here independently of the converter's rules, from
the structure of their code (mmdet 2.12 ResNet and ChannelMapper, mmcv 1.3 Deformable DETR
layers, ``easymd/models/panformer/{panformer_head,mask_head}.py``, the original Swin and PVTv2
detection backbones), and their mask head is re-implemented functionally to check that the
converted weights compute the same masks, queries and class scores in our mask decoder.
"""

import copy
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import pytest
from skips import require, require_detectron2

require_detectron2()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from d2_helpers import CONFIGS, INSTANCES, TINY, make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from torch import Tensor  # noqa: E402

from panoptic_segformer import PanopticSegFormerCheckpointer  # noqa: E402
from panoptic_segformer.d2.official_checkpoint import (  # noqa: E402
    HEAD_RULES,
    IGNORED,
    PARTS,
    RESNET_RULES,
    ConversionError,
    convert_state_dict,
)
from panoptic_segformer.d2.official_settings import format_summary, use_with  # noqa: E402

ROOT = CONFIGS[0].parents[1]
BASE = ROOT / "configs" / "r50.yaml"
R50 = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"]
TWO_MASK_LAYERS = [
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "2",
]  # fmt: skip
Shapes = Dict[str, Tuple[int, ...]]

# head hyper-parameters: TINY's, and the authors' configs/panformer/base.py
TINY_HEAD = dict(dim=64, heads=4, ffn=128, enc=1, dec=2, queries=20, thing_layers=1, stuff_layers=1)
FULL_HEAD = dict(
    dim=256, heads=8, ffn=1024, enc=6, dec=6, queries=300, thing_layers=4, stuff_layers=6
)


# ---- the authors' names and shapes, from their code's structure -------------------------------


def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> Shapes:
    shapes = {f"{prefix}.weight": (out, inp)}
    return {**shapes, f"{prefix}.bias": (out,)} if bias else shapes


def _norm(prefix: str, c: int, batch_norm: bool = False) -> Shapes:
    shapes = {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}
    if batch_norm:
        stats = ("running_mean", "running_var")
        shapes.update(
            {f"{prefix}.{s}": (c,) for s in stats}, **{f"{prefix}.num_batches_tracked": ()}
        )
    return shapes


def mmdet_resnet(depth: int) -> Shapes:
    """mmdet's ResNet (style "pytorch"): conv1/bn1, layer{1-4} of BasicBlock or Bottleneck."""
    counts = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    expansion = 1 if depth < 50 else 4
    shapes = {"backbone.conv1.weight": (64, 3, 7, 7), **_norm("backbone.bn1", 64, True)}
    inplanes = 64
    for stage, count in enumerate(counts):
        planes = 64 * 2**stage
        for b in range(count):
            p = f"backbone.layer{stage + 1}.{b}"
            if expansion == 1:
                convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            else:
                convs = [
                    (planes, inplanes, 1, 1),
                    (planes, planes, 3, 3),
                    (4 * planes, planes, 1, 1),
                ]
            for k, shape in enumerate(convs, 1):
                shapes[f"{p}.conv{k}.weight"] = shape
                shapes.update(_norm(f"{p}.bn{k}", shape[0], True))
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                shapes.update(_norm(f"{p}.downsample.1", planes * expansion, True))
            inplanes = planes * expansion
    return shapes


def original_swin_large(window: int = 7) -> Shapes:
    """Swin-Transformer-Object-Detection's SwinTransformer, Swin-L, out_indices (1, 2, 3)."""
    embed, depths, heads = 192, (2, 2, 18, 2), (6, 12, 24, 48)
    shapes = {"backbone.patch_embed.proj.weight": (embed, 3, 4, 4)}
    shapes["backbone.patch_embed.proj.bias"] = (embed,)
    shapes.update(_norm("backbone.patch_embed.norm", embed))
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed * 2**i
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}"
            shapes.update(_norm(f"{p}.norm1", dim))
            shapes[f"{p}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, h)
            shapes[f"{p}.attn.relative_position_index"] = (window**2, window**2)
            shapes.update(_linear(f"{p}.attn.qkv", 3 * dim, dim))
            shapes.update(_linear(f"{p}.attn.proj", dim, dim))
            shapes.update(_norm(f"{p}.norm2", dim))
            shapes.update(_linear(f"{p}.mlp.fc1", 4 * dim, dim))
            shapes.update(_linear(f"{p}.mlp.fc2", dim, 4 * dim))
        if i < 3:
            shapes.update(
                _linear(f"backbone.layers.{i}.downsample.reduction", 2 * dim, 4 * dim, False)
            )
            shapes.update(_norm(f"backbone.layers.{i}.downsample.norm", 4 * dim))
    for i in (1, 2, 3):
        shapes.update(_norm(f"backbone.norm{i}", embed * 2**i))
    return shapes


def original_pvt_v2_b5() -> Shapes:
    """The authors' easymd/models/backbones/pvt_v2.py, pvt_v2_b5."""
    dims, ratios, depths, srs = (64, 128, 320, 512), (4, 4, 4, 4), (3, 6, 40, 3), (8, 4, 2, 1)
    shapes: Shapes = {}
    for i, (dim, ratio, depth, sr) in enumerate(zip(dims, ratios, depths, srs)):
        p = f"backbone.patch_embed{i + 1}"
        shapes[f"{p}.proj.weight"] = (dim, 3, 7, 7) if i == 0 else (dim, dims[i - 1], 3, 3)
        shapes[f"{p}.proj.bias"] = (dim,)
        shapes.update(_norm(f"{p}.norm", dim))
        for j in range(depth):
            p = f"backbone.block{i + 1}.{j}"
            shapes.update(_norm(f"{p}.norm1", dim))
            shapes.update(_linear(f"{p}.attn.q", dim, dim))
            shapes.update(_linear(f"{p}.attn.kv", 2 * dim, dim))
            shapes.update(_linear(f"{p}.attn.proj", dim, dim))
            if sr > 1:
                shapes[f"{p}.attn.sr.weight"] = (dim, dim, sr, sr)
                shapes[f"{p}.attn.sr.bias"] = (dim,)
                shapes.update(_norm(f"{p}.attn.norm", dim))
            shapes.update(_norm(f"{p}.norm2", dim))
            shapes.update(_linear(f"{p}.mlp.fc1", ratio * dim, dim))
            shapes[f"{p}.mlp.dwconv.dwconv.weight"] = (ratio * dim, 1, 3, 3)
            shapes[f"{p}.mlp.dwconv.dwconv.bias"] = (ratio * dim,)
            shapes.update(_linear(f"{p}.mlp.fc2", dim, ratio * dim))
        shapes.update(_norm(f"backbone.norm{i + 1}", dim))
    return shapes


def _msda(p: str, dim: int, heads: int, levels: int = 4, points: int = 4) -> Shapes:
    return {
        **_linear(f"{p}.sampling_offsets", heads * levels * points * 2, dim),
        **_linear(f"{p}.attention_weights", heads * levels * points, dim),
        **_linear(f"{p}.value_proj", dim, dim),
        **_linear(f"{p}.output_proj", dim, dim),
    }


def _mask_attention(p: str, dim: int, heads: int, tail: bool) -> Shapes:
    shapes = {**_linear(f"{p}.q", dim, dim), **_linear(f"{p}.k", dim, dim)}
    if not tail:
        shapes.update({**_linear(f"{p}.v", dim, dim), **_linear(f"{p}.proj", dim, dim)})
    for level in (1, 2, 3):
        shapes.update(_linear(f"{p}.linear_l{level}.0", heads, heads))
    return {**shapes, **_linear(f"{p}.linear.0", 1, 3 * heads)}


def _reg_branch(p: str, dim: int) -> Shapes:
    return {
        **_linear(f"{p}.0", dim, dim),
        **_linear(f"{p}.2", dim, dim),
        **_linear(f"{p}.4", 4, dim),
    }


def authors_head(
    in_channels: Sequence[int], dim, heads, ffn, enc, dec, queries, thing_layers, stuff_layers
) -> Shapes:
    """ChannelMapper neck (4 levels) and PanformerHead (80 thing, 53 stuff classes)."""
    things, stuff, levels = 80, 53, 4
    shapes: Shapes = {}
    for i, c in enumerate(in_channels):
        shapes[f"neck.convs.{i}.conv.weight"] = (dim, c, 1, 1)
        shapes.update(_norm(f"neck.convs.{i}.gn", dim))
    for i in range(levels - len(in_channels)):
        shapes[f"neck.extra_convs.{i}.conv.weight"] = (
            dim,
            in_channels[-1] if i == 0 else dim,
            3,
            3,
        )
        shapes.update(_norm(f"neck.extra_convs.{i}.gn", dim))
    t = "bbox_head.transformer"
    shapes[f"{t}.level_embeds"] = (levels, dim)
    shapes.update(_linear(f"{t}.reference_points", 2, dim))
    for i in range(enc):
        p = f"{t}.encoder.layers.{i}"
        shapes.update(_msda(f"{p}.attentions.0", dim, heads))
        shapes.update({**_norm(f"{p}.norms.0", dim), **_norm(f"{p}.norms.1", dim)})
        shapes.update(_linear(f"{p}.ffns.0.layers.0.0", ffn, dim))
        shapes.update(_linear(f"{p}.ffns.0.layers.1", dim, ffn))
    for i in range(dec):
        p = f"{t}.decoder.layers.{i}"
        shapes[f"{p}.attentions.0.attn.in_proj_weight"] = (3 * dim, dim)
        shapes[f"{p}.attentions.0.attn.in_proj_bias"] = (3 * dim,)
        shapes.update(_linear(f"{p}.attentions.0.attn.out_proj", dim, dim))
        shapes.update(_msda(f"{p}.attentions.1", dim, heads))
        for k in range(3):
            shapes.update(_norm(f"{p}.norms.{k}", dim))
        shapes.update(_linear(f"{p}.ffns.0.layers.0.0", ffn, dim))
        shapes.update(_linear(f"{p}.ffns.0.layers.1", dim, ffn))
        shapes.update(_linear(f"bbox_head.cls_branches.{i}", things, dim))
        shapes.update(_reg_branch(f"bbox_head.reg_branches.{i}", dim))
    shapes["bbox_head.query_embedding.weight"] = (queries, 2 * dim)
    shapes["bbox_head.stuff_query.weight"] = (stuff, 2 * dim)
    for i in range(thing_layers):
        shapes.update(_reg_branch(f"bbox_head.reg_branches2.{i}", dim))
        shapes.update(_linear(f"bbox_head.cls_thing_branches.{i}", things, dim))
    for i in range(stuff_layers):
        shapes.update(_linear(f"bbox_head.cls_stuff_branches.{i}", 1, dim))
    for name, count in (("things_mask_head", thing_layers), ("stuff_mask_head", stuff_layers)):
        for i in range(count):
            p = f"bbox_head.{name}.blocks.{i}"
            shapes.update(_norm(f"{p}.head_norm1", dim))
            shapes.update(_mask_attention(f"{p}.attn", dim, heads, tail=False))
            shapes.update(_norm(f"{p}.head_norm2", dim))
            shapes.update(_linear(f"{p}.mlp.fc1", 4 * dim, dim))
            shapes.update(_linear(f"{p}.mlp.fc2", dim, 4 * dim))
            if name == "stuff_mask_head":
                shapes.update(_linear(f"{p}.self_attention.qkv", 3 * dim, dim))
                shapes.update(_linear(f"{p}.self_attention.proj", dim, dim))
                shapes.update(_norm(f"{p}.norm3", dim))
        shapes.update(_mask_attention(f"bbox_head.{name}.attnen", dim, heads, tail=True))
    return shapes


def random_tensors(shapes: Shapes, seed: int = 0) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in tensors:
        if k.endswith("running_var"):  # a valid variance
            tensors[k] = tensors[k].abs() + 0.5
        elif k.endswith("num_batches_tracked"):
            tensors[k] = torch.randint(0, 100, shapes[k], generator=g)
    return tensors


# ---- the authors' mask head, functionally (easymd/models/panformer/mask_head.py) --------------


def _lin(sd: Dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ln(sd: Dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def authors_attention(sd, p, query, memory, hw, heads, tail):
    """``Attention`` (tail=False) and ``AttentionTail`` (tail=True): (output, mask)."""
    b, n, c = query.shape
    s = memory.shape[1]
    q = _lin(sd, f"{p}.q", query).reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
    k = _lin(sd, f"{p}.k", memory).reshape(b, s, heads, c // heads).permute(0, 2, 1, 3)
    attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    attn = attn.permute(0, 2, 3, 1)
    w1 = hw[0][0] * hw[0][1]
    w2 = w1 + hw[1][0] * hw[1][1]
    f1 = _lin(sd, f"{p}.linear_l1.0", attn[:, :, :w1]).relu()
    coarse = []
    for level, part in ((1, attn[:, :, w1:w2]), (2, attn[:, :, w2:])):
        f = _lin(sd, f"{p}.linear_l{level + 1}.0", part).relu()
        f = f.permute(0, 1, 3, 2).reshape(-1, heads, *hw[level])
        f = F.interpolate(f, size=hw[0], mode="bilinear")
        coarse.append(f.permute(0, 2, 3, 1).reshape(b, n, w1, heads))
    mask = _lin(sd, f"{p}.linear.0", torch.cat([f1, *coarse], -1)).relu()
    if tail:
        return None, mask
    v = _lin(sd, f"{p}.v", memory).reshape(b, s, heads, c // heads).permute(0, 2, 1, 3)
    x = (attn.permute(0, 3, 1, 2).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return _lin(sd, f"{p}.proj", x), mask


def authors_block(sd, p, query, memory, hw, heads, self_attn):
    b, n, c = query.shape
    if self_attn:
        qkv = _lin(sd, f"{p}.self_attention.qkv", query)
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        x = _lin(sd, f"{p}.self_attention.proj", (attn @ v).transpose(1, 2).reshape(b, n, c))
        query = _ln(sd, f"{p}.norm3", query + x)
    x, mask = authors_attention(sd, f"{p}.attn", query, memory, hw, heads, tail=False)
    query = _ln(sd, f"{p}.head_norm1", query + x)
    hidden = _lin(sd, f"{p}.mlp.fc2", F.gelu(_lin(sd, f"{p}.mlp.fc1", query)))
    return _ln(sd, f"{p}.head_norm2", query + hidden), mask


def authors_mask_head(sd, p, query, pos: Optional[Tensor], memory, hw, heads, blocks, self_attn):
    """``MaskHead.forward``: masks of every block and the tail, (N, Q, H1, W1); queries."""
    masks, queries = [], []
    for i in range(blocks):
        query_in = query if pos is None else query + pos
        query, mask = authors_block(sd, f"{p}.blocks.{i}", query_in, memory, hw, heads, self_attn)
        masks.append(mask)
        queries.append(query)
    tail_in = query if pos is None else query + pos
    masks.append(authors_attention(sd, f"{p}.attnen", tail_in, memory, hw, heads, tail=True)[1])
    return [m.reshape(*m.shape[:2], *hw[0]) for m in masks], queries


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool(load_tool):
    """The command line (``main``, ``parse_args``) and its ``build_model_for_conversion``."""
    return load_tool("convert_official_checkpoint")


def tiny_model(*opts, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(make_cfg(BASE, *TINY, *INSTANCES, *opts)).eval()


def tiny_shapes(depth: int = 18, **head) -> Shapes:
    in_channels = (128, 256, 512) if depth == 18 else (512, 1024, 2048)
    return {**mmdet_resnet(depth), **authors_head(in_channels, **{**TINY_HEAD, **head})}


@pytest.fixture(scope="module")
def r50_converted():
    """A tiny-head R50 with two mask layers per stack, its random official checkpoint, the
    conversion loaded into it, and the report."""
    official = random_tensors(tiny_shapes(50, thing_layers=2, stuff_layers=2))
    model = tiny_model(*R50, *TWO_MASK_LAYERS)
    state_dict, report = convert_state_dict(official, model)
    incompatible = model.load_state_dict(state_dict, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return official, model, report


def image(seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g)


# ---- tests ------------------------------------------------------------------------------------


def test_every_tensor_is_converted_or_ignored_with_its_reason(r50_converted):
    official, model, report = r50_converted
    ours = model.state_dict()
    assert set(report.renamed) | set(report.ignored) == set(official)
    assert not set(report.renamed) & set(report.ignored)
    assert sorted(report.renamed.values()) == sorted(ours)
    for key, target in report.renamed.items():
        assert torch.equal(ours[target], official[key]), key
    # 53 BatchNorms in ResNet-50; two thing mask layers, each with a 3-Linear box head
    assert set(report.ignored.values()) == {IGNORED[0].reason, IGNORED[2].reason}
    assert sum(k.endswith("num_batches_tracked") for k in report.ignored) == 53
    assert sum(k.startswith("bbox_head.reg_branches2.") for k in report.ignored) == 2 * 6
    summary = report.summary()
    assert summary["converted_tensors"] == len(ours) and summary["ignored_tensors"] == 53 + 12
    assert list(summary["parts"]) == list(PARTS)
    assert sum(p["tensors"] for p in summary["parts"].values()) == len(ours)
    assert summary["parts"]["backbone"]["tensors"] == 53 * 5  # 53 convs, 4 FrozenBN entries each
    assert summary["parts"]["neck"] == {"tensors": 12, "elements": 64 * (3584 + 2048 * 9 + 8)}


def test_every_official_key_matches_exactly_one_rule():
    rules = [*RESNET_RULES, *HEAD_RULES]
    for key in {**mmdet_resnet(50), **authors_head((512, 1024, 2048), **FULL_HEAD)}:
        # ignoring comes first; a key not ignored is renamed by exactly one rule
        ignored = sum(bool(re.fullmatch(i.official, key)) for i in IGNORED)
        renamed = sum(bool(re.match(r.official + r"(?=\.|$)", key)) for r in rules)
        assert ignored == 1 or (ignored == 0 and renamed == 1), key


def test_mask_decoder_computes_the_authors_masks_and_scores(r50_converted):
    official, model, _ = r50_converted
    # in float64, so that both codes agree to rounding however large the random weights
    decoder = copy.deepcopy(model.core.mask_decoder).double()
    official = {k: v.double() for k, v in official.items() if k.startswith("bbox_head.")}
    hw = [(4, 6), (2, 3), (1, 2)]
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(2, 24 + 6 + 2, 64, generator=g, dtype=torch.float64)
    things = torch.randn(2, 5, 64, generator=g, dtype=torch.float64)
    content, pos = official["bbox_head.stuff_query.weight"].split(64, dim=1)
    stuff = (content.expand(2, -1, -1), pos.expand(2, -1, -1))
    with torch.no_grad():
        for ours, theirs, head, classes in (
            (decoder.forward_things(things, memory, hw), ("things", things, None), "thing", 80),
            (decoder.forward_stuff(memory, hw), ("stuff", *stuff), "stuff", 1),
        ):
            name, query, query_pos = theirs
            masks, queries = authors_mask_head(
                official, f"bbox_head.{name}_mask_head", query, query_pos, memory, hw, 4, 2,
                self_attn=name == "stuff",
            )  # fmt: skip
            assert len(ours["masks"]) == len(masks) == 3
            for a, b in zip(ours["masks"], masks):
                torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
            assert bool(torch.stack(masks).amax() > 0)  # not trivially all zero after the ReLU
            for j, (a, q) in enumerate(zip(ours["logits"], queries)):
                logits = _lin(official, f"bbox_head.cls_{head}_branches.{j}", q)
                assert logits.shape[-1] == classes
                torch.testing.assert_close(a, logits.squeeze(-1), atol=1e-9, rtol=1e-9)


def test_weights_through_the_authors_names_give_identical_outputs():
    # our random model -> the authors' names -> converted -> another model: same predictions
    official = random_tensors(tiny_shapes())
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    _, report = convert_state_dict(official, source)
    weights = source.state_dict()
    official.update({key: weights[ours] for key, ours in report.renamed.items()})
    state_dict, _ = convert_state_dict(official, target)
    with torch.no_grad():
        before = target([{"image": image()}])[0]["instances"].scores
        target.load_state_dict(state_dict, strict=True)
        expected = source([{"image": image()}])[0]["instances"]
        converted = target([{"image": image()}])[0]["instances"]
    assert not torch.equal(before, converted.scores)
    assert torch.equal(converted.scores, expected.scores)
    assert torch.equal(converted.pred_masks, expected.pred_masks)


@pytest.mark.parametrize(
    "change, named",
    [
        ("remove", "core.encoder.layers.0.ffn.norm.weight"),
        ("extra", "bbox_head.transformer.unknown.weight"),
        ("extra_layer", "core.encoder.layers.1.norm1.weight"),
        ("shape", "bbox_head.cls_branches.1.weight -> core.location_decoder.class_heads.1.weight"),
    ],
)
def test_refuses_naming_the_key(change, named):
    official = random_tensors(tiny_shapes())
    if change == "remove":
        del official["bbox_head.transformer.encoder.layers.0.norms.1.weight"]
    elif change == "extra":
        official["bbox_head.transformer.unknown.weight"] = torch.zeros(3)
    elif change == "extra_layer":  # a second encoder layer for a model with one
        official["bbox_head.transformer.encoder.layers.1.norms.0.weight"] = torch.zeros(64)
    else:
        official["bbox_head.cls_branches.1.weight"] = torch.zeros(81, 64)
    with pytest.raises(ConversionError, match="does not convert") as error:
        convert_state_dict(official, tiny_model())
    assert named in str(error.value)
    problems = error.value.unmapped + error.value.unexpected
    problems += error.value.missing + error.value.mismatched
    assert len(problems) == 1


@pytest.mark.parametrize("config", ["r50", "r101", "swin_l", "pvtv2_b5"])
def test_full_size_configs_convert_completely(tool, config):
    """The authors' full-size names and shapes (on the meta device) fill the full-size model."""
    backbones = {
        "r50": (lambda: mmdet_resnet(50), (512, 1024, 2048)),
        "r101": (lambda: mmdet_resnet(101), (512, 1024, 2048)),
        "swin_l": (original_swin_large, (384, 768, 1536)),
        "pvtv2_b5": (original_pvt_v2_b5, (128, 320, 512)),
    }
    if config in ("swin_l", "pvtv2_b5"):
        require("timm", "the Swin and PVTv2 backbones need timm")
    backbone, in_channels = backbones[config]
    shapes = {**backbone(), **authors_head(in_channels, **FULL_HEAD)}
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model = tool.build_model_for_conversion(make_cfg(ROOT / "configs" / f"{config}.yaml"))
    state_dict, report = convert_state_dict(official, model)
    assert list(state_dict) == list(model.state_dict())
    assert all(state_dict[report.renamed[k]] is official[k] for k in report.renamed)
    # reg_branches2 (4 layers x 6), BN counters, Swin's relative position indices
    ignored = {"r50": 53, "r101": 104, "swin_l": 24, "pvtv2_b5": 0}[config]
    assert len(report.ignored) == 24 + ignored


def test_a_timm_family_without_checkpoint_filter_is_refused_naming_it(tool, monkeypatch):
    require("timm", "the Swin and PVTv2 backbones need timm")
    import timm.models.pvt_v2 as pvt_v2

    model = tool.build_model_for_conversion(make_cfg(ROOT / "configs" / "pvtv2_b5.yaml"))
    official = {k: torch.empty(s, device="meta") for k, s in original_pvt_v2_b5().items()}
    # as pvt_v2 before timm 1.0.7, whose filter was private: the names would pass unconverted
    monkeypatch.delattr(pvt_v2, "checkpoint_filter_fn")
    message = r"pvt_v2_b5: timm \S+ has no timm\.models\.pvt_v2\.checkpoint_filter_fn"
    with pytest.raises(ImportError, match=message):
        convert_state_dict(official, model)


def test_cli_writes_a_checkpoint_the_checkpointer_loads(tool, tmp_path, capsys):
    official = random_tensors(tiny_shapes())
    # what mmcv 1.3's save_checkpoint writes for mmdet 2.12's EpochBasedRunner
    meta = {
        "env_info": "sys.platform: linux\nPyTorch: 1.8.1",
        "config": "model = dict(type='PanSeg')",
        "seed": None,
        "exp_name": "panformer_r50_24e_coco_panoptic.py",
        "hook_msgs": {"last_ckpt": "work_dirs/epoch_24.pth"},
        "epoch": 24,
        "iter": 88000,
        "mmcv_version": "1.3.4",
        "time": "Sat Jun 12 10:00:00 2021",
        "CLASSES": ("person", "bicycle"),
    }
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    checkpoint = {"meta": meta, "state_dict": official, "optimizer": adamw.state_dict()}
    torch.save(checkpoint, tmp_path / "official.pth")
    output = tmp_path / "converted.pth"
    args = ["--config-file", str(BASE), "--input", str(tmp_path / "official.pth")]
    assert tool.main([*args, "--output", str(output), "--opts", *TINY]) == 0
    summary = json.loads(Path(f"{output}.json").read_text())
    assert summary["converted_tensors"] == len(tiny_model().state_dict())
    assert summary["parts"]["mask decoder"]["tensors"] > 0
    printed = capsys.readouterr().out
    assert "mask decoder" in printed
    # a ResNet-18 model: no released checkpoint to compare settings with
    assert summary["use_with"] == {
        "backbone": "resnet18", "config_file": None, "settings": {}, "differences": []
    }  # fmt: skip
    assert "the authors released no resnet18 checkpoint" in printed
    assert torch.load(output, weights_only=True)["__author__"].startswith("Panoptic-SegFormer")
    model = tiny_model(seed=3)
    PanopticSegFormerCheckpointer(model).load(str(output))
    ours = model.state_dict()
    assert torch.equal(
        ours["backbone.stem.conv1.norm.running_var"], official["backbone.bn1.running_var"]
    )
    assert torch.equal(ours["core.level_embed"], official["bbox_head.transformer.level_embeds"])

    del official["bbox_head.stuff_query.weight"]
    torch.save({"state_dict": official}, tmp_path / "official.pth")
    assert tool.main([*args, "--output", str(tmp_path / "refused.pth"), "--opts", *TINY]) == 1
    assert "core.mask_decoder.stuff_query.weight" in capsys.readouterr().err
    assert not (tmp_path / "refused.pth").exists()


@pytest.mark.parametrize(
    "config,backbone,threshold",
    [("r50", "R50", 0.25), ("r101", "R101", 0.25), ("swin_l", "Swin-L", 0.3),
     ("pvtv2_b5", "PVTv2-B5", 0.3)],
)  # fmt: skip
def test_the_report_names_the_config_that_evaluates_the_authors_checkpoint_as_released(
    config, backbone, threshold
):
    config_file = f"configs/{config}.yaml"
    # the config as train_net.py --eval-only reads it, with the converted weights only
    cfg = make_cfg(ROOT / config_file, "MODEL.WEIGHTS", "converted.pth")
    use = use_with(cfg, "converted.pth")
    assert (use["backbone"], use["config_file"]) == (backbone, config_file)
    assert use["differences"] == []  # no other override needed
    test = "MODEL.PANOPTIC_SEGFORMER.TEST."
    assert use["settings"] == {
        "INPUT.SIZE_DIVISIBILITY": 1,
        "INPUT.MIN_SIZE_TEST": 800,
        "INPUT.MAX_SIZE_TEST": 1333,
        test + "THING_SCORE_THRESHOLD": threshold,
        test + "STUFF_SCORE_THRESHOLD": threshold,
    }
    assert use["evaluate"] == (
        f"python train_net.py --config-file {config_file} --eval-only MODEL.WEIGHTS converted.pth"
    )
    # a setting that departs from the authors' is named with both values
    other = 0.5 if threshold != 0.5 else 0.4
    cfg = make_cfg(ROOT / config_file, test + "THING_SCORE_THRESHOLD", str(other))
    (line,) = use_with(cfg, "converted.pth")["differences"]
    assert line == (
        f"{test}THING_SCORE_THRESHOLD is {other} here, {threshold} in the authors' {backbone} "
        "config"
    )
    summary = {"parts": {}, "converted_tensors": 0, "ignored": [], "use_with": use}
    printed = format_summary(summary)
    assert f"use with {config_file} (the authors' {backbone} settings: score thresholds " in printed
    assert use["evaluate"] in printed


def test_a_checkpoint_that_would_run_code_is_refused_naming_it(tool, tmp_path, crafted_weights):
    path = crafted_weights.write("official.pth")
    output = tmp_path / "converted.pth"
    args = ["--config-file", str(BASE), "--input", str(path), "--output", str(output)]
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load '{re.escape(str(path))}'"):
        tool.main([*args, "--opts", *TINY])
    assert not crafted_weights.marker.exists() and not output.exists()


def test_the_tool_runs_as_a_command_from_anywhere(tmp_path):
    # python tools/convert_official_checkpoint.py, as a user runs it: the installed package, not
    # a path the script adds to sys.path
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_official_checkpoint.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "--config-file" in done.stdout and "--output OUTPUT" in done.stdout
