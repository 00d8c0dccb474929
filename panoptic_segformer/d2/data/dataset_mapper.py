"""Dataset mapper: COCO-panoptic dicts to images and per-segment mask targets.

The training augmentation follows the authors' recipe, which is DETR's: a random horizontal flip,
then with probability 0.5 a resize, random crop and resize branch, and always a multi-scale resize
of the short side (``INPUT.AUGMENTATION "detr"``). Large-scale jitter (``INPUT.AUGMENTATION
"lsj"``) is offered as an alternative.

Shape shorthand: H, W image size after augmentation, T segments kept as targets.
"""

import copy
import logging
import warnings
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from panoptic_segformer.d2.data.coco_panoptic import rgb_to_segment_ids

__all__ = ["PanopticSegFormerDatasetMapper", "build_augmentations"]

logger = logging.getLogger(__name__)

# Keys that carry annotations; none of them is needed at inference.
_ANNOTATION_KEYS = ("pan_seg_file_name", "segments_info", "sem_seg_file_name", "annotations")


def _flip_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """The random flip of ``INPUT.RANDOM_FLIP`` ("horizontal", "vertical" or "none")."""
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    return [
        T.RandomFlip(
            horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
            vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
        )
    ]


def _build_detr_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """Flip, optional crop branch with probability 0.5, multi-scale resize (authors' recipe)."""
    augmentations = _flip_augmentations(cfg)
    if cfg.INPUT.CROP.ENABLED:
        # DETR's "RandomSelect": both branches end with the same multi-scale resize, so the
        # 50% choice reduces to applying the pre-resize and crop with probability 0.5.
        crop_branch = T.AugmentationList(
            [
                T.ResizeShortestEdge(
                    cfg.INPUT.CROP.PRE_RESIZE_MIN_SIZES,
                    cfg.INPUT.CROP.PRE_RESIZE_MAX_SIZE,
                    sample_style="choice",
                ),
                T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
            ]
        )
        augmentations.append(T.RandomApply(crop_branch, prob=0.5))
    augmentations.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augmentations


def _build_lsj_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """Flip, large-scale jitter resize, fixed-size crop (padded with void)."""
    size = cfg.INPUT.IMAGE_SIZE
    return _flip_augmentations(cfg) + [
        T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size),
        # Pad the panoptic PNG with 0, i.e. void, rather than detectron2's default 255.
        T.FixedSizeCrop((size, size), seg_pad_value=0),
    ]


_TRAIN_AUGMENTATION_BUILDERS: Dict[str, Callable[[CfgNode], List[T.Augmentation]]] = {
    "detr": _build_detr_augmentations,
    "lsj": _build_lsj_augmentations,
}
# the values of INPUT.DATASET_MAPPER_NAME, the key INPUT.AUGMENTATION replaces (kept for one
# release, with a warning)
_DEPRECATED_MAPPER_NAMES = {"panoptic_segformer": "detr", "panoptic_segformer_lsj": "lsj"}
_DEFAULT_AUGMENTATION = "detr"


def augmentation_name(cfg: CfgNode) -> str:
    """The training augmentation ``INPUT.AUGMENTATION`` names ("detr" or "lsj"); a config that
    still sets the deprecated ``INPUT.DATASET_MAPPER_NAME`` gets its value, with a warning that
    names the new key.

    Raises:
        ValueError: an unknown name, or both keys set to different augmentations.
    """
    name = cfg.INPUT.AUGMENTATION
    old = cfg.INPUT.get("DATASET_MAPPER_NAME", "")
    if old:
        if old not in _DEPRECATED_MAPPER_NAMES:
            raise ValueError(
                f"Unknown INPUT.DATASET_MAPPER_NAME {old!r} (deprecated: use INPUT.AUGMENTATION, "
                f"one of {sorted(_TRAIN_AUGMENTATION_BUILDERS)})"
            )
        renamed = _DEPRECATED_MAPPER_NAMES[old]
        if name not in (renamed, _DEFAULT_AUGMENTATION):
            raise ValueError(
                f"INPUT.DATASET_MAPPER_NAME {old!r} (deprecated) and INPUT.AUGMENTATION {name!r} "
                "ask for different augmentations: set INPUT.AUGMENTATION alone"
            )
        warnings.warn(
            f"INPUT.DATASET_MAPPER_NAME is deprecated and will be removed: use INPUT.AUGMENTATION "
            f"{renamed!r} instead of INPUT.DATASET_MAPPER_NAME {old!r}",
            FutureWarning,
            stacklevel=2,
        )
        name = renamed
    if name not in _TRAIN_AUGMENTATION_BUILDERS:
        raise ValueError(
            f"Unknown INPUT.AUGMENTATION {name!r}; expected one of "
            f"{sorted(_TRAIN_AUGMENTATION_BUILDERS)}."
        )
    return name


