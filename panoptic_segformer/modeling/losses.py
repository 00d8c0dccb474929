"""Loss functions of Panoptic SegFormer as pure functions on tensors.

Eq. (4) and (5) of the paper: focal loss for classification, Dice loss for masks, and
Deformable DETR's L1 + GIoU detection loss; the published weights (focal 2, L1 5, GIoU 2,
Dice 2) are applied by the caller. Each function returns per-item losses when
``num_normalizer`` is None, and otherwise their sum divided by ``num_normalizer`` (the number
of ground-truth objects, Deformable DETR's ``num_boxes``), so weights per item (e.g. weight 0
for an absent stuff class) are applied by multiplying the per-item output.

Every loss here, and every matching cost of :mod:`panoptic_segformer.modeling.matcher`, is
computed in float32 under mixed precision (:func:`computed_in_float32`): half-precision inputs
are cast up and autocast is off inside, so that sums over thousands of mask pixels, logarithms
of small probabilities and the costs deciding the matching keep float32 accuracy.

Shape shorthand: M matched pairs, Q queries, K classes, P pixels per mask (H * W, flattened).
"""

import contextlib
import functools
from typing import Callable, Dict, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from panoptic_segformer.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

_HALF_PRECISION = (torch.float16, torch.bfloat16)
F_ = TypeVar("F_", bound=Callable[..., Tensor])


def computed_in_float32(fn: F_) -> F_:
    """Decorator: ``fn`` computes in float32 even under ``torch.autocast``.

    Its float16 / bfloat16 tensor arguments are cast to float32 (float32 and float64 ones are
    left alone) and autocast is off inside for the devices of its tensor arguments, so that
    autocast does not run its matrix products or reductions in half precision. Gradients
    flow back through the casts to the half-precision inputs.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        with contextlib.ExitStack() as stack:
            for device_type in sorted({t.device.type for t in tensors}):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            args = [_to_float32(a) for a in args]
            kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _to_float32(value):
    if isinstance(value, Tensor) and value.dtype in _HALF_PRECISION:
        return value.float()
    return value


# How mask-head outputs become mask probabilities. The authors' mask head ends in a ReLU and
# its output is used as-is (thresholded at 0.5 at inference), hence "none"; "sigmoid" is for
# heads that predict logits, as in DETR and Mask2Former.
MASK_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda x: x,
    "sigmoid": torch.sigmoid,
}


def check_mask_activation(activation: str) -> None:
    """Raises a ValueError naming ``activation`` unless it is a key of :data:`MASK_ACTIVATIONS`."""
    if activation not in MASK_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(MASK_ACTIVATIONS)}, got {activation!r}"
        )


def activate_masks(masks: Tensor, activation: str) -> Tensor:
    """Applies a named entry of :data:`MASK_ACTIVATIONS`.

    Args:
        masks (Tensor): any shape.
        activation: "none" (values already activated, e.g. ReLU outputs) or "sigmoid" (logits).

    Returns:
        Tensor: same shape.
    """
    check_mask_activation(activation)
    return MASK_ACTIVATIONS[activation](masks)


def _normalise(loss: Tensor, num_normalizer: Optional[float]) -> Tensor:
    """Per-item losses when ``num_normalizer`` is None, else their sum / ``num_normalizer``."""
    if num_normalizer is None:
        return loss
    return loss.sum() / num_normalizer


@computed_in_float32
def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    num_normalizer: Optional[float] = None,
) -> Tensor:
    """Sigmoid focal loss (Lin et al., ICCV 2017), one binary problem per class.

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t) with p_t = p for positives and 1 - p for
    negatives, alpha_t = alpha for positives and 1 - alpha for negatives. Follows Deformable
    DETR / torchvision, except that the reduction is the plain sum / ``num_normalizer`` of mmdet
    (what the authors trained with) rather than Deformable DETR's mean over queries.

    Args:
        inputs (Tensor): (..., K) logits.
        targets (Tensor): (..., K) binary (one-hot) targets; soft targets in [0, 1] work too.
        alpha: weight of positives in (0, 1); a negative value disables the alpha weighting.
        gamma: focusing exponent.
        num_normalizer: divisor of the summed loss, usually the number of ground-truth objects.

    Returns:
        Tensor: (..., K) per-element losses, or a scalar when ``num_normalizer`` is given.
    """
    targets = targets.to(inputs.dtype)
    prob = inputs.sigmoid()
    # BCE from logits is stable where log(sigmoid(x)) would underflow
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _normalise(loss, num_normalizer)


@computed_in_float32
def dice_loss(
    inputs: Tensor,
    targets: Tensor,
    activation: str = "none",
    eps: float = 1e-6,
    num_normalizer: Optional[float] = None,
) -> Tensor:
    """Dice loss in the squared-denominator form of V-Net, as the authors' ``DiceLoss``.

    loss = 1 - 2 * sum(p * t) / ((sum(p^2) + eps) + (sum(t^2) + eps)), per mask, with
    p = activation(inputs). The authors feed the mask head's ReLU outputs directly
    (``activation="none"``); the same formula is used with ``"sigmoid"`` for logit heads.

    Args:
        inputs (Tensor): (M, H, W) or (M, P) predicted masks, in the convention ``activation``
            names: already-activated values for "none", logits for "sigmoid".
        targets (Tensor): same shape, binary ground-truth masks.
        activation: key of :data:`MASK_ACTIVATIONS`.
        eps: added to each sum of squares (the authors' default, 1e-6); keeps the loss finite
            when prediction and target are both empty (loss 1).
        num_normalizer: divisor of the summed loss, usually the number of ground-truth masks.

    Returns:
        Tensor: (M,) per-mask losses, or a scalar when ``num_normalizer`` is given.
    """
    probs = activate_masks(inputs, activation).flatten(1)  # (M, P)
    targets = targets.flatten(1).to(probs.dtype)  # (M, P)
    numerator = 2 * (probs * targets).sum(dim=1)
    denominator = (probs * probs).sum(dim=1) + eps + (targets * targets).sum(dim=1) + eps
    return _normalise(1 - numerator / denominator, num_normalizer)


@computed_in_float32
def l1_box_loss(
    pred_boxes: Tensor, target_boxes: Tensor, num_normalizer: Optional[float] = None
) -> Tensor:
    """L1 distance of matched boxes, summed over the four coordinates (Deformable DETR).

    Args:
        pred_boxes (Tensor): (M, 4) normalised cxcywh.
        target_boxes (Tensor): (M, 4) normalised cxcywh.
        num_normalizer: divisor of the summed loss, usually the number of ground-truth boxes.

    Returns:
        Tensor: (M,) per-box losses, or a scalar when ``num_normalizer`` is given.
    """
    return _normalise((pred_boxes - target_boxes).abs().sum(dim=-1), num_normalizer)


@computed_in_float32
def giou_loss(
    pred_boxes: Tensor, target_boxes: Tensor, num_normalizer: Optional[float] = None
) -> Tensor:
    """1 - GIoU of matched boxes (Deformable DETR).

    Args:
        pred_boxes (Tensor): (M, 4) normalised cxcywh.
        target_boxes (Tensor): (M, 4) normalised cxcywh.
        num_normalizer: divisor of the summed loss, usually the number of ground-truth boxes.

    Returns:
        Tensor: (M,) per-box losses in [0, 2], or a scalar when ``num_normalizer`` is given.
    """
    giou = generalized_box_iou(
        box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes), aligned=True
    )
    return _normalise(1 - giou, num_normalizer)
