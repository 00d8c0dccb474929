"""Helpers of the tools that analyse the model (tools/analyze_model.py, tools/benchmark_model.py):
the paper's Table 1, its models built by backbone name, parameters per part, fvcore FLOP handles
for the ops fvcore does not count itself, and aligned markdown tables."""

import math
from typing import Dict, List

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from panoptic_segformer.modeling.backbone import build_backbone_by_name
from panoptic_segformer.modeling.inference import InferenceOptions
from panoptic_segformer.modeling.panoptic_segformer import (
    PanopticSegFormerCore,
    build_panoptic_segformer,
)

__all__ = [
    "FLOP_HANDLES",
    "PAPER_TABLE1",
    "PARTS",
    "build_core_model",
    "count_parameters",
    "parameter_parts",
    "print_markdown",
]

# Paper Table 1: millions of parameters and GFLOPs (the authors' mmcv counter, 800x1333 inputs)
PAPER_TABLE1 = {
    "resnet50": {"params": 51.0, "gflops": 214.0},
    "resnet101": {"params": 69.9, "gflops": 286.0},
    "swin_large": {"params": 221.4, "gflops": 816.0},
    "pvt_v2_b5": {"params": 104.9, "gflops": 349.0},
}
PARTS = ("backbone", "neck + encoder", "location decoder", "mask decoder")


def count_parameters(module: nn.Module, include_frozen_bn: bool = True) -> int:
    """Number of parameters, optionally counting frozen batch-norm affine buffers as parameters.

    torchvision's (and detectron2's) ``FrozenBatchNorm2d`` stores ``weight`` and ``bias`` as
    buffers, while mmdet's ResNet with ``requires_grad=False`` BN (the authors' setting) keeps
    them as ``nn.Parameter``s, so published parameter counts include them.

    Args:
        module: the model to count.
        include_frozen_bn: add the ``weight`` and ``bias`` of every ``FrozenBatchNorm2d``.

    Returns:
        the count.
    """
    count = sum(p.numel() for p in module.parameters())
    if include_frozen_bn:
        # torchvision's, or detectron2's of the same name and layout
        count += sum(
            m.weight.numel() + m.bias.numel()
            for m in module.modules()
            if isinstance(m, FrozenBatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d"
        )
    return count


def build_core_model(
    backbone: str, inference: InferenceOptions = InferenceOptions()
) -> PanopticSegFormerCore:
    """The untrained, inference-only (no criterion) model of a Table 1 backbone, in eval mode.

    Raises:
        ImportError: the backbone needs timm, and it is missing or too old.
    """
    net = build_backbone_by_name(backbone)
    model = build_panoptic_segformer(
        net, net.out_channels, with_criterion=False, inference=inference
    )
    return model.eval()


def parameter_parts(backbone: nn.Module, model: nn.Module) -> Dict[str, int]:
    """Parameters of each part and the total, frozen-BN affine weights included (as mmdet and
    the paper count them).

    Args:
        backbone: the backbone.
        model: the model core (:class:`~panoptic_segformer.modeling.PanopticSegFormerCore`),
            with or without the backbone inside.
    """
    parts = {
        "backbone": count_parameters(backbone),
        "neck + encoder": count_parameters(model.neck)
        + count_parameters(model.encoder)
        + model.level_embed.numel(),
        "location decoder": count_parameters(model.location_decoder),
        "mask decoder": count_parameters(model.mask_decoder),
    }
    parts["total"] = sum(parts.values())
    return parts


def print_markdown(header: List[str], lines: List[List[str]]) -> None:
    """A markdown table, columns padded to align; the first left-aligned, the others right."""
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    rules = [":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    print("|" + "|".join(rules) + "|")
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        print("| " + " | ".join(cells) + " |")


def _sizes(value) -> List[int]:
    return value.type().sizes()  # shape of a traced value


def _sampler_flops(inputs, outputs) -> int:
    # bilinear: 4 multiply-adds per output element, N * C * out_points * 4 (fvcore's default too)
    return 4 * math.prod(_sizes(outputs[0]))


def _sdpa_flops(inputs, outputs) -> int:
    # softmax(Q K^T) V: L * S * (E + Ev) multiply-adds per batch and head
    q, k, v = (_sizes(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _native_mha_flops(inputs, outputs) -> int:
    # nn.MultiheadAttention's inference fast path: in-projections, attention, out-projection
    (n, lq, e), (_, s, _) = _sizes(inputs[0]), _sizes(inputs[1])
    return n * ((lq + 2 * s) * e * e + 2 * lq * s * e + lq * e * e)


# ops of this model that fvcore (0.1.5) has no handle for, or counts another way; trace with
# the PyTorch deformable-attention path, whose grid_sample fvcore can see (a CUDA kernel is
# opaque to it)
FLOP_HANDLES = {
    "aten::grid_sampler": _sampler_flops,
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::_native_multi_head_attention": _native_mha_flops,
}