def build_augmentations(cfg: CfgNode, is_train: bool) -> List[T.Augmentation]:
    """Builds the augmentations selected by ``INPUT.AUGMENTATION`` (:func:`augmentation_name`).

    Args:
        cfg: a config with the keys of ``add_panoptic_segformer_config``.
        is_train: training augmentations if True, else the test-time resize
            (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``).

    Returns:
        The augmentations, to be applied in order.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    return _TRAIN_AUGMENTATION_BUILDERS[augmentation_name(cfg)](cfg)


class PanopticSegFormerDatasetMapper:
    """Maps a dataset dict in detectron2's standard COCO-panoptic format to model inputs.

    The input dict has ``file_name``, ``image_id``, optionally ``height`` and ``width``, and for
    training ``pan_seg_file_name`` and ``segments_info`` (each with ``id``, contiguous
    ``category_id``, ``iscrowd`` and ``isthing``), e.g. detectron2's ``coco_2017_train_panoptic``.

    The output dict keeps ``file_name``, ``image_id``, ``height`` and ``width`` and adds
    ``image`` ((3, H, W) uint8 tensor in the configured format). In training it also has
    ``instances``: an ``Instances`` of the augmented image size with ``gt_classes`` (T,) int64,
    ``gt_masks`` ``BitMasks`` (T, H, W) and ``gt_boxes`` ``Boxes`` (T, 4) XYXY enclosing the masks.
    Crowd segments are dropped, as in the authors' code, where they only reach the ignored boxes
    that the DETR-style head never reads; so are segments whose mask the augmentation emptied.
    At inference the annotation keys are dropped.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[Union[T.Augmentation, T.Transform]],
        image_format: str,
        num_classes: Optional[int] = None,
        thing_ids: Optional[Collection[int]] = None,
    ) -> None:
        """
        Args:
            is_train: whether to build training targets; if False, annotations are dropped.
            augmentations: applied in order to the image and the panoptic PNG.
            image_format: ``INPUT.FORMAT``, e.g. "RGB" or "BGR".
            num_classes: if given, every contiguous ``category_id`` must lie in
                ``[0, num_classes)``.
            thing_ids: if given, the contiguous ids of thing categories; a segment's ``isthing``
                flag must agree with it.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.thing_ids = None if thing_ids is None else frozenset(thing_ids)
        mode = "training" if is_train else "inference"
        logger.info(f"[PanopticSegFormerDatasetMapper] augmentations in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> Dict[str, Any]:
        """Reads ``INPUT.*`` and, for training, the metadata of ``DATASETS.TRAIN[0]``.

        The class count is ``len(stuff_classes)`` of that metadata (detectron2's "standard"
        panoptic metadata lists every category among the stuff classes), the thing ids are the
        values of its ``thing_dataset_id_to_contiguous_id``.
        """
        num_classes, thing_ids = None, None
        if is_train and len(cfg.DATASETS.TRAIN) > 0:
            meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
            stuff_classes = meta.get("stuff_classes", None)
            num_classes = None if stuff_classes is None else len(stuff_classes)
            thing_map = meta.get("thing_dataset_id_to_contiguous_id", None)
            thing_ids = None if thing_map is None else list(thing_map.values())
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": num_classes,
            "thing_ids": thing_ids,
        }

    def _check_segments(self, dataset_dict: Dict[str, Any], segment_ids: np.ndarray) -> None:
        """Raises ValueError for PNG ids without a segment, segments without pixels and invalid
        categories."""
        png = dataset_dict["pan_seg_file_name"]
        known = {seg["id"] for seg in dataset_dict["segments_info"]}
        present = np.unique(segment_ids).tolist()
        for segment_id in present:
            if segment_id != 0 and segment_id not in known:
                raise ValueError(
                    f"Panoptic PNG {png} contains segment id {segment_id}, "
                    f"which is not in its segments_info."
                )
        missing = sorted(known - set(present))
        if missing:  # panopticapi rejects such ground truth too
            raise ValueError(
                f"segments_info of {png} lists segment id {missing[0]}, which has no pixel in "
                f"the PNG" + (f" ({len(missing)} such ids)" if len(missing) > 1 else "") + "."
            )
        for seg in dataset_dict["segments_info"]:
            category = seg["category_id"]
            if self.num_classes is not None and not 0 <= category < self.num_classes:
                raise ValueError(
                    f"Segment id {seg['id']} of {png} has category_id {category}, outside "
                    f"[0, {self.num_classes}) of the dataset metadata."
                )
            if self.thing_ids is not None and "isthing" in seg:
                if bool(seg["isthing"]) != (category in self.thing_ids):
                    raise ValueError(
                        f"Segment id {seg['id']} of {png} has isthing={seg['isthing']}, but "
                        f"category_id {category} is "
                        f"{'a thing' if category in self.thing_ids else 'stuff'} in the metadata."
                    )

    def _read_panoptic_png(self, dataset_dict: Dict[str, Any]) -> np.ndarray:
        """Reads the panoptic PNG as (H, W, 3) uint8 RGB, or raises FileNotFoundError."""
        png = dataset_dict["pan_seg_file_name"]
        try:
            return utils.read_image(png, format="RGB")
        except OSError as error:  # missing file, or not a readable image
            raise FileNotFoundError(f"Cannot read panoptic PNG {png}: {error}") from error

    def _build_instances(
        self, segments_info: List[Dict[str, Any]], segment_ids: np.ndarray
    ) -> Instances:
        """Targets from the augmented (H, W) segment ids; crowd and emptied segments dropped."""
        height, width = segment_ids.shape
        classes, masks = [], []
        for seg in segments_info:
            if seg.get("iscrowd", 0):
                continue
            mask = segment_ids == seg["id"]
            if mask.any():
                classes.append(seg["category_id"])
                masks.append(mask)
        instances = Instances((height, width))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if masks:
            mask_tensor = torch.from_numpy(np.stack(masks))  # (T, H, W) bool
        else:
            mask_tensor = torch.zeros((0, height, width), dtype=torch.bool)
        instances.gt_masks = BitMasks(mask_tensor)
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        return instances

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """
        Args:
            dataset_dict: one dataset dict (not modified).

        Returns:
            The mapped dict described in the class docstring.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        if not self.is_train:
            for key in _ANNOTATION_KEYS:
                dataset_dict.pop(key, None)
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            dataset_dict["image"] = self._to_tensor(aug_input.image)
            return dataset_dict

        panoptic = self._read_panoptic_png(dataset_dict)
        if panoptic.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"Panoptic PNG {dataset_dict['pan_seg_file_name']} has size {panoptic.shape[:2]}, "
                f"but image {dataset_dict['file_name']} has size {image.shape[:2]}."
            )
        self._check_segments(dataset_dict, rgb_to_segment_ids(panoptic))

        # The PNG travels as the "sem_seg" of the augmentation input, so that it is resized
        # with nearest neighbours and never mixes two segment colours.
        aug_input = T.AugInput(image, sem_seg=panoptic)
        self.augmentations(aug_input)
        dataset_dict["image"] = self._to_tensor(aug_input.image)
        segment_ids = rgb_to_segment_ids(aug_input.sem_seg)  # (H, W)
        dataset_dict["instances"] = self._build_instances(
            dataset_dict["segments_info"], segment_ids
        )
        return dataset_dict

    @staticmethod
    def _to_tensor(image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) array to a (3, H, W) tensor."""
        return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
