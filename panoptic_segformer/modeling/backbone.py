"""Backbones: a frozen-BN torchvision ResNet and timm's Swin / PVTv2 feature extractors.

Every backbone maps images (N, 3, H, W) to a list of feature maps (N, C_i, H / s_i, W / s_i),
finest first, and exposes ``out_channels`` (the C_i) and ``strides`` (the s_i) for the neck.
Stage indices count the four residual / transformer stages from 0, as mmdet's ``out_indices``;
the paper uses stages 1-3 (C3-C5, strides 8, 16 and 32).

Shape shorthand: N batch, C_i channels and s_i stride of output level i.
"""

import importlib
import os
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from panoptic_segformer.utils.safe_load import load_torch

# depth -> (torchvision constructor, channels of layer1..layer4)
_RESNETS: Dict[int, Tuple[Callable[..., nn.Module], List[int]]] = {
    18: (torchvision.models.resnet18, [64, 128, 256, 512]),
    34: (torchvision.models.resnet34, [64, 128, 256, 512]),
    50: (torchvision.models.resnet50, [256, 512, 1024, 2048]),
    101: (torchvision.models.resnet101, [256, 512, 1024, 2048]),
}
_RESNET_STRIDES = [4, 8, 16, 32]


def _check_out_indices(out_indices: Sequence[int], num_stages: int) -> List[int]:
    out_indices = list(out_indices)
    if (
        not out_indices
        or out_indices != sorted(set(out_indices))
        or not all(0 <= i < num_stages for i in out_indices)
    ):
        raise ValueError(
            f"out_indices must be increasing stage indices in [0, {num_stages - 1}], "
            f"got {out_indices}"
        )
    return out_indices


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """Reads a local checkpoint, unwrapping ``{"state_dict": ...}`` / ``{"model": ...}`` and a
    ``module.`` / ``model.`` prefix shared by every key. Never downloads anything."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    checkpoint = load_torch(path)  # data, never code to run
    # mmcv checkpoints nest the weights under "state_dict", the original Swin ones under "model".
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(v, Tensor) for v in checkpoint.values()
    ):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict of tensors")
    for prefix in ("module.", "model."):
        if checkpoint and all(k.startswith(prefix) for k in checkpoint):
            checkpoint = {k[len(prefix) :]: v for k, v in checkpoint.items()}
    return checkpoint


def _check_state_dict(
    expected: Dict[str, Tensor], state_dict: Dict[str, Tensor], path: str
) -> None:
    """Raises a ValueError naming every missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mis_shaped:
        problems.append(f"shape mismatches {mis_shaped}")
    if problems:
        raise ValueError(f"checkpoint {path!r} does not fit the model: " + "; ".join(problems))


