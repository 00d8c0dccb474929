"""Per-image panoptic, instance and semantic results from the model's inference outputs.

Shape shorthand: N images, Hp x Wp padded input, H1 x W1 the stride-8 mask level, k kept thing
queries, Z stuff queries, K thing classes, H x W an output size.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from panoptic_segformer.modeling.postprocessing.common import MergeOptions
from panoptic_segformer.modeling.postprocessing.mask_statistics import resize_masks
from panoptic_segformer.modeling.postprocessing.results import instance_results, semantic_map

RESULT_TYPES = ("panoptic_seg", "instances", "sem_seg")


def results_from_outputs(
    outputs: Dict[str, Tensor],
    padded_size: Tuple[int, int],
    image_sizes: Sequence[Tuple[int, int]],
    output_sizes: Optional[Sequence[Tuple[int, int]]],
    *,
    num_thing_classes: int,
    num_stuff_classes: int,
    merge: MergeOptions,
    result_types: Sequence[str],
    max_detections: int,
) -> List[Dict[str, object]]:
    """Per-image results from the inference outputs of a batch.

    Masks are cropped to the valid image at stride 8 and resized to the output size in one
    bilinear step (as the authors do), then merged. Only the queries that can survive the
    merging are resized for it (``merge.candidates``, an exact pre-filter).

    Args:
        outputs: ``thing_masks`` (N, k, H1, W1), ``thing_scores`` (N, k), ``thing_labels``
            (N, k), ``stuff_masks`` (N, Z, H1, W1) and ``stuff_scores`` (N, Z), masks covering
            the padded input.
        padded_size: (Hp, Wp) of the input batch.
        image_sizes: per image, (h, w) of the valid image inside the padded input.
        output_sizes: per image, the (height, width) to predict at; None for ``image_sizes``.
        num_thing_classes, num_stuff_classes: K and Z.
        merge: the merging and its options.
        result_types: any of :data:`RESULT_TYPES`.
        max_detections: the most instance results per image.

    Returns:
        per image a dict with the ``result_types``: ``panoptic_seg`` (the (H, W) int32 map and
        segments_info; category ids are contiguous: things [0, K), stuff K + [0, Z)),
        ``instances`` (:class:`InstanceResults` of the thing queries) and ``sem_seg``
        ((K + Z, H, W) scores).
    """
    output_sizes = image_sizes if output_sizes is None else output_sizes
    num_images = outputs["thing_masks"].shape[0]
    if len(image_sizes) != num_images or len(output_sizes) != num_images:
        raise ValueError(
            f"outputs hold {num_images} images but got {len(image_sizes)} image sizes and "
            f"{len(output_sizes)} output sizes"
        )
    mask_h, mask_w = outputs["thing_masks"].shape[-2:]
    stuff_scores = outputs["stuff_scores"]
    stuff_labels = torch.arange(stuff_scores.shape[1], device=stuff_scores.device)
    results = []
    for i, ((h, w), out_size) in enumerate(zip(image_sizes, output_sizes)):
        # (k + Z, H1, W1) cropped to the valid part at stride 8
        masks = torch.cat([outputs["thing_masks"][i], outputs["stuff_masks"][i]])
        masks = masks[
            :,
            : math.ceil(h * mask_h / padded_size[0]),
            : math.ceil(w * mask_w / padded_size[1]),
        ]
        scores = torch.cat([outputs["thing_scores"][i], stuff_scores[i]])
        labels = torch.cat([outputs["thing_labels"][i], stuff_labels + num_thing_classes])
        # (with joint matching, thing queries also predict stuff classes)
        is_thing = labels < num_thing_classes

        # semantic and instance results read every query: resize them all once
        resized = None
        if {"instances", "sem_seg"} & set(result_types):
            resized = resize_masks(masks, out_size)
        result = {}
        if "panoptic_seg" in result_types:
            keep = merge.candidates(masks, scores, is_thing)
            chosen = (scores[keep], labels[keep], is_thing[keep])
            if resized is not None:
                result["panoptic_seg"] = merge.merge(resized[keep], *chosen)
            else:  # resize only the candidates
                result["panoptic_seg"] = merge.merge_resized(masks[keep], tuple(out_size), *chosen)
        if "instances" in result_types:
            # the thing queries' results of thing classes
            rows = is_thing.nonzero().squeeze(1)
            alpha, beta = merge.confidence_exponents()
            result["instances"] = instance_results(
                resized[rows],
                scores[rows],
                labels[rows],
                max_detections=max_detections,
                alpha=alpha,
                beta=beta,
            )
        if "sem_seg" in result_types:
            num_classes = num_thing_classes + num_stuff_classes
            result["sem_seg"] = semantic_map(resized, scores, labels, num_classes)
        results.append(result)
    return results
