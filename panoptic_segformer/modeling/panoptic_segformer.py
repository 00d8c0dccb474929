"""Panoptic SegFormer end to end (Figure 2 of the paper), in plain PyTorch.

backbone -> ChannelMapper neck -> deformable encoder -> location decoder -> query-decoupled
mask decoder -> losses (training) or per-query masks and scores (inference), which
:meth:`PanopticSegFormerCore.postprocess` turns into panoptic, instance and semantic results.

Images come in normalised and padded into one batch, with a padding mask (True at padding).
The detectron2 meta-architecture wraps this module; nothing here imports detectron2.

Shape shorthand: N images, Hp x Wp padded input, L feature levels, S tokens, C channels,
Q thing queries, K thing classes, Z stuff classes, k kept thing queries at inference,
H1 x W1 the stride-8 level.
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

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
from panoptic_segformer.modeling.inference import InferenceOptions, check_thing_classes, predict
from panoptic_segformer.modeling.inference_preparation import PreparableForInference
from panoptic_segformer.modeling.location_decoder import LocationDecoder, LocationDecoderLayer
from panoptic_segformer.modeling.mask_decoder import MASK_LEVELS
from panoptic_segformer.modeling.neck import ChannelMapper
from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine
from panoptic_segformer.modeling.postprocessing import results_from_outputs
from panoptic_segformer.modeling.targets import split_targets


class QuerySizes(NamedTuple):
    """What joint matching (paper Table 8) changes in the sizes of the queries' sets.

    Attributes:
        query_classes: classes the thing queries (location decoder, thing mask decoder)
            classify into: K, or K + Z with joint matching.
        stuff_queries: stuff queries of the mask decoder: Z, or 0 with joint matching.
        joint_extra: what the thing queries' counts and caps grow by (the queries, the
            detections kept at inference, the filter's cap), to leave room for every stuff
            segment: 0, or Z with joint matching.
    """

    query_classes: int
    stuff_queries: int
    joint_extra: int


def query_sizes(num_thing_classes: int, num_stuff_classes: int, joint_matching: bool) -> QuerySizes:
    """The sizes of the thing and stuff query sets of K = ``num_thing_classes`` and
    Z = ``num_stuff_classes``: with joint matching one set of thing queries finds the things and
    the stuff (all K + Z classes) and there are no stuff queries."""
    extra = num_stuff_classes if joint_matching else 0
    return QuerySizes(num_thing_classes + extra, num_stuff_classes - extra, extra)


class PanopticSegFormerCore(PreparableForInference, nn.Module):
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
        inference: the inference settings (:meth:`set_inference` changes them later). Thing
            classes from the mask decoder need its class loss weight positive; without location
            decoder layers only the mask decoder can classify.
        joint_matching: one query set for things and stuff (paper Table 8): the location
            decoder and the thing mask decoder classify into all K + Z classes, there are no
            stuff queries, and every segment is matched as a thing is. The parts must be built
            so (:func:`build_panoptic_segformer` does).

    Attributes:
        inference (InferenceOptions): the current inference settings.
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
        inference: InferenceOptions = InferenceOptions(),
        joint_matching: bool = False,
    ) -> None:
        super().__init__()
        sizes = query_sizes(num_thing_classes, num_stuff_classes, joint_matching)
        built = (location_decoder.num_classes, mask_decoder.num_stuff_classes)
        if built != (sizes.query_classes, sizes.stuff_queries):
            raise ValueError(
                f"with joint_matching={joint_matching}, the location decoder must classify into "
                f"{sizes.query_classes} classes and the mask decoder hold {sizes.stuff_queries} "
                f"stuff queries; they were built for {built[0]} and {built[1]}"
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
        self.set_inference(inference)
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
        # One copy of the slice for a batch of several images (one image's slice already is
        # contiguous): the key and value projections of every mask decoder layer read it, and a
        # linear layer copies a strided input for itself (and keeps the copy for backward).
        mask_memory = memory[:, :num_tokens].contiguous()
        mask_padding = token_mask[:, :num_tokens]

        if targets is not None:
            self.refuse_training()
            return self._losses(located, mask_memory, mask_shapes, mask_padding, targets)
        return predict(
            located, self.mask_decoder, mask_memory, mask_shapes, mask_padding, self.inference
        )

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
        sizes = query_sizes(self.num_thing_classes, self.num_stuff_classes, self.joint_matching)
        box_free = self.location_decoder.box_free
        return split_targets(
            labels, masks, image_size, sizes.query_classes, sizes.stuff_queries, box_free
        )

    def postprocess(
        self,
        outputs: Dict[str, Tensor],
        padded_size: Tuple[int, int],
        image_sizes: Sequence[Tuple[int, int]],
        output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> List[Dict[str, object]]:
        """Per-image panoptic, instance and semantic results from :meth:`forward` outputs, as
        the inference settings ask (:func:`results_from_outputs`).

        Args:
            outputs: the inference outputs of :meth:`forward`.
            padded_size: (Hp, Wp) of the input batch.
            image_sizes: per image, (h, w) of the valid image inside the padded input.
            output_sizes: per image, the (height, width) to predict at; defaults to
                ``image_sizes``.
        """
        return results_from_outputs(
            outputs,
            padded_size,
            image_sizes,
            output_sizes,
            num_thing_classes=self.num_thing_classes,
            num_stuff_classes=self.num_stuff_classes,
            merge=self.inference.merge,
            result_types=self.inference.result_types,
            max_detections=self.inference.max_detections,
        )

    def set_inference(self, inference: InferenceOptions) -> None:
        """Replaces the inference settings (merging, early exit, results, class source).

        Raises:
            ValueError: the thing classes are to come from a part that cannot classify: a
                location decoder of 0 layers, or a mask decoder whose class loss weight is 0.
        """
        criterion = self.criterion
        check_thing_classes(
            inference.thing_classes_from,
            len(self.location_decoder.layers),
            None if criterion is None else criterion.thing_class_weight,
        )
        self.inference = inference


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
    encoder_checkpointing: bool = False,
    mask_decoder_checkpointing: bool = False,
    criterion: Optional[PanopticSegFormerCriterion] = None,
    with_criterion: bool = True,
    inference: InferenceOptions = InferenceOptions(),
) -> PanopticSegFormerCore:
    """Builds Panoptic SegFormer with the authors' hyper-parameters as defaults.

    Args:
        backbone: images -> feature maps, finest first, with ``in_channels`` channels; None
            for a model that is given the features
            (:meth:`PanopticSegFormerCore.forward_features`).
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
        encoder_checkpointing, mask_decoder_checkpointing: activation checkpointing of the
            encoder's layers and of the mask decoder's layers and tails in training: their
            activations are computed again in the backward pass instead of kept (less memory,
            more time; the same losses and gradients).
        criterion: the losses; None builds the default one (unless ``with_criterion`` is off),
            for K + Z thing classes and no stuff with joint matching.
        with_criterion: False builds an inference-only model.
        inference: the inference settings.
    """
    if num_feature_levels < MASK_LEVELS:
        raise ValueError(
            f"num_feature_levels must be at least {MASK_LEVELS} (the mask decoder reads three), "
            f"got {num_feature_levels}"
        )
    query_classes, stuff_queries, _ = query_sizes(
        num_thing_classes, num_stuff_classes, joint_matching
    )
    if criterion is None and with_criterion:
        criterion = PanopticSegFormerCriterion(query_classes, stuff_queries)
    encoder_layer = DeformableEncoderLayer(
        d_model, d_ffn, dropout, num_feature_levels, n_heads, n_points
    )
    decoder_layer = LocationDecoderLayer(
        d_model, d_ffn, dropout, num_feature_levels, n_heads, n_points
    )
    return PanopticSegFormerCore(
        backbone=backbone,
        neck=ChannelMapper(in_channels, d_model, num_outs=num_feature_levels),
        position_encoding=PositionEmbeddingSine(d_model // 2, normalize=True, offset=-0.5),
        encoder=DeformableEncoder(encoder_layer, num_encoder_layers, encoder_checkpointing),
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
            checkpointing=mask_decoder_checkpointing,
        ),
        criterion=criterion if with_criterion else None,
        num_thing_classes=num_thing_classes,
        num_stuff_classes=num_stuff_classes,
        inference=inference,
        joint_matching=joint_matching,
    )
