"""The criterion's targets: one image's ground-truth segments split into things and stuff.

Targets are one dict per image with ``thing_labels`` (T,) int64 in [0, K), ``thing_boxes``
(T, 4) normalised cxcywh of the valid image (or (T, 2) mass centres for the box-free decoder),
``thing_masks`` (T, Hm, Wm) bool, ``stuff_labels`` (Z_i,) int64 in [0, Z) and ``stuff_masks``
(Z_i, Hm, Wm) bool, the masks at the padded input resolution.

Shape shorthand: T segments (or things) of one image, K thing classes, Z stuff classes, Z_i stuff
segments of the image, Hm x Wm the padded input size.
"""

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

from panoptic_segformer.modeling.box_ops import box_xyxy_to_cxcywh, masks_to_boxes, masks_to_centers

__all__ = ["Targets", "split_targets"]

# one dict per image, as split_targets returns
Targets = Sequence[Dict[str, Tensor]]


def split_targets(
    labels: Tensor,
    masks: Tensor,
    image_size: Tuple[int, int],
    num_thing_classes: int,
    num_stuff_classes: int,
    box_free: bool = False,
) -> Dict[str, Tensor]:
    """One image's segments as the criterion's thing / stuff targets.

    Args:
        labels (Tensor): (T,) int64 contiguous ids: things in [0, K), stuff in [K, K + Z).
        masks (Tensor): (T, Hm, Wm) bool masks at the padded input resolution.
        image_size: (h, w) of the valid (unpadded) image inside the masks.
        num_thing_classes: K.
        num_stuff_classes: Z.
        box_free: give things mass centres (T, 2) instead of boxes (T, 4).

    Returns:
        dict with thing_labels, thing_boxes, thing_masks, stuff_labels (in [0, Z)), stuff_masks.
        Boxes come from the masks, normalised by the valid image size.
    """
    if labels.dim() != 1 or masks.dim() != 3 or len(labels) != len(masks):
        raise ValueError(
            f"labels must be (T,) and masks (T, H, W), got {tuple(labels.shape)} and "
            f"{tuple(masks.shape)}"
        )
    total = num_thing_classes + num_stuff_classes
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= total):
        raise ValueError(
            f"labels must be in [0, {total}), got values in [{int(labels.min())}, "
            f"{int(labels.max())}]"
        )
    h, w = image_size
    if not (0 < h <= masks.shape[1] and 0 < w <= masks.shape[2]):
        raise ValueError(f"image_size {tuple(image_size)} does not fit masks {tuple(masks.shape)}")
    is_thing = labels < num_thing_classes
    thing_masks = masks[is_thing].bool()
    valid = thing_masks[:, :h, :w]
    if box_free:
        boxes = masks_to_centers(valid)
    else:
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
        boxes = box_xyxy_to_cxcywh(masks_to_boxes(valid) / scale)
    return {
        "thing_labels": labels[is_thing].long(),
        "thing_boxes": boxes,
        "thing_masks": thing_masks,
        "stuff_labels": labels[~is_thing].long() - num_thing_classes,
        "stuff_masks": masks[~is_thing].bool(),
    }
