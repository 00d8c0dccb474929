"""detectron2 config keys of Panoptic SegFormer: ``add_panoptic_segformer_config(cfg)``.

Defaults follow the authors' code (mmdet, ``configs/panformer/base.py``), which produced the
published numbers; the paper's variants are switches. Paper references: Sec. = section,
Eq. = equation, Table = ablation table of Li et al., CVPR 2022.
"""

from typing import Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_panoptic_segformer_config", "get_config", "merge_config_file"]


def merge_config_file(cfg: CN, config_file: str) -> None:
    """``cfg.merge_from_file(config_file)`` with the file (and its ``_BASE_`` files) read as
    data: detectron2's default retries a file that ``yaml.safe_load`` refuses with
    ``yaml.unsafe_load``, which runs the code of a ``!!python/object/apply`` tag.

    Raises:
        ValueError: naming the file, when it is not plain YAML data (a Python tag, a syntax
            error; the YAML message says where).
    """
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise ValueError(
            f"{config_file}: refusing a config that is not plain YAML data; Python tags "
            f"(!!python/...) would run code ({e})"
        ) from None
    except yaml.YAMLError as e:
        raise ValueError(f"{config_file}: not a YAML config ({e})") from None


def get_config(config_file: str, opts: Sequence[str] = (), cpu_fallback: bool = False) -> CN:
    """detectron2's default config with Panoptic SegFormer's keys, ``config_file`` merged in as
    data (:func:`merge_config_file`), then the ``KEY VALUE`` overrides ``opts``; not frozen.

    Args:
        cpu_fallback: run on the CPU when MODEL.DEVICE asks for CUDA and none is available.
    """
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    if cpu_fallback and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def add_panoptic_segformer_config(cfg: CN) -> None:
    """Adds the keys of Panoptic SegFormer (``MODEL.PANOPTIC_SEGFORMER``, ``MODEL.TIMM``,
    ``INPUT``, ``SOLVER``, ``TEST.BOUNDARY_PQ``, ``TEST.SUBMISSION_NAME``) to a detectron2
    config, in place. Registers nothing: :func:`panoptic_segformer.d2.register` does."""
    cfg.MODEL.PANOPTIC_SEGFORMER = CN()
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    ps.NUM_THING_CLASSES = 80  # K: classes of the location decoder's thing queries
    ps.NUM_STUFF_CLASSES = 53  # Z: one stuff query per stuff class (Sec. 3.4)
    ps.IN_FEATURES = ["res3", "res4", "res5"]  # C3, C4, C5 at strides 8, 16, 32 (Sec. 3.2)
    ps.HIDDEN_DIM = 256  # C: channels of the neck, encoder and decoders (Sec. 3.2)
    # encoder levels: 4 in the authors' code (a stride-64 level from C5), 3 in the paper's text
    ps.NUM_FEATURE_LEVELS = 4
    ps.NHEADS = 8  # heads of every attention
    ps.N_POINTS = 4  # sampling points per head and level of deformable attention
    ps.DIM_FEEDFORWARD = 1024  # FFN width of the encoder and location decoder
    ps.DROPOUT = 0.1  # of the encoder and location decoder
    ps.ENC_LAYERS = 6  # deformable encoder layers (Sec. 3.2)
    # location decoder layers (Sec. 3.3); Table 6 ablates 0, 1, 2 (0 needs the mask decoder's
    # classes: TEST.THING_CLASSES_FROM "mask_decoder" and THING_CLASS_WEIGHT > 0)
    ps.DEC_LAYERS = 6
    ps.NUM_QUERIES = 300  # N_th: thing queries (Sec. 3.3)
    ps.THING_MASK_LAYERS = 4  # mask decoder, things stack (authors' code; paper D_m = 6)
    ps.STUFF_MASK_LAYERS = 6  # mask decoder, stuff stack (Sec. 3.4)
    ps.MASK_MLP_RATIO = 4.0  # MLP ratio of the mask decoder layers
    ps.BOX_FREE = False  # location decoder predicts mass centres, not boxes (Table 6)
    # Table 8's "joint matching": one set of NUM_QUERIES + NUM_STUFF_CLASSES queries (353 on
    # COCO) classified into things and stuff, no stuff queries, instead of query decoupling.
    # Assumptions the paper does not state: all of them go through the location decoder and the
    # thing stack of the mask decoder; TEST.MAX_DETECTIONS and MAX_SELECTED grow by
    # NUM_STUFF_CLASSES (153 detections, a filter cap of 353).
    ps.JOINT_MATCHING = False
    ps.DEEP_SUPERVISION = True  # losses on every mask decoder layer; False = Fig. 5's "w/o ds"
    # Activation checkpointing (not in the paper, a memory switch): in training, recompute each
    # encoder layer / each mask decoder layer and tail in the backward pass instead of keeping
    # its activations; the same losses and gradients, less memory, more time (measured in the
    # benchmarks, "Training cost against Mask2Former")
    ps.ENCODER_CHECKPOINTING = False
    ps.MASK_DECODER_CHECKPOINTING = False

    # Losses (Sec. 3.5, Eq. 4-5); weights of focal, L1, GIoU and dice
    ps.CLASS_WEIGHT = 2.0
    ps.BBOX_WEIGHT = 5.0
    ps.GIOU_WEIGHT = 2.0
    ps.MASK_WEIGHT = 2.0  # dice
    ps.STUFF_CLASS_FACTOR = 2.0  # extra factor on the stuff queries' focal loss (authors' code)
    ps.THING_CLASS_WEIGHT = 0.0  # thing mask decoder's class loss (0 in the authors' code)
    ps.FOCAL_ALPHA = 0.25
    ps.FOCAL_GAMMA = 2.0
    # The "filter": queries per thing that reach the thing mask decoder, in rounds of Hungarian
    # matching on the location decoder's last-layer costs. 1 as the authors' released code runs
    # (its assigner is configured for 3 rounds but always stops after the first) and as the
    # paper says: exactly the one-to-one matched queries. >1 is the configured intent, a switch
    # (about that many times the thing mask decoder's cost in training).
    ps.MAX_PER_TARGET = 1
    ps.MAX_SELECTED = 300  # and at most this many per image (rounds <= 300 // things)
    # lambda_things / lambda_stuff of Eq. 5: -1 = per batch from the thing and stuff counts
    # (authors' code); set both >= 0 for fixed weights (one alone is an error)
    ps.LAMBDA_THINGS = -1.0
    ps.LAMBDA_STUFF = -1.0

    # Matching costs: location decoder (Hungarian) and mask decoder (filter + one-to-one)
    ps.MATCHER = CN()
    ps.MATCHER.CLASS_COST = 2.0
    ps.MATCHER.BBOX_COST = 5.0
    ps.MATCHER.GIOU_COST = 2.0
    ps.MASK_MATCHER = CN()
    ps.MASK_MATCHER.CLASS_COST = 4.0
    ps.MASK_MATCHER.BBOX_COST = 5.0
    ps.MASK_MATCHER.GIOU_COST = 2.0
    ps.MASK_MATCHER.DICE_COST = 2.0

    # Inference
    ps.TEST = CN()
    ps.TEST.PANOPTIC_ON = True  # "panoptic_seg" results
    # "instances" results (thing masks, boxes, scores, classes): off, as in the core (panoptic
    # results only, the authors' evaluation: PQ); they need every kept query's mask at full size
    ps.TEST.INSTANCE_ON = False
    ps.TEST.SEMANTIC_ON = False  # "sem_seg" results (needs every mask at full size)
    ps.TEST.MAX_DETECTIONS = 100  # thing queries kept: top scores over queries x classes
    ps.TEST.MASK_DECODER_LAYERS = 0  # early exit after this many layers, 0 = all (Table 10)
    ps.TEST.MERGE = "mask_wise"  # or "pixel_argmax" (Table 7)
    # Table 7: pixel_argmax of the mask values m, "(p)", the paper's Panoptic SegFormer row;
    # True: of the class-weighted mask values p * m, "(p*)" (the paper's MaskFormer row)
    ps.TEST.PIXEL_ARGMAX_CLASS_WEIGHTED = False
    # Sec. 3.3.3: thing classes from "location_decoder" (authors' code) or "mask_decoder" (its
    # class heads; they need THING_CLASS_WEIGHT > 0)
    ps.TEST.THING_CLASSES_FROM = "location_decoder"
    ps.TEST.ALPHA = 1.0  # Eq. 6: confidence = p^alpha * mask score^beta
    ps.TEST.BETA = 2.0
    ps.TEST.THING_SCORE_THRESHOLD = 0.25  # Algorithm 1 (Swin-L, PVTv2-B5: 0.3)
    ps.TEST.STUFF_SCORE_THRESHOLD = 0.25
    ps.TEST.THING_OVERLAP_THRESHOLD = 0.4  # 1 - t_keep for things
    ps.TEST.STUFF_OVERLAP_THRESHOLD = 0.2  # 1 - t_keep for stuff
    ps.TEST.MASK_THRESHOLD = 0.5  # binarisation of the (ReLU) mask values
    ps.TEST.PIXEL_SCORE_THRESHOLD = 0.25  # score threshold of MERGE = "pixel_argmax"

    # <alg> of the COCO panoptic submission written for a dataset without ground truth
    # (coco_2017_test-dev_panoptic): panoptic_test-dev2017_<alg>_results.zip
    cfg.TEST.SUBMISSION_NAME = "PanopticSegFormer"

    # timm backbones (Swin-L, PVTv2-B5) behind MODEL.BACKBONE.NAME = "D2TimmBackbone"
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "swin_large"  # "swin_large", "swin_large_w12" or "pvt_v2_b5"
    cfg.MODEL.TIMM.PRETRAINED = ""  # local ImageNet checkpoint; nothing is downloaded
    cfg.MODEL.TIMM.DROP_PATH_RATE = -1.0  # negative: the authors' (Swin-L 0.3, PVTv2-B5 0.1)
    cfg.MODEL.TIMM.OUT_FEATURES = ["res3", "res4", "res5"]

    # Data (detectron2's INPUT.* keys are used as usual; these add the authors' recipe)
    cfg.INPUT.AUGMENTATION = "detr"  # the authors' (DETR's); or "lsj", large-scale jitter
    # deprecated: "panoptic_segformer" / "panoptic_segformer_lsj" (INPUT.AUGMENTATION "detr" /
    # "lsj"), read with a warning for one release
    cfg.INPUT.DATASET_MAPPER_NAME = ""
    # DETR crop branch (INPUT.CROP.ENABLED, TYPE "absolute_range", SIZE [384, 600]): with
    # probability 0.5 resize the short side to one of these first, then crop, then resize
    cfg.INPUT.CROP.PRE_RESIZE_MIN_SIZES = [400, 500, 600]
    cfg.INPUT.CROP.PRE_RESIZE_MAX_SIZE = 4200
    # large-scale jitter (AUGMENTATION "lsj")
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Pad a batch's sides to a multiple of this. 1, as the authors (size_divisor=1 in training
    # and test): a single image is never padded, so it goes through their function; a batch of
    # several pads to its largest image, and the padding is masked in every attention.
    cfg.INPUT.SIZE_DIVISIBILITY = 1

    # Optimisation (AdamW; lr x BACKBONE_MULTIPLIER for the backbone, the sampling offsets and
    # the reference points; clip the gradient norm of the full model)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.LR_MULTIPLIER_KEYS = ["sampling_offsets", "reference_points"]

    # Evaluation: also report Boundary PQ (Cheng et al., CVPR 2021; Table 7) beside PQ
    cfg.TEST.BOUNDARY_PQ = False
