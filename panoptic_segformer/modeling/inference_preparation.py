"""Inference-only speed-ups of a convolutional backbone: frozen batch norms folded into the
convolutions before them, and weights stored channels-last.

A frozen batch norm is the fixed affine map ``x * scale + shift`` per channel (``scale = weight /
sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``); after a convolution it is the
same as the convolution with its output channels' weights multiplied by ``scale`` and bias
``bias * scale + shift``: one pass less over every feature map. Channels-last weights make oneDNN
(and cuDNN) run the convolutions in NHWC without re-ordering their inputs on every call (not for
backbones with GroupNorm: its channels-last kernel is not invariant to the number of threads).

Both change the rounding, not the function (tested within float tolerance), and folding changes
the parameters: load the weights first, and neither train nor save the folded module.
"""

from typing import Iterator, Tuple

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from panoptic_segformer.modeling.backbone import ResNetBackbone

# Modules whose forward applies ``bnK`` directly to the output of ``convK`` (torchvision's
# ResNet blocks and our ResNet stem); elsewhere only detectron2's ``Conv2d.norm`` and
# ``nn.Sequential(conv, bn)`` are folded, where the order is certain.
_CONV_THEN_BN_BY_NAME = (ResNetBackbone, Bottleneck, BasicBlock)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision's or detectron2's ``FrozenBatchNorm2d`` (the same formula; detectron2 is not
    imported here)."""
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(module, name) for name in ("weight", "bias", "running_mean", "running_var", "eps")
    )


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Makes ``conv`` compute ``bn(conv(x))``, in place."""
    if bn.weight.shape != (conv.out_channels,):
        raise ValueError(
            f"a batch norm of {bn.weight.numel()} channels cannot follow a convolution of "
            f"{conv.out_channels} output channels"
        )
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight.mul_(scale.to(conv.weight).view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.to(conv.weight), requires_grad=conv.weight.requires_grad)


def _pairs(module: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Conv2d, nn.Module]]:
    """(parent, name of the norm in it, conv, norm) of every conv -> frozen BN to fold."""
    for parent in module.modules():
        if isinstance(parent, nn.Conv2d) and is_frozen_batchnorm(getattr(parent, "norm", None)):
            yield parent, "norm", parent, parent.norm  # detectron2's Conv2d(norm=...)
        elif isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (_, conv), (name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and is_frozen_batchnorm(bn):
                    yield parent, name, conv, bn
        elif isinstance(parent, _CONV_THEN_BN_BY_NAME):
            for name, bn in parent.named_children():
                conv = getattr(parent, name.replace("bn", "conv"), None)
                if (
                    name.startswith("bn")
                    and isinstance(conv, nn.Conv2d)
                    and is_frozen_batchnorm(bn)
                ):
                    yield parent, name, conv, bn


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Folds every frozen batch norm of ``module`` that directly follows a convolution into it
    (in place; the norm becomes ``None`` in a detectron2 ``Conv2d``, else ``nn.Identity``).

    Returns:
        how many were folded.
    """
    pairs = list(_pairs(module))  # collected first: folding changes the module tree
    for parent, name, conv, bn in pairs:
        fold_into_conv(conv, bn)
        setattr(parent, name, None if parent is conv else nn.Identity())
    return len(pairs)


def store_channels_last(backbone: nn.Module) -> nn.Module:
    """The backbone's weights channels-last, in place, unless it has a GroupNorm (whose
    channels-last kernel reduces in an order that depends on the number of threads, so results
    would differ between processes). Returns the backbone."""
    if not any(isinstance(m, nn.GroupNorm) for m in backbone.modules()):
        backbone.to(memory_format=torch.channels_last)
    return backbone


def prepare_backbone_for_inference(backbone: nn.Module) -> int:
    """Eval mode, frozen batch norms folded, weights channels-last (:func:`store_channels_last`);
    for inference only, after the weights are loaded.

    Returns:
        how many batch norms were folded.
    """
    folded = fold_frozen_batchnorm(backbone.eval())
    store_channels_last(backbone)
    return folded


class PreparableForInference:
    """Mixin of the models that hold a ``backbone`` (None for none): :meth:`prepare_for_inference`,
    after which computing training losses raises (:meth:`refuse_training`) instead of updating
    folded weights. Switching to train mode alone is allowed: detectron2's evaluation restores
    the mode a model (or a wrapper of it) had."""

    prepared_for_inference = False

    def prepare_for_inference(self) -> nn.Module:
        """Inference-only speed-ups, in place, once the weights are loaded: eval mode, the
        backbone's frozen batch norms folded into its convolutions and its weights channels-last
        (see :mod:`panoptic_segformer.modeling.inference_preparation`). The outputs equal the
        unprepared model's within float rounding. The model can then no longer compute training
        losses, and its state dict lacks the folded norms.

        Returns:
            the model.
        """
        if self.backbone is not None and not self.prepared_for_inference:
            prepare_backbone_for_inference(self.backbone)
        for module in self.modules():
            if isinstance(module, PreparableForInference):
                module.prepared_for_inference = True
        return self.eval()

    def refuse_training(self) -> None:
        """Raises a RuntimeError if the model was prepared for inference; called where training
        losses are computed."""
        if self.prepared_for_inference:
            raise RuntimeError(
                f"this {type(self).__name__} was prepared for inference (its batch norms are "
                "folded into its convolutions) and cannot be trained: build a new model"
            )