class ResNetBackbone(nn.Module):
    """torchvision ResNet with frozen batch norm, returning the outputs of selected stages.

    As the authors' mmdet config (``norm_cfg=dict(type='BN', requires_grad=False),
    norm_eval=True, frozen_stages=1, style='pytorch'``): every BN is a ``FrozenBatchNorm2d``, so
    train and eval mode give the same output, and the stem plus the first ``frozen_stages``
    stages get ``requires_grad=False``. The module names match torchvision's, so torchvision
    checkpoints load directly (see :meth:`load_pretrained`).

    Args:
        depth: 18, 34, 50 or 101.
        frozen_stages: -1 freezes nothing, 0 the stem (conv1 + bn1), k >= 1 also layer1..layerk.
        out_indices: stages to return, 0..3 for layer1..layer4 (strides 4, 8, 16, 32).
    """

    def __init__(
        self, depth: int = 50, frozen_stages: int = 1, out_indices: Sequence[int] = (1, 2, 3)
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        self.out_indices = _check_out_indices(out_indices, num_stages=4)
        builder, stage_channels = _RESNETS[depth]
        resnet = builder(weights=None, norm_layer=FrozenBatchNorm2d)
        # Reuse torchvision's modules under their own names; avgpool and fc are dropped.
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.out_channels = [stage_channels[i] for i in self.out_indices]
        self.strides = [_RESNET_STRIDES[i] for i in self.out_indices]

        frozen = [self.conv1, self.bn1] if frozen_stages >= 0 else []
        frozen += [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        """
        Args:
            x: images (N, 3, H, W).

        Returns:
            len(out_indices) tensors (N, C_i, ceil(H / s_i), ceil(W / s_i)), finest first.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def load_pretrained(self, path: str) -> None:
        """Loads a local torchvision-format ResNet state dict (e.g. ``resnet50-0676ba61.pth``).

        ``fc.*`` and ``*.num_batches_tracked`` (which ``FrozenBatchNorm2d`` lacks) are ignored;
        any other missing, unexpected or mis-shaped key raises a ValueError naming it.

        Args:
            path: the checkpoint file.
        """
        state_dict = {
            k: v
            for k, v in read_state_dict(path).items()
            if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")
        }
        _check_state_dict(self.state_dict(), state_dict, path)
        self.load_state_dict(state_dict)


# The oldest timm with everything the timm backbones use: Swin's strict_img_size and
# always_partition (timm 1.0.8, commit 4c531be4; older releases build a Swin without them, as
# Swin ignores unknown arguments) and a public checkpoint_filter_fn in pvt_v2 (1.0.7, commit
# 88a1006e). setup.py's extras read it from here.
TIMM_MIN_VERSION = "1.0.8"
# ``device=`` / ``dtype=`` reach Swin's and PVTv2's constructors from timm 1.0.21 (commits
# ea9aaabe, e3ed1404); before, PVTv2 rejects them and Swin ignores them. The tests build on the
# meta device, so setup.py's test extra requires it.
TIMM_FACTORY_KWARGS_MIN_VERSION = "1.0.21"


def import_timm() -> Any:
    """The ``timm`` module; an ImportError saying how to install it when it is missing."""
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(
            "the Swin and PVTv2 backbones need timm, which is not installed: pip install timm"
        ) from e


def _version_tuple(version: str) -> Tuple[int, ...]:
    """(major, minor, patch) of a release string such as "1.0.8" or "1.0.9.dev0"."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(int(part) for part in match.groups())


def _check_timm_version(timm: Any, model_name: str, timm_kwargs: Dict[str, Any]) -> None:
    """Raises an ImportError naming ``model_name`` and both versions when the installed timm is
    older than what building it with ``timm_kwargs`` needs (older releases fail later with a
    cryptic TypeError, or build a different model without a word)."""
    needs = [
        (TIMM_MIN_VERSION, "(Swin's strict_img_size / always_partition, PVTv2's checkpoint filter)")
    ]
    factory = [f"{k}=" for k in ("device", "dtype") if k in timm_kwargs]
    if factory:
        needs.append((TIMM_FACTORY_KWARGS_MIN_VERSION, f"for {' and '.join(factory)}"))
    for version, reason in needs:
        if _version_tuple(timm.__version__) < _version_tuple(version):
            raise ImportError(
                f"{model_name} needs timm >= {version} {reason}, but timm {timm.__version__} is "
                f"installed: pip install 'timm>={version}'"
            )


def checkpoint_filter_fn_of(timm: Any, model_name: str) -> Callable[..., Dict[str, Tensor]]:
    """The ``checkpoint_filter_fn`` of ``model_name``'s family, which maps the original Swin /
    PVTv2 releases to timm's names. Raises an ImportError naming the model when the family's
    module has none (PVTv2 before timm 1.0.7): the weights would load unconverted."""
    module = importlib.import_module(timm.models.model_entrypoint(model_name).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise ImportError(
            f"{model_name}: timm {timm.__version__} has no {module.__name__}.checkpoint_filter_fn "
            f"to convert its pretrained checkpoint (timm >= {TIMM_MIN_VERSION} has one for Swin "
            "and PVTv2)"
        )
    return filter_fn


def _timm_state_dict(
    timm: Any, model_name: str, path: str, timm_kwargs: Dict[str, Any]
) -> Dict[str, Tensor]:
    """Reads a checkpoint for timm's ``model_name`` and checks it, classifier aside, against the
    full model once converted by the family's ``checkpoint_filter_fn``, since timm's own loader is
    not strict for feature extractors.

    Returns the checkpoint unconverted: timm's loader converts it with the same function, and a
    second conversion is not a no-op (before timm 1.0.31, Swin's filter takes a timm checkpoint
    without a classifier for an original one and moves its downsampling layers again).
    """
    filter_fn = checkpoint_filter_fn_of(timm, model_name)
    full = timm.create_model(model_name, pretrained=False, **timm_kwargs)
    checkpoint = read_state_dict(path)
    state_dict = filter_fn(checkpoint, full)
    classifiers = full.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    expected = full.state_dict()
    # The classifier is never used and may have another number of classes (e.g. ImageNet-22k).
    state_dict, expected = (
        {k: v for k, v in d.items() if not any(k.startswith(c + ".") for c in classifiers)}
        for d in (state_dict, expected)
    )
    _check_state_dict(expected, state_dict, path)
    return checkpoint


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model returning channels-first maps of the selected stages.

    Args:
        model_name: timm model name, e.g. ``"swin_large_patch4_window7_224"`` or ``"pvt_v2_b5"``.
        out_indices: stages to return (0 is the first, for Swin and PVTv2 stride 4).
        pretrained_path: local checkpoint (timm or the original release's format) loaded
            strictly except for the classifier; nothing is ever downloaded.
        output_norm: add a LayerNorm to every output, as Swin-Transformer-Object-Detection
            (the authors' Swin backbone) does.
        pad_to: pad the images with zeros on the right and bottom to a multiple of this first
            (Swin: its patch size 4, as the authors' ``PatchEmbed`` does), so any size runs.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``img_size``,
            ``device="meta"`` to inspect a model without allocating it, from timm 1.0.21).

    Raises:
        ImportError: naming the model, when timm is missing or older than it needs.
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (1, 2, 3),
        pretrained_path: Optional[str] = None,
        output_norm: bool = False,
        pad_to: int = 1,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if pad_to < 1:
            raise ValueError(f"pad_to must be at least 1, got {pad_to}")
        self.pad_to = pad_to
        timm = import_timm()
        _check_timm_version(timm, model_name, timm_kwargs)
        out_indices = tuple(out_indices)
        pretrained: Dict[str, Any] = {"pretrained": False}
        if pretrained_path is not None:
            state_dict = _timm_state_dict(timm, model_name, pretrained_path, timm_kwargs)
            # Hand the checked weights to timm (which converts them); blank url / hub id so
            # nothing can be fetched.
            overlay = dict(state_dict=state_dict, file="", url="", hf_hub_id="")
            pretrained = {"pretrained": True, "pretrained_cfg_overlay": overlay}
        self.model = timm.create_model(
            model_name, features_only=True, out_indices=out_indices, **pretrained, **timm_kwargs
        )
        self.out_channels: List[int] = list(self.model.feature_info.channels())
        self.strides: List[int] = list(self.model.feature_info.reduction())
        # Swin's feature extractor returns channels-last maps (timm 1.x), PVTv2's channels-first.
        self.channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        factory = {k: timm_kwargs[k] for k in ("device", "dtype") if k in timm_kwargs}
        self.norms = nn.ModuleList(
            nn.LayerNorm(c, **factory) for c in self.out_channels if output_norm
        )

    def forward(self, x: Tensor) -> List[Tensor]:
        """
        Args:
            x: images (N, 3, H, W).

        Returns:
            len(out_indices) tensors (N, C_i, H / s_i, W / s_i), finest first.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(x.shape)}")
        if self.pad_to > 1:
            x = F.pad(x, (0, -x.shape[-1] % self.pad_to, 0, -x.shape[-2] % self.pad_to))
        outs = []
        for i, f in enumerate(self.model(x)):
            if not self.channels_last:
                f = f.permute(0, 2, 3, 1)  # (N, H_i, W_i, C_i): LayerNorm acts on the last dim
            if self.norms:
                f = self.norms[i](f)
            outs.append(f.permute(0, 3, 1, 2).contiguous())  # (N, C_i, H_i, W_i)
        return outs


# Detection-style Swin as the authors' Swin-Transformer-Object-Detection backbone: inputs of any
# size, not just img_size (masks built per forward), windows always partitioned and shifted (even
# where a stage is no larger than one window), and a LayerNorm on every output. Outputs equal the
# authors' exactly when H and W are multiples of 32 * window (224 for window 7); otherwise timm pads
# a stage *after* the cyclic shift and its mask no longer separates the wrapped-around border (timm
# issue #2438), where the authors pad before shifting. timm also requires H and W divisible by the
# patch size 4: the image is padded to it first, as the authors' PatchEmbed does.
_SWIN_DETECTION = dict(strict_img_size=False, always_partition=True, output_norm=True, pad_to=4)

_BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "resnet50": partial(ResNetBackbone, depth=50),
    "resnet101": partial(ResNetBackbone, depth=101),
    # The authors' Swin-L: ImageNet-22k, window 7, drop path 0.3 (panformer_swinl_24e config).
    "swin_large": partial(
        TimmBackbone, "swin_large_patch4_window7_224", drop_path_rate=0.3, **_SWIN_DETECTION
    ),
    # The window-12, 384-px Swin-L that Mask2Former uses; same settings otherwise.
    "swin_large_w12": partial(
        TimmBackbone, "swin_large_patch4_window12_384", drop_path_rate=0.3, **_SWIN_DETECTION
    ),
    # The authors' PVTv2-B5 uses drop path 0.1 (easymd/models/backbones/pvt_v2.py).
    "pvt_v2_b5": partial(TimmBackbone, "pvt_v2_b5", drop_path_rate=0.1),
}


# the names of the timm backbones (the transformer ones, detectron2's "D2TimmBackbone")
TIMM_BACKBONES = tuple(name for name, make in _BACKBONES.items() if make.func is TimmBackbone)


def build_backbone_by_name(name: str, **kwargs: Any) -> nn.Module:
    """Builds a backbone by name.

    Args:
        name: one of "resnet50", "resnet101", "swin_large", "swin_large_w12", "pvt_v2_b5".
        **kwargs: override the builder's arguments (e.g. ``frozen_stages``, ``out_indices``,
            ``pretrained_path``, ``drop_path_rate``).

    Returns:
        a module mapping (N, 3, H, W) images to a list of (N, C_i, H / s_i, W / s_i) maps, with
        ``out_channels`` and ``strides`` attributes.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {sorted(_BACKBONES)}")
    return _BACKBONES[name](**kwargs)
