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

Without the network: :meth:`PanopticSegFormer.processing_only` builds the pre- and
post-processing of :meth:`~PanopticSegFormer.inference` alone (normalisation, padding, class ids,
inference settings; no backbone, no core model, no parameters), to run around a network given to
``inference`` (an exported file's, :mod:`panoptic_segformer.d2.exported_predictor`).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from panoptic_segformer.d2.build import (
    build_model_from_config,
    class_id_maps,
    inference_options_from_config,
)
from panoptic_segformer.modeling import InferenceOptions, PanopticSegFormerCore
from panoptic_segformer.modeling.inference_preparation import PreparableForInference

__all__ = ["CorePostprocessing", "PanopticSegFormer", "check_losses_finite"]


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


def _check_in_features(in_features: Sequence[str], backbone: Backbone) -> None:
    """Raises ValueError, naming the key, when the backbone lacks a feature of IN_FEATURES (before
    the model is built for their channels)."""
    missing = [name for name in in_features if name not in backbone.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.PANOPTIC_SEGFORMER.IN_FEATURES {list(in_features)} names {missing}, which the "
            f"backbone does not output (it has {sorted(backbone.output_shape())})"
        )


@dataclass(frozen=True)
class CorePostprocessing:
    """The core model's post-processing without its network: what
    :meth:`PanopticSegFormerCore.postprocess` reads (the class counts and the inference settings),
    with that very method. The ``core`` of a :meth:`PanopticSegFormer.processing_only`
    meta-architecture."""

    num_thing_classes: int
    num_stuff_classes: int
    inference: InferenceOptions

    # the core model's own code, run on these settings
    postprocess = PanopticSegFormerCore.postprocess


def _processing_arguments(cfg) -> Dict[str, object]:
    """The meta-architecture's arguments of its pre- and post-processing (all but the backbone
    and the core), as :meth:`PanopticSegFormer.from_config` and
    :meth:`~PanopticSegFormer.processing_only` read them from ``cfg``."""
    thing_ids, stuff_ids = _class_ids(cfg)
    return {
        "in_features": list(cfg.MODEL.PANOPTIC_SEGFORMER.IN_FEATURES),
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
        "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        "thing_ids": thing_ids,
        "stuff_ids": stuff_ids,
    }


def _class_ids(cfg) -> Tuple[List[int], List[int]]:
    """The dataset's contiguous ids of the model's thing and stuff classes (of
    ``DATASETS.TRAIN[0]``, else ``DATASETS.TEST[0]``; things first without a dataset).

    Raises:
        ValueError: bad class counts, or counts that are not the dataset's.
    """
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    if ps.NUM_THING_CLASSES < 1 or ps.NUM_STUFF_CLASSES < 0:
        raise ValueError(
            "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES must be >= 1 (the location decoder "
            "classifies thing queries) and NUM_STUFF_CLASSES >= 0 (0 for a dataset of things "
            f"only); got {ps.NUM_THING_CLASSES} and {ps.NUM_STUFF_CLASSES}"
        )
    datasets = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    metadata = MetadataCatalog.get(datasets[0]) if datasets else None
    return class_id_maps(metadata, ps.NUM_THING_CLASSES, ps.NUM_STUFF_CLASSES)


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std


