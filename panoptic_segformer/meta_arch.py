"""The detectron2 meta-architecture: the model core behind detectron2's inputs and outputs.

Training and inference take detectron2's list of per-image dicts (``image`` in
``INPUT.FORMAT``, ``instances`` with ``gt_classes`` and ``gt_masks`` when training, ``height``
and ``width`` for the output size) and return detectron2's formats: a loss dict when training,
and per image ``panoptic_seg`` = (id map, segments_info), ``instances`` and ``sem_seg`` at the
original image size.

Class ids: datasets number categories contiguously in their own order (detectron2's
``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``); the model
numbers things first ([0, K)) then stuff ([K, K + Z)). The meta-architecture converts between
the two, so inputs and outputs always use the dataset's contiguous ids.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from panoptic_segformer.modeling import PanopticSegFormer as PanopticSegFormerModel
from panoptic_segformer.modeling import PanopticSegFormerCriterion, build_panoptic_segformer
from panoptic_segformer.modeling.frozen_bn import PreparableForInference
from panoptic_segformer.modeling.matcher import HungarianMatcher, MaskDecoderMatcher

__all__ = [
    "PanopticSegFormer",
    "check_losses_finite",
    "class_id_maps",
    "merge_kwargs_from_config",
]


def class_id_maps(metadata, num_things: int, num_stuff: int) -> Tuple[List[int], List[int]]:
    """The dataset's contiguous ids of the model's thing and stuff classes, in model order.

    Args:
        metadata: detectron2 ``Metadata`` of the dataset; without
            ``thing_dataset_id_to_contiguous_id`` the ids are taken as things first
            ([0, K) then [K, K + Z)).
        num_things, num_stuff: K and Z of the model.

    Raises:
        ValueError: when the dataset's thing or stuff category counts are not K and Z.
    """
    things = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    stuff = getattr(metadata, "stuff_dataset_id_to_contiguous_id", None)
    if things is None or stuff is None:
        return list(range(num_things)), list(range(num_things, num_things + num_stuff))
    thing_ids, stuff_ids = sorted(things.values()), sorted(stuff.values())
    if len(thing_ids) != num_things or len(stuff_ids) != num_stuff:
        raise ValueError(
            f"dataset {metadata.name!r} has {len(thing_ids)} thing and {len(stuff_ids)} stuff "
            f"categories but the model has MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES="
            f"{num_things} and NUM_STUFF_CLASSES={num_stuff}"
        )
    return thing_ids, stuff_ids


def check_losses_finite(losses: Dict[str, Tensor]) -> None:
    """Raises before the backward pass when a loss term is infinite or NaN, naming the terms.

    detectron2's trainer also stops on a non-finite total loss, but lists every term (dozens
    here, with the auxiliary ones); this names the culprits. One host synchronisation.

    Args:
        losses: scalar loss tensors by name.

    Raises:
        FloatingPointError: naming the non-finite terms, their values and, inside a detectron2
            trainer, the iteration.
    """
    if not losses:
        return
    finite = torch.stack([v.detach().float() for v in losses.values()]).isfinite()
    if bool(finite.all()):
        return
    bad = [
        f"{name} = {float(value.detach())}"
        for (name, value), ok in zip(losses.items(), finite.tolist())
        if not ok
    ]
    try:
        where = f"iteration={get_event_storage().iter}"
    except AssertionError:  # not inside detectron2's EventStorage: no iteration to name
        where = "this step"
    raise FloatingPointError(
        f"Loss became infinite or NaN at {where}: {', '.join(bad)} "
        f"({len(bad)} of {len(losses)} loss terms)"
    )


def merge_kwargs_from_config(cfg, merge: str) -> Dict[str, float]:
    """The keyword options of the merging ``merge`` ("mask_wise" or "pixel_argmax") from
    ``MODEL.PANOPTIC_SEGFORMER.TEST``."""
    test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    if merge == "pixel_argmax":
        return dict(
            score_threshold=test.PIXEL_SCORE_THRESHOLD,
            mask_threshold=test.MASK_THRESHOLD,
            class_weighted=test.PIXEL_ARGMAX_CLASS_WEIGHTED,
        )
    return dict(
        alpha=test.ALPHA,
        beta=test.BETA,
        thing_score_threshold=test.THING_SCORE_THRESHOLD,
        stuff_score_threshold=test.STUFF_SCORE_THRESHOLD,
        thing_overlap_threshold=test.THING_OVERLAP_THRESHOLD,
        stuff_overlap_threshold=test.STUFF_OVERLAP_THRESHOLD,
        mask_threshold=test.MASK_THRESHOLD,
    )


def _check_in_features(in_features: Sequence[str], backbone: Backbone) -> None:
    missing = [name for name in in_features if name not in backbone.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.PANOPTIC_SEGFORMER.IN_FEATURES {list(in_features)} names {missing}, which the "
            f"backbone does not output (it has {sorted(backbone.output_shape())})"
        )


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std


@META_ARCH_REGISTRY.register()
class PanopticSegFormer(PreparableForInference, nn.Module):
    """Panoptic SegFormer as a detectron2 meta-architecture.

    Args:
        backbone: a detectron2 backbone returning ``in_features``.
        in_features: the backbone outputs fed to the neck, finest first (C3, C4, C5).
        model: the model core, built without a backbone (``build_panoptic_segformer(None, ...)``).
        pixel_mean, pixel_std: per-channel normalisation in ``INPUT.FORMAT`` order.
        size_divisibility: pad batches to a multiple of this.
        thing_ids, stuff_ids: the dataset's contiguous ids of the model's thing and stuff
            classes (:func:`class_id_maps`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        model: PanopticSegFormerModel,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        thing_ids: Sequence[int],
        stuff_ids: Sequence[int],
    ) -> None:
        super().__init__()
        _check_in_features(in_features, backbone)
        if len(thing_ids) != model.num_thing_classes or len(stuff_ids) != model.num_stuff_classes:
            raise ValueError(
                f"{len(thing_ids)} thing and {len(stuff_ids)} stuff ids for a model of "
                f"{model.num_thing_classes} and {model.num_stuff_classes} classes"
            )
        self.backbone = backbone
        self.in_features = list(in_features)
        self.model = model
        self.normalize = _Normalize(pixel_mean, pixel_std)
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        model_to_dataset = torch.tensor([*thing_ids, *stuff_ids], dtype=torch.long)
        dataset_to_model = torch.full((int(model_to_dataset.max()) + 1,), -1, dtype=torch.long)
        dataset_to_model[model_to_dataset] = torch.arange(len(model_to_dataset))
        self.register_buffer("model_to_dataset", model_to_dataset, persistent=False)
        self.register_buffer("dataset_to_model", dataset_to_model, persistent=False)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        ps = cfg.MODEL.PANOPTIC_SEGFORMER
        if ps.NUM_THING_CLASSES < 1 or ps.NUM_STUFF_CLASSES < 0:
            raise ValueError(
                "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES must be >= 1 (the location decoder "
                "classifies thing queries) and NUM_STUFF_CLASSES >= 0 (0 for a dataset of things "
                f"only); got {ps.NUM_THING_CLASSES} and {ps.NUM_STUFF_CLASSES}"
            )
        _check_thing_classes(ps)
        backbone = build_backbone(cfg)
        _check_in_features(ps.IN_FEATURES, backbone)
        shapes = backbone.output_shape()
        datasets = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
        metadata = MetadataCatalog.get(datasets[0]) if datasets else None
        thing_ids, stuff_ids = class_id_maps(metadata, ps.NUM_THING_CLASSES, ps.NUM_STUFF_CLASSES)
        result_types = [
            name
            for name, on in (
                ("panoptic_seg", ps.TEST.PANOPTIC_ON),
                ("instances", ps.TEST.INSTANCE_ON),
                ("sem_seg", ps.TEST.SEMANTIC_ON),
            )
            if on
        ]
        model = build_panoptic_segformer(
            None,
            [shapes[name].channels for name in ps.IN_FEATURES],
            num_thing_classes=ps.NUM_THING_CLASSES,
            num_stuff_classes=ps.NUM_STUFF_CLASSES,
            d_model=ps.HIDDEN_DIM,
            num_feature_levels=ps.NUM_FEATURE_LEVELS,
            n_heads=ps.NHEADS,
            n_points=ps.N_POINTS,
            d_ffn=ps.DIM_FEEDFORWARD,
            dropout=ps.DROPOUT,
            num_encoder_layers=ps.ENC_LAYERS,
            num_decoder_layers=ps.DEC_LAYERS,
            num_queries=ps.NUM_QUERIES + (ps.NUM_STUFF_CLASSES if ps.JOINT_MATCHING else 0),
            num_thing_mask_layers=ps.THING_MASK_LAYERS,
            num_stuff_mask_layers=ps.STUFF_MASK_LAYERS,
            mask_mlp_ratio=ps.MASK_MLP_RATIO,
            box_free=ps.BOX_FREE,
            joint_matching=ps.JOINT_MATCHING,
            criterion=build_criterion(cfg),
            max_detections=ps.TEST.MAX_DETECTIONS,
            mask_decoder_layers=ps.TEST.MASK_DECODER_LAYERS or None,
            merge=ps.TEST.MERGE,
            merge_kwargs=merge_kwargs_from_config(cfg, ps.TEST.MERGE),
            result_types=result_types,
            thing_classes_from=ps.TEST.THING_CLASSES_FROM,
        )
        return {
            "backbone": backbone,
            "in_features": list(ps.IN_FEATURES),
            "model": model,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "thing_ids": thing_ids,
            "stuff_ids": stuff_ids,
        }

    @property
    def device(self) -> torch.device:
        return self.model_to_dataset.device

    def forward(self, batched_inputs: List[Dict[str, object]]):
        """
        Args:
            batched_inputs: detectron2's per-image dicts: ``image`` (3, H, W) in
                ``INPUT.FORMAT``; when training ``instances`` with ``gt_classes`` (dataset
                contiguous ids) and ``gt_masks``; at inference optionally ``height`` and
                ``width``, the size to predict at (default: the input image's).

        Returns:
            Training: a dict of weighted losses. Inference: per image a dict with the enabled
            results (``MODEL.PANOPTIC_SEGFORMER.TEST.*_ON``): ``panoptic_seg`` = ((H, W) int32
            segment ids, 0 = void; segments_info list of dicts with id, category_id, isthing,
            score), ``instances`` (``pred_masks``, ``pred_boxes``, ``scores``,
            ``pred_classes``) and ``sem_seg`` ((num classes, H, W) scores).

        Raises:
            FloatingPointError: in training, when a loss term is infinite or NaN
                (:func:`check_losses_finite`).
        """
        if not self.training:
            return self.inference(batched_inputs)
        images, padding_mask = self.preprocess_images([x["image"] for x in batched_inputs])
        padded = tuple(images.tensor.shape[-2:])
        targets = [self._targets(x, padded) for x in batched_inputs]
        losses = self.network(images.tensor, padding_mask, targets)
        check_losses_finite(losses)
        return losses

    def inference(
        self,
        batched_inputs: List[Dict[str, object]],
        network: Optional[Callable[[Tensor, Tensor], Dict[str, Tensor]]] = None,
    ) -> List[Dict[str, object]]:
        """Inference as :meth:`forward` in eval mode: pre-processing, the network, then the
        post-processing.

        Args:
            batched_inputs: as in :meth:`forward`.
            network: (N, 3, Hp, Wp) normalised padded images and their (N, Hp, Wp) padding
                mask -> the raw outputs of :meth:`network`; an exported copy of the network
                runs here (:mod:`panoptic_segformer.deploy`). None runs this model's own.
        """
        images, padding_mask = self.preprocess_images([x["image"] for x in batched_inputs])
        padded = tuple(images.tensor.shape[-2:])
        run = self.network if network is None else network
        outputs = run(images.tensor, padding_mask)
        output_sizes = [
            (int(x.get("height", h)), int(x.get("width", w)))
            for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        results = self.model.postprocess(outputs, padded, images.image_sizes, output_sizes)
        return [self._to_detectron2(r, size) for r, size in zip(results, output_sizes)]

    def preprocess_images(self, images: Sequence[Tensor]) -> Tuple[ImageList, Tensor]:
        """Normalised images padded into one batch, and its (N, Hp, Wp) bool padding mask (True
        at padding).

        Args:
            images: (3, H, W) images in ``INPUT.FORMAT``, any dtype.
        """
        batch = ImageList.from_tensors(
            [self.normalize(image.to(self.device).float()) for image in images],
            self.size_divisibility,
        )
        padded = tuple(batch.tensor.shape[-2:])
        padding_mask = torch.ones((len(batch), *padded), dtype=torch.bool, device=self.device)
        for mask, (h, w) in zip(padding_mask, batch.image_sizes):
            mask[:h, :w] = False
        return batch, padding_mask

    def network(
        self, images: Tensor, padding_mask: Tensor, targets: Optional[List[Dict]] = None
    ) -> Dict[str, Tensor]:
        """Backbone to mask decoder, no post-processing: the core's losses with ``targets``,
        else its raw outputs (the core model's ``forward_features``).

        Args:
            images (Tensor): (N, 3, Hp, Wp) normalised, padded images (the tensor of
                :meth:`preprocess_images`' ImageList).
            padding_mask (Tensor): (N, Hp, Wp) bool, True at padding.
            targets: per-image targets of the core's criterion, for the losses.
        """
        features = self.backbone(images)
        features = [features[name] for name in self.in_features]
        return self.model.forward_features(features, padding_mask, targets)

    def _targets(self, batched_input: Dict[str, object], padded: Tuple[int, int]) -> Dict:
        if "instances" not in batched_input:
            raise ValueError(
                "training needs 'instances' in every input dict (use the panoptic dataset mapper)"
            )
        instances = batched_input["instances"].to(self.device)
        h, w = instances.image_size
        classes = instances.gt_classes
        bad = (classes < 0) | (classes >= len(self.dataset_to_model))
        labels = self.dataset_to_model[classes.clamp(0, len(self.dataset_to_model) - 1)]
        if bool((bad | (labels < 0)).any()):
            raise ValueError(
                f"gt_classes {sorted(set(classes[bad | (labels < 0)].tolist()))} of "
                f"{batched_input.get('file_name', 'an image')} are not categories of the model"
            )
        masks = getattr(instances.gt_masks, "tensor", instances.gt_masks).bool()
        padded_masks = masks.new_zeros((len(masks), *padded))
        padded_masks[:, :h, :w] = masks
        return self.model.split_targets(labels, padded_masks, (h, w))

    def _to_detectron2(self, result: Dict[str, object], size: Tuple[int, int]) -> Dict:
        out = {}
        if "panoptic_seg" in result:
            seg, segments = result["panoptic_seg"]
            ids = self.model_to_dataset.tolist()
            for info in segments:
                info["category_id"] = ids[info["category_id"]]
            out["panoptic_seg"] = (seg, segments)
        if "instances" in result:
            found = result["instances"]
            instances = Instances(size)
            instances.pred_masks = found.masks
            instances.pred_boxes = Boxes(found.boxes)
            instances.scores = found.scores
            instances.pred_classes = self.model_to_dataset[found.classes]
            out["instances"] = instances
        if "sem_seg" in result:
            scores = result["sem_seg"]
            sem_seg = scores.new_zeros((int(self.model_to_dataset.max()) + 1, *size))
            sem_seg[self.model_to_dataset] = scores
            out["sem_seg"] = sem_seg
        return out


PER_BATCH = -1.0  # LAMBDA_THINGS / LAMBDA_STUFF: recomputed per batch (the authors' code)


def _fixed_lambdas(ps) -> bool:
    """Whether ``LAMBDA_THINGS`` and ``LAMBDA_STUFF`` are fixed weights (both >= 0) rather than
    per batch (both -1).

    Raises:
        ValueError: only one of them is set, or one is negative other than -1.
    """
    values = {"LAMBDA_THINGS": ps.LAMBDA_THINGS, "LAMBDA_STUFF": ps.LAMBDA_STUFF}
    for key, value in values.items():
        if value < 0 and value != PER_BATCH:
            raise ValueError(
                f"MODEL.PANOPTIC_SEGFORMER.{key} must be >= 0 (a fixed weight) or -1 (per "
                f"batch), got {value}"
            )
    per_batch = [key for key, value in values.items() if value == PER_BATCH]
    if len(per_batch) == 1:
        (unset,) = per_batch
        (fixed,) = set(values) - {unset}
        raise ValueError(
            f"MODEL.PANOPTIC_SEGFORMER.{fixed} is {values[fixed]} but {unset} is -1 (per batch): "
            "set both >= 0 for fixed weights, or both to -1"
        )
    return not per_batch


def _check_thing_classes(ps) -> None:
    """Raises ValueError, naming the keys, when nothing would classify or train the thing
    classes: a location decoder of 0 layers classifies nothing, and the mask decoder's class
    heads learn only with a positive THING_CLASS_WEIGHT."""
    key = "MODEL.PANOPTIC_SEGFORMER."
    source = ps.TEST.THING_CLASSES_FROM
    if ps.DEC_LAYERS < 0:
        raise ValueError(f"{key}DEC_LAYERS must be >= 0, got {ps.DEC_LAYERS}")
    if ps.DEC_LAYERS == 0 and source == "location_decoder":
        raise ValueError(
            f"{key}DEC_LAYERS is 0: a location decoder without layers predicts no classes, so "
            f"set {key}TEST.THING_CLASSES_FROM to 'mask_decoder' (and {key}THING_CLASS_WEIGHT "
            "> 0 to train its class heads)"
        )
    if source == "mask_decoder" and ps.THING_CLASS_WEIGHT <= 0:
        raise ValueError(
            f"{key}TEST.THING_CLASSES_FROM is 'mask_decoder' but {key}THING_CLASS_WEIGHT is "
            f"{ps.THING_CLASS_WEIGHT}: the mask decoder's class heads are then never trained; "
            "set it > 0 (e.g. 2.0, the class loss weight)"
        )


def build_criterion(cfg) -> PanopticSegFormerCriterion:
    """The losses and matchers of ``MODEL.PANOPTIC_SEGFORMER``."""
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    fixed = _fixed_lambdas(ps)
    focal = dict(focal_alpha=ps.FOCAL_ALPHA, focal_gamma=ps.FOCAL_GAMMA)
    # with joint matching the thing queries predict every class and there are no stuff queries
    joint = ps.JOINT_MATCHING
    return PanopticSegFormerCriterion(
        ps.NUM_THING_CLASSES + (ps.NUM_STUFF_CLASSES if joint else 0),
        0 if joint else ps.NUM_STUFF_CLASSES,
        matcher=HungarianMatcher(
            cost_class=ps.MATCHER.CLASS_COST,
            cost_bbox=ps.MATCHER.BBOX_COST,
            cost_giou=ps.MATCHER.GIOU_COST,
            **focal,
        ),
        mask_matcher=MaskDecoderMatcher(
            cost_class=ps.MASK_MATCHER.CLASS_COST,
            cost_bbox=ps.MASK_MATCHER.BBOX_COST,
            cost_giou=ps.MASK_MATCHER.GIOU_COST,
            cost_dice=ps.MASK_MATCHER.DICE_COST,
            **focal,
        ),
        class_weight=ps.CLASS_WEIGHT,
        bbox_weight=ps.BBOX_WEIGHT,
        giou_weight=ps.GIOU_WEIGHT,
        mask_weight=ps.MASK_WEIGHT,
        stuff_class_factor=ps.STUFF_CLASS_FACTOR,
        thing_class_weight=ps.THING_CLASS_WEIGHT,
        max_per_target=ps.MAX_PER_TARGET,
        max_selected=ps.MAX_SELECTED,
        lambda_things=ps.LAMBDA_THINGS if fixed else None,
        lambda_stuff=ps.LAMBDA_STUFF if fixed else None,
        deep_supervision=ps.DEEP_SUPERVISION,
        **focal,
    )
