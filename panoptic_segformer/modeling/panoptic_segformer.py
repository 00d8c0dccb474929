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
from panoptic_segformer.modeling.frozen_bn import PreparableForInference
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
from panoptic_segformer.modeling.targets import split_targets

MERGERS = {"mask_wise": mask_wise_merging, "pixel_argmax": pixel_wise_argmax}
RESULT_TYPES = ("panoptic_seg", "instances", "sem_seg")
# where the classes of the thing queries come from at inference
THING_CLASS_SOURCES = ("location_decoder", "mask_decoder")


class PanopticSegFormer(PreparableForInference, nn.Module):
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
        thing_classes_from: at inference, the classes and scores of things come from the
            location decoder's last class head ("location_decoder", the authors' code) or from
            the thing mask decoder's last class head ("mask_decoder", paper Sec. 3.3.3; its
            class loss weight must then be positive). Without location decoder layers only
            "mask_decoder" can classify.
        joint_matching: one query set for things and stuff (paper Table 8): the location
            decoder and the thing mask decoder classify into all K + Z classes, there are no
            stuff queries, and every segment is matched as a thing is. The parts must be built
            so (:func:`build_panoptic_segformer` does).
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
        thing_classes_from: str = "location_decoder",
        joint_matching: bool = False,
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
        _check_class_source(thing_classes_from, location_decoder, criterion)
        query_classes = num_thing_classes + (num_stuff_classes if joint_matching else 0)
        stuff_queries = 0 if joint_matching else num_stuff_classes
        built = (location_decoder.num_classes, mask_decoder.num_stuff_classes)
        if built != (query_classes, stuff_queries):
            raise ValueError(
                f"with joint_matching={joint_matching}, the location decoder must classify into "
                f"{query_classes} classes and the mask decoder hold {stuff_queries} stuff "
                f"queries; they were built for {built[0]} and {built[1]}"
            )
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
        self.thing_classes_from = thing_classes_from
        self.joint_matching = joint_matching
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
            [0, K) (in [0, K + Z) with joint matching), ``thing_boxes`` (N, k, B) normalised
            (only with location decoder layers), ``stuff_masks`` (N, Z, H1, W1) and
            ``stuff_scores`` (N, Z) (Z = 0 with joint matching); masks cover the padded input.
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

        # The mask decoder attends to the first three levels, without positions. Their sizes
        # are read from the maps, not from the shapes tensor, so that a tracer (torch.compile,
        # torch.export) sees sizes rather than data.
        mask_shapes: List[Tuple[int, int]] = [tuple(f.shape[-2:]) for f in feats[:MASK_LEVELS]]
        num_tokens = sum(h * w for h, w in mask_shapes)
        mask_memory, mask_padding = memory[:, :num_tokens], token_mask[:, :num_tokens]

        if targets is not None:
            self.refuse_training()
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
        if len(located["pred_logits"]):
            selection = self.criterion.select_thing_queries(
                located["pred_logits"][-1], located["pred_boxes"][-1], targets
            )
        else:  # no location decoder layers: every query goes on, matched by the mask decoder
            every = torch.arange(located["queries"].shape[1], device=located["queries"].device)
            selection = [(every, every[:0]) for _ in targets]
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
        layers = self.mask_decoder_layers
        queries = located["queries"]
        if self.thing_classes_from == "location_decoder":
            # Top-k of the location decoder's (Q x K) sigmoid scores; a query may be kept for
            # several classes.
            top_scores, query_idx, labels = _top_detections(
                located["pred_logits"][-1], self.max_detections
            )
            things = self.mask_decoder.forward_things(
                _gather(queries, query_idx), memory, shapes, padding, layers, last_mask_only=True
            )
            thing_masks = things["masks"][-1]
        else:
            # The mask decoder classifies (Sec. 3.3.3). It runs on the location decoder's k
            # best queries (by their highest class score), as in training it runs on those
            # the filter selects near the things; without location decoder layers, on all.
            if len(located["pred_logits"]):
                best = located["pred_logits"][-1].amax(dim=-1)  # (N, Q)
                candidates = best.topk(min(self.max_detections, best.shape[1]), dim=1).indices
            else:
                candidates = torch.arange(queries.shape[1], device=queries.device)
                candidates = candidates[None].expand(queries.shape[0], -1)
            things = self.mask_decoder.forward_things(
                _gather(queries, candidates), memory, shapes, padding, layers, last_mask_only=True
            )
            top_scores, local_idx, labels = _top_detections(
                things["logits"][-1], self.max_detections
            )
            query_idx = candidates.gather(1, local_idx)
            thing_masks = _gather(things["masks"][-1], local_idx)
        stuff = self.mask_decoder.forward_stuff(
            memory, shapes, padding, layers, last_mask_only=True
        )
        outputs = {
            "thing_masks": thing_masks,
            "thing_scores": top_scores,
            "thing_labels": labels,
            "stuff_masks": stuff["masks"][-1],
            "stuff_scores": stuff["logits"][-1].sigmoid(),
        }
        if len(located["pred_boxes"]):
            outputs["thing_boxes"] = _gather(located["pred_boxes"][-1], query_idx)
        return outputs

    def split_targets(
        self, labels: Tensor, masks: Tensor, image_size: Tuple[int, int]
    ) -> Dict[str, Tensor]:
        """One image's segments as this model's criterion targets (:func:`split_targets`);
        with joint matching every segment is a target of the thing queries.

        Args:
            labels (Tensor): (T,) int64 model class ids: things [0, K), stuff [K, K + Z).
            masks (Tensor): (T, Hm, Wm) bool masks at the padded input resolution.
            image_size: (h, w) of the valid image inside the masks.
        """
        total = self.num_thing_classes + self.num_stuff_classes
        things = total if self.joint_matching else self.num_thing_classes
        box_free = self.location_decoder.box_free
        return split_targets(labels, masks, image_size, things, total - things, box_free)

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
            scores = torch.cat([outputs["thing_scores"][i], outputs["stuff_scores"][i]])
            labels = torch.cat([outputs["thing_labels"][i], stuff_labels + self.num_thing_classes])
            # (with joint matching, thing queries also predict stuff classes)
            is_thing = labels < self.num_thing_classes

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
                # the thing queries' results of thing classes
                rows = is_thing.nonzero().squeeze(1)
                result["instances"] = instance_results(
                    resized[rows],
                    scores[rows],
                    labels[rows],
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


def _check_class_source(
    source: str, location_decoder: LocationDecoder, criterion: Optional[PanopticSegFormerCriterion]
) -> None:
    if source not in THING_CLASS_SOURCES:
        raise ValueError(f"thing_classes_from must be one of {THING_CLASS_SOURCES}, got {source!r}")
    if source == "location_decoder" and not location_decoder.layers:
        raise ValueError(
            "a location decoder of 0 layers predicts no classes: take the thing classes from "
            "the mask decoder (thing_classes_from='mask_decoder')"
        )
    if source == "mask_decoder" and criterion is not None and criterion.thing_class_weight <= 0:
        raise ValueError(
            "thing classes from the mask decoder need its class heads trained, but the "
            f"criterion's thing_class_weight is {criterion.thing_class_weight}; make it positive"
        )


def _top_detections(logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-k of the (N, Q, K) sigmoid class scores over queries x classes: scores, query
    indices and classes, each (N, min(k, Q K))."""
    num_classes = logits.shape[-1]
    scores = logits.sigmoid().flatten(1)  # (N, Q*K)
    top_scores, top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top_scores, top // num_classes, top % num_classes


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values (N, Q, ...) at the (N, k) query indices -> (N, k, ...)."""
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, expanded.expand(-1, -1, *values.shape[2:]))


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
    joint_matching: bool = False,
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
        num_encoder_layers, num_decoder_layers: 6 and 6; 0 decoder layers (paper Table 6)
            needs ``thing_classes_from="mask_decoder"``.
        num_queries: thing queries (300).
        num_thing_mask_layers, num_stuff_mask_layers: mask decoder stacks (4 and 6).
        mask_mlp_ratio: MLP ratio of the mask decoder layers (4).
        box_free: location decoder predicts mass centres (paper Table 6).
        joint_matching: one set of ``num_queries`` queries classified into all K + Z classes
            and no stuff queries (paper Table 8; its fair comparison uses 300 + 53 = 353).
        criterion: the losses; None builds the default one (unless ``with_criterion`` is off),
            for K + Z thing classes and no stuff with joint matching.
        with_criterion: False builds an inference-only model.
        **inference_kwargs: ``max_detections``, ``mask_decoder_layers``, ``merge``,
            ``merge_kwargs``, ``result_types`` and ``thing_classes_from`` of
            :class:`PanopticSegFormer`.
    """
    if num_feature_levels < MASK_LEVELS:
        raise ValueError(
            f"num_feature_levels must be at least {MASK_LEVELS} (the mask decoder reads three), "
            f"got {num_feature_levels}"
        )
    # classes of the thing queries and number of stuff queries
    query_classes = num_thing_classes + (num_stuff_classes if joint_matching else 0)
    stuff_queries = 0 if joint_matching else num_stuff_classes
    if criterion is None and with_criterion:
        criterion = PanopticSegFormerCriterion(query_classes, stuff_queries)
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
            query_classes,
            d_model,
            box_free=box_free,
        ),
        mask_decoder=DecoupledMaskDecoder(
            query_classes,
            stuff_queries,
            d_model,
            n_heads,
            mask_mlp_ratio,
            num_thing_mask_layers,
            num_stuff_mask_layers,
        ),
        criterion=criterion if with_criterion else None,
        num_thing_classes=num_thing_classes,
        num_stuff_classes=num_stuff_classes,
        joint_matching=joint_matching,
        **inference_kwargs,
    )
