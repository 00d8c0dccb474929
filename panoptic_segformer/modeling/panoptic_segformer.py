"""Panoptic SegFormer end to end (Figure 2 of the paper), in plain PyTorch.

backbone -> ChannelMapper neck -> deformable encoder -> location decoder -> query-decoupled
mask decoder -> losses (training) or per-query masks and scores (inference), which
:meth:`PanopticSegFormer.postprocess` turns into panoptic, instance and semantic results.

Images come in normalised and padded into one batch, with a padding mask (True at padding).
The detectron2 meta-architecture wraps this module; nothing here imports detectron2.

Shape shorthand: N images, Hp x Wp padded input, L feature levels, S tokens, C channels,
Q thing queries, K thing classes, Z stuff classes, k kept thing queries at inference,
H1 x W1 the stride-8 level.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion
from panoptic_segformer.modeling.decoupled_mask_decoder import DecoupledMaskDecoder, gather_queries
from panoptic_segformer.modeling.encoder import (
    DeformableEncoder,
    DeformableEncoderLayer,
    flatten_levels,
)
from panoptic_segformer.modeling.location_decoder import LocationDecoder, LocationDecoderLayer
from panoptic_segformer.modeling.mask_decoder import MASK_LEVELS
from panoptic_segformer.modeling.neck import ChannelMapper
from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine
from panoptic_segformer.modeling.postprocessing import (
    instance_results,
    mask_wise_candidates,
    mask_wise_merging,
    mask_wise_merging_resized,
    merge_options,
    pixel_wise_argmax,
    semantic_map,
)

MERGERS = {"mask_wise": mask_wise_merging, "pixel_argmax": pixel_wise_argmax}
RESULT_TYPES = ("panoptic_seg", "instances", "sem_seg")


class PanopticSegFormer(nn.Module):
    """Panoptic SegFormer from already built parts.

    Args:
        backbone: images (N, 3, Hp, Wp) -> list of feature maps, finest first (C3, C4, C5);
            None when the caller runs its own backbone and calls :meth:`forward_features`
            (the detectron2 meta-architecture does).
        neck: the maps -> L maps of C channels.
        position_encoding: padding mask (N, H, W) -> (N, C, H, W) positions.
        encoder: the deformable encoder.
        location_decoder: thing queries, boxes and classes.
        mask_decoder: the query-decoupled mask decoder.
        criterion: training losses; None for an inference-only model.
        num_thing_classes: K.
        num_stuff_classes: Z.
        max_detections: thing queries kept at inference, the top-k of the Q x K class scores
            of the location decoder (the authors' 100).
        mask_decoder_layers: early exit after this many mask-decoder layers at inference
            (paper Table 10); None runs every layer and the tail.
        merge: "mask_wise" (Algorithm 1) or "pixel_argmax" (paper Table 7).
        merge_kwargs: keyword arguments of the merging function (thresholds, alpha, beta).
        result_types: what :meth:`postprocess` returns, any of "panoptic_seg", "instances"
            and "sem_seg". Panoptic only by default: the other two need every query's mask
            at full resolution, several times the cost of the merging.
    """

    def __init__(
        self,
        backbone: Optional[nn.Module],
        neck: ChannelMapper,
        position_encoding: PositionEmbeddingSine,
        encoder: DeformableEncoder,
        location_decoder: LocationDecoder,
        mask_decoder: DecoupledMaskDecoder,
        criterion: Optional[PanopticSegFormerCriterion],
        num_thing_classes: int,
        num_stuff_classes: int,
        max_detections: int = 100,
        mask_decoder_layers: Optional[int] = None,
        merge: str = "mask_wise",
        merge_kwargs: Optional[Dict[str, float]] = None,
        result_types: Sequence[str] = ("panoptic_seg",),
    ) -> None:
        super().__init__()
        if merge not in MERGERS:
            raise ValueError(f"merge must be one of {sorted(MERGERS)}, got {merge!r}")
        unknown = sorted(set(result_types) - set(RESULT_TYPES))
        if unknown or not result_types:
            raise ValueError(
                f"result_types must be a non-empty subset of {RESULT_TYPES}, got {result_types}"
            )
        if max_detections < 1:
            raise ValueError(f"max_detections must be positive, got {max_detections}")
        self.backbone = backbone
        self.neck = neck
        self.position_encoding = position_encoding
        self.encoder = encoder
        self.location_decoder = location_decoder
        self.mask_decoder = mask_decoder
        self.criterion = criterion
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.max_detections = max_detections
        self.mask_decoder_layers = mask_decoder_layers
        self.merge = merge
        self.merge_kwargs = merge_options(
            MERGERS[merge], dict(merge_kwargs or {}), f"merge={merge!r}"
        )
        self.result_types = tuple(result_types)
        d_model = location_decoder.d_model
        num_levels = len(neck.lateral_convs) + len(neck.extra_convs)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        images: Tensor,
        padding_mask: Optional[Tensor] = None,
        targets: Optional[Sequence[Dict[str, Tensor]]] = None,
    ) -> Dict[str, object]:
        """
        Args:
            images (Tensor): (N, 3, Hp, Wp) normalised, padded images.
            padding_mask (Tensor, optional): (N, Hp, Wp) bool, True at padding; None for none.
            targets: per-image target dicts of the criterion (see
                :mod:`panoptic_segformer.modeling.criterion`); given, the losses are returned.

        Returns:
            dict of weighted losses with targets, else the inference outputs of
            :meth:`forward_features`.
        """
        if self.backbone is None:
            raise RuntimeError("this model has no backbone: call forward_features with features")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        if padding_mask is None:
            padding_mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        elif padding_mask.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"padding_mask must be {(images.shape[0], *images.shape[-2:])}, got "
                f"{tuple(padding_mask.shape)}"
            )
        return self.forward_features(self.backbone(images), padding_mask, targets)

    def forward_features(
        self,
        features: Sequence[Tensor],
        padding_mask: Tensor,
        targets: Optional[Sequence[Dict[str, Tensor]]] = None,
    ) -> Dict[str, object]:
        """Everything after the backbone.

        Args:
            features: backbone maps (N, C_i, H_i, W_i), finest first.
            padding_mask (Tensor): (N, Hp, Wp) bool, True at padding of the input images.
            targets: as in :meth:`forward`.

        Returns:
            With targets, the criterion's losses. Without, a dict with
            ``thing_masks`` (N, k, H1, W1), ``thing_scores`` (N, k), ``thing_labels`` (N, k) in
            [0, K), ``thing_boxes`` (N, k, B) normalised, ``stuff_masks`` (N, Z, H1, W1) and
            ``stuff_scores`` (N, Z); masks cover the padded input.
        """
        feats = self.neck(features)
        masks = [
            F.interpolate(padding_mask[None].float(), size=f.shape[-2:])[0].bool() for f in feats
        ]
        pos = [self.position_encoding(m).to(f.dtype) for m, f in zip(masks, feats)]
        src, token_mask, token_pos, shapes, starts, ratios = flatten_levels(
            feats, masks, pos, self.level_embed
        )
        memory = self.encoder(src, token_pos, shapes, starts, ratios, token_mask)
        located = self.location_decoder(memory, shapes, starts, ratios, token_mask)

        # The mask decoder attends to the first three levels, without positions.
        mask_shapes: List[Tuple[int, int]] = [tuple(s) for s in shapes[:MASK_LEVELS].tolist()]
        num_tokens = sum(h * w for h, w in mask_shapes)
        mask_memory, mask_padding = memory[:, :num_tokens], token_mask[:, :num_tokens]

        if targets is not None:
            return self._losses(located, mask_memory, mask_shapes, mask_padding, targets)
        return self._predict(located, mask_memory, mask_shapes, mask_padding)

    def _losses(
        self,
        located: Dict[str, Tensor],
        memory: Tensor,
        shapes: List[Tuple[int, int]],
        padding: Tensor,
        targets: Sequence[Dict[str, Tensor]],
    ) -> Dict[str, Tensor]:
        if self.criterion is None:
            raise RuntimeError("this model has no criterion; build it with one to train")
        selection = self.criterion.select_thing_queries(
            located["pred_logits"][-1], located["pred_boxes"][-1], targets
        )
        thing_queries, _ = gather_queries(located["queries"], [q for q, _ in selection])
        things = self.mask_decoder.forward_things(thing_queries, memory, shapes, padding)
        stuff = self.mask_decoder.forward_stuff(memory, shapes, padding)
        outputs = {
            "pred_logits": located["pred_logits"],
            "pred_boxes": located["pred_boxes"],
            "selection": selection,
            "thing_masks": things["masks"],
            "thing_logits": things["logits"],
            "stuff_masks": stuff["masks"],
            "stuff_logits": stuff["logits"],
        }
        return self.criterion(outputs, targets)

    def _predict(
        self,
        located: Dict[str, Tensor],
        memory: Tensor,
        shapes: List[Tuple[int, int]],
        padding: Tensor,
    ) -> Dict[str, Tensor]:
        # Thing classes come from the location decoder: top-k of its (Q x K) sigmoid scores;
        # a query may be kept for several classes.
        logits = located["pred_logits"][-1]  # (N, Q, K)
        num_classes = logits.shape[-1]
        scores = logits.sigmoid().flatten(1)  # (N, Q*K)
        top_scores, top = scores.topk(min(self.max_detections, scores.shape[1]), dim=1)
        query_idx, labels = top // num_classes, top % num_classes
        queries = located["queries"]
        # (N, k) -> (N, k, C) gather of the kept queries
        kept = queries.gather(1, query_idx[..., None].expand(-1, -1, queries.shape[-1]))
        boxes = located["pred_boxes"][-1]
        kept_boxes = boxes.gather(1, query_idx[..., None].expand(-1, -1, boxes.shape[-1]))
        layers = self.mask_decoder_layers
        things = self.mask_decoder.forward_things(kept, memory, shapes, padding, layers)
        stuff = self.mask_decoder.forward_stuff(memory, shapes, padding, layers)
        return {
            "thing_masks": things["masks"][-1],
            "thing_scores": top_scores,
            "thing_labels": labels,
            "thing_boxes": kept_boxes,
            "stuff_masks": stuff["masks"][-1],
            "stuff_scores": stuff["logits"][-1].sigmoid(),
        }

    def postprocess(
        self,
        outputs: Dict[str, Tensor],
        padded_size: Tuple[int, int],
        image_sizes: Sequence[Tuple[int, int]],
        output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[Dict[str, object]]:
        """Per-image panoptic, instance and semantic results from :meth:`forward` outputs.

        Masks are cropped to the valid image at stride 8 and resized to the output size in one
        bilinear step (as the authors do), then merged. Only the queries that can survive the
        merging are resized for it (:func:`mask_wise_candidates`, an exact pre-filter).

        Args:
            outputs: the inference outputs of :meth:`forward`.
            padded_size: (Hp, Wp) of the input batch.
            image_sizes: per image, (h, w) of the valid image inside the padded input.
            output_sizes: per image, the (height, width) to predict at; defaults to
                ``image_sizes``.

        Returns:
            per image a dict with the model's ``result_types``: ``panoptic_seg`` (the (H, W)
            int32 map and segments_info; category ids are contiguous: things [0, K), stuff
            K + [0, Z)), ``instances`` (:class:`InstanceResults` of the thing queries) and
            ``sem_seg`` ((K + Z, H, W) scores).
        """
        output_sizes = image_sizes if output_sizes is None else output_sizes
        num_images = outputs["thing_masks"].shape[0]
        if len(image_sizes) != num_images or len(output_sizes) != num_images:
            raise ValueError(
                f"outputs hold {num_images} images but got {len(image_sizes)} image sizes and "
                f"{len(output_sizes)} output sizes"
            )
        mask_h, mask_w = outputs["thing_masks"].shape[-2:]
        num_kept = outputs["thing_scores"].shape[1]
        stuff_labels = torch.arange(self.num_stuff_classes, device=outputs["stuff_scores"].device)
        results = []
        for i, ((h, w), out_size) in enumerate(zip(image_sizes, output_sizes)):
            # (k + Z, H1, W1) cropped to the valid part at stride 8
            masks = torch.cat([outputs["thing_masks"][i], outputs["stuff_masks"][i]])
            masks = masks[
                :,
                : math.ceil(h * mask_h / padded_size[0]),
                : math.ceil(w * mask_w / padded_size[1]),
            ]
            scores = torch.cat([outputs["thing_scores"][i], outputs["stuff_scores"][i]])
            labels = torch.cat([outputs["thing_labels"][i], stuff_labels + self.num_thing_classes])
            is_thing = torch.arange(len(scores), device=scores.device) < num_kept

            def resize(x: Tensor) -> Tensor:
                if x.shape[0] == 0:
                    return x.new_zeros((0, *out_size))
                return F.interpolate(x[None], size=tuple(out_size), mode="bilinear")[0]

            # semantic and instance results read every query: resize them all once
            resized = resize(masks) if {"instances", "sem_seg"} & set(self.result_types) else None
            result = {}
            if "panoptic_seg" in self.result_types:
                keep = self._merge_candidates(masks, scores, is_thing)
                chosen = (scores[keep], labels[keep], is_thing[keep])
                if resized is not None:
                    merge = MERGERS[self.merge]
                    result["panoptic_seg"] = merge(resized[keep], *chosen, **self.merge_kwargs)
                elif self.merge == "mask_wise":  # resize and merge block by block
                    result["panoptic_seg"] = mask_wise_merging_resized(
                        masks[keep], tuple(out_size), *chosen, **self.merge_kwargs
                    )
                else:
                    result["panoptic_seg"] = pixel_wise_argmax(
                        resize(masks[keep]), *chosen, **self.merge_kwargs
                    )
            if "instances" in self.result_types:
                result["instances"] = instance_results(
                    resized[:num_kept],
                    scores[:num_kept],
                    labels[:num_kept],
                    max_detections=self.max_detections,
                    # the merging's confidence exponents (pixel-wise argmax has none: the
                    # authors' 1 and 2)
                    alpha=self.merge_kwargs.get("alpha", 1.0),
                    beta=self.merge_kwargs.get("beta", 2.0),
                )
            if "sem_seg" in self.result_types:
                num_classes = self.num_thing_classes + self.num_stuff_classes
                result["sem_seg"] = semantic_map(resized, scores, labels, num_classes)
            results.append(result)
        return results

    def _merge_candidates(self, masks: Tensor, scores: Tensor, is_thing: Tensor) -> Tensor:
        """(Q,) bool: the queries the merging could keep, decided before resizing."""
        options = self.merge_kwargs
        if self.merge == "pixel_argmax":
            return scores >= options["score_threshold"]
        names = (
            "alpha",
            "beta",
            "thing_score_threshold",
            "stuff_score_threshold",
            "mask_threshold",
        )
        # (Q, h, w) -> (Q,) largest value of each mask
        peak = masks.flatten(1).amax(dim=1)
        return mask_wise_candidates(peak, scores, is_thing, **{n: options[n] for n in names})


def build_panoptic_segformer(
    backbone: Optional[nn.Module],
    in_channels: Sequence[int],
    num_thing_classes: int = 80,
    num_stuff_classes: int = 53,
    d_model: int = 256,
    num_feature_levels: int = 4,
    n_heads: int = 8,
    n_points: int = 4,
    d_ffn: int = 1024,
    dropout: float = 0.1,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    num_queries: int = 300,
    num_thing_mask_layers: int = 4,
    num_stuff_mask_layers: int = 6,
    mask_mlp_ratio: float = 4.0,
    box_free: bool = False,
    criterion: Optional[PanopticSegFormerCriterion] = None,
    with_criterion: bool = True,
    **inference_kwargs: object,
) -> PanopticSegFormer:
    """Builds Panoptic SegFormer with the authors' hyper-parameters as defaults.

    Args:
        backbone: images -> feature maps, finest first, with ``in_channels`` channels; None
            for a model that is given the features (:meth:`PanopticSegFormer.forward_features`).
        in_channels: channels of the backbone maps (ResNet: 512, 1024, 2048).
        num_thing_classes, num_stuff_classes: K and Z (COCO: 80 and 53).
        d_model: channels C (256).
        num_feature_levels: encoder levels; 4 in the authors' code (a stride-64 level from C5),
            3 as the paper's text.
        n_heads, n_points: of every deformable attention (8, 4).
        d_ffn, dropout: of the encoder and location decoder FFNs (1024, 0.1).
        num_encoder_layers, num_decoder_layers: 6 and 6.
        num_queries: thing queries (300).
        num_thing_mask_layers, num_stuff_mask_layers: mask decoder stacks (4 and 6).
        mask_mlp_ratio: MLP ratio of the mask decoder layers (4).
        box_free: location decoder predicts mass centres (paper Table 6).
        criterion: the losses; None builds the default one (unless ``with_criterion`` is off).
        with_criterion: False builds an inference-only model.
        **inference_kwargs: ``max_detections``, ``mask_decoder_layers``, ``merge`` and
            ``merge_kwargs`` of :class:`PanopticSegFormer`.
    """
    if num_feature_levels < MASK_LEVELS:
        raise ValueError(
            f"num_feature_levels must be at least {MASK_LEVELS} (the mask decoder reads three), "
            f"got {num_feature_levels}"
        )
    if criterion is None and with_criterion:
        criterion = PanopticSegFormerCriterion(num_thing_classes, num_stuff_classes)
    encoder_layer = DeformableEncoderLayer(
        d_model, d_ffn, dropout, num_feature_levels, n_heads, n_points
    )
    decoder_layer = LocationDecoderLayer(
        d_model, d_ffn, dropout, num_feature_levels, n_heads, n_points
    )
    return PanopticSegFormer(
        backbone=backbone,
        neck=ChannelMapper(in_channels, d_model, num_outs=num_feature_levels),
        position_encoding=PositionEmbeddingSine(d_model // 2, normalize=True, offset=-0.5),
        encoder=DeformableEncoder(encoder_layer, num_encoder_layers),
        location_decoder=LocationDecoder(
            decoder_layer,
            num_decoder_layers,
            num_queries,
            num_thing_classes,
            d_model,
            box_free=box_free,
        ),
        mask_decoder=DecoupledMaskDecoder(
            num_thing_classes,
            num_stuff_classes,
            d_model,
            n_heads,
            mask_mlp_ratio,
            num_thing_mask_layers,
            num_stuff_mask_layers,
        ),
        criterion=criterion if with_criterion else None,
        num_thing_classes=num_thing_classes,
        num_stuff_classes=num_stuff_classes,
        **inference_kwargs,
    )