class PanopticSegFormer(PreparableForInference, nn.Module):
    """Panoptic SegFormer as a detectron2 meta-architecture.

    Args:
        backbone: a detectron2 backbone returning ``in_features``; None only for
            :meth:`processing_only`.
        in_features: the backbone outputs fed to the neck, finest first (C3, C4, C5); from a
            config, :meth:`from_config` checks that the backbone has them.
        core: the model core, built without a backbone (``build_panoptic_segformer(None, ...)``;
            from a config, :func:`~panoptic_segformer.d2.build.build_model_from_config`); a
            :class:`CorePostprocessing` for :meth:`processing_only`.
        pixel_mean, pixel_std: per-channel normalisation in ``INPUT.FORMAT`` order.
        size_divisibility: pad batches to a multiple of this (at least the backbone's own
            ``size_divisibility``); 1 pads a batch only to its largest image.
        thing_ids, stuff_ids: the dataset's contiguous ids of the model's thing and stuff
            classes (:func:`~panoptic_segformer.d2.build.class_id_maps`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Optional[Backbone],
        in_features: Sequence[str],
        core: Union[PanopticSegFormerCore, CorePostprocessing],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 1,
        thing_ids: Sequence[int],
        stuff_ids: Sequence[int],
    ) -> None:
        super().__init__()
        if len(thing_ids) != core.num_thing_classes or len(stuff_ids) != core.num_stuff_classes:
            raise ValueError(
                f"{len(thing_ids)} thing and {len(stuff_ids)} stuff ids for a model of "
                f"{core.num_thing_classes} and {core.num_stuff_classes} classes"
            )
        self.backbone = backbone
        self.in_features = list(in_features)
        self.core = core
        self.normalize = _Normalize(pixel_mean, pixel_std)
        self.size_divisibility = max(
            size_divisibility, backbone.size_divisibility if backbone is not None else 1
        )
        model_to_dataset = torch.tensor([*thing_ids, *stuff_ids], dtype=torch.long)
        dataset_to_model = torch.full((int(model_to_dataset.max()) + 1,), -1, dtype=torch.long)
        dataset_to_model[model_to_dataset] = torch.arange(len(model_to_dataset))
        self.register_buffer("model_to_dataset", model_to_dataset, persistent=False)
        self.register_buffer("dataset_to_model", dataset_to_model, persistent=False)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        ps = cfg.MODEL.PANOPTIC_SEGFORMER
        processing = _processing_arguments(cfg)  # first: it checks the class counts
        backbone = build_backbone(cfg)
        _check_in_features(ps.IN_FEATURES, backbone)
        shapes = backbone.output_shape()
        core = build_model_from_config(cfg, [shapes[name].channels for name in ps.IN_FEATURES])
        return {"backbone": backbone, "core": core, **processing}

    @classmethod
    def processing_only(cls, cfg, size_divisibility: int = 1) -> "PanopticSegFormer":
        """The pre- and post-processing of :meth:`inference` without the network: no backbone
        and no core model (so no parameters), ``core`` a :class:`CorePostprocessing`; run
        ``inference(batched_inputs, network)`` with a network of one's own (an exported file's).
        The outputs are those of the full meta-architecture of ``cfg`` around that network.

        Args:
            cfg: the config (normalisation, ``INPUT.SIZE_DIVISIBILITY``, class counts and ids,
                ``MODEL.PANOPTIC_SEGFORMER.TEST``); no weights are read.
            size_divisibility: pad to a multiple of this too (the network's, as the backbone's
                is for the full model).
        """
        ps = cfg.MODEL.PANOPTIC_SEGFORMER
        processing = _processing_arguments(cfg)
        processing["size_divisibility"] = max(processing["size_divisibility"], size_divisibility)
        postprocessing = CorePostprocessing(
            ps.NUM_THING_CLASSES, ps.NUM_STUFF_CLASSES, inference_options_from_config(cfg)
        )
        return cls(backbone=None, core=postprocessing, **processing)

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
        post-processing. Images of one size run as one batch; images of different sizes run one
        at a time, so each image's result is the one it gets alone.

        Args:
            batched_inputs: as in :meth:`forward`.
            network: (N, 3, Hp, Wp) normalised padded images and their (N, Hp, Wp) padding
                mask -> the raw outputs of :meth:`network`; an exported copy of the network
                runs here (:mod:`panoptic_segformer.deploy`). None runs this model's own.
        """
        if len({tuple(x["image"].shape[-2:]) for x in batched_inputs}) > 1:
            # Images of different sizes run one at a time, each as it would alone: in a padded
            # batch the padding is masked in every attention, but the backbone's convolutions
            # and the neck's GroupNorm would still see it near the image's border.
            return [r for x in batched_inputs for r in self.inference([x], network)]
        images, padding_mask = self.preprocess_images([x["image"] for x in batched_inputs])
        padded = tuple(images.tensor.shape[-2:])
        run = self.network if network is None else network
        outputs = run(images.tensor, padding_mask)
        output_sizes = [
            (int(x.get("height", h)), int(x.get("width", w)))
            for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        results = self.core.postprocess(outputs, padded, images.image_sizes, output_sizes)
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

        Raises:
            RuntimeError: a :meth:`processing_only` meta-architecture, which has no network.
        """
        if self.backbone is None:
            raise RuntimeError(
                "this meta-architecture holds no network (processing_only): pass one to inference"
            )
        features = self.backbone(images)
        features = [features[name] for name in self.in_features]
        return self.core.forward_features(features, padding_mask, targets)

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
        return self.core.split_targets(labels, padded_masks, (h, w))

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
