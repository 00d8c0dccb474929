#!/usr/bin/env python
"""Robustness to common corruptions: PQ on corrupted validation images (paper Table 11).

The COCO-C protocol (Michaelis et al., 2019, as used in Table 11 of the paper): 16 corruptions
of the ``imagecorruptions`` package at 5 severities, applied to the original image as loaded,
before the test-time resize; the paper evaluates 2000 val images. Nothing is written to the
dataset: each image is corrupted on the fly in the dataset mapper, with numpy's global generator
(the one the library draws from) seeded from (image id, corruption, severity), so every run
sees the same corrupted images. The model is evaluated on the clean images, then once per
(corruption, severity), by detectron2's ``inference_on_dataset`` and ``COCOPanopticEvaluator``
(panoptic results only: INSTANCE_ON and SEMANTIC_ON are switched off).

Printed: one table in the layout of Table 11 (clean PQ, the mean PQ over the corruptions, then
each corruption's PQ averaged over the severities). Written to ``--output``/robustness.json
after every evaluation: all panoptic metrics of the clean run and of every (corruption,
severity), their means over severities and over corruptions, and the relative PQ under
corruption (rPC of Michaelis et al.: mean PQ / clean PQ, in %).

An empty MODEL.WEIGHTS evaluates the untrained model, with a warning (as the demo's predictor
does); a backbone-only checkpoint (the configs' ImageNet default) is not trained weights either,
so pass MODEL.WEIGHTS of a trained model.

Examples:
    pip install imagecorruptions  # or: pip install -e .[robustness]
    python tools/eval_robustness.py --config-file configs/r50.yaml --num-images 2000 \
        --output output/robustness_r50 MODEL.WEIGHTS model.pth
    python tools/eval_robustness.py --config-file configs/r50.yaml --num-gpus 8 \
        --corruptions fog snow --severities 1 3 5 MODEL.WEIGHTS model.pth
"""

import argparse
import functools
import importlib
import inspect
import json
import logging
import os
import sys
import types
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.engine import default_setup
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch import nn
from tqdm import tqdm

from panoptic_segformer import PanopticSegFormerCheckpointer
from panoptic_segformer.d2.config import get_config
from panoptic_segformer.d2.data import (
    PanopticSegFormerDatasetMapper,
    build_augmentations,
    register_subset,
)
from panoptic_segformer.d2.engine.launch import launch
from panoptic_segformer.d2.evaluation import check_panoptic_dataset
from panoptic_segformer.d2.registration import register

logger = logging.getLogger("detectron2.eval_robustness")

PIP_PACKAGE = "imagecorruptions"
# Table 11's corruptions, in its column order: blur, noise, digital, weather.
PAPER_CORRUPTIONS = (
    "motion_blur", "defocus_blur", "glass_blur", "gaussian_blur",
    "gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise",
    "brightness", "contrast", "saturate", "jpeg_compression",
    "snow", "spatter", "fog", "frost",
)  # fmt: skip
SEVERITIES = (1, 2, 3, 4, 5)
CLEAN = "clean"
RESULTS_FILE = "robustness.json"


class _NumpyWithFloatAlias(types.ModuleType):
    """numpy plus ``float_``, the alias of float64 that NumPy 2.0 removed (the fog corruption
    still uses it)."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _make_compatible(corruptions: types.ModuleType) -> None:
    """Adapts imagecorruptions 1.1.2 (2020) to NumPy >= 2 and scikit-image >= 0.19, inside its
    own module only: ``np.float_`` (fog) and ``gaussian(..., multichannel=True)`` (gaussian_blur,
    glass_blur; scikit-image now says ``channel_axis=-1``). Each is patched only when missing."""
    if not hasattr(corruptions.np, "float_"):
        corruptions.np = _NumpyWithFloatAlias("numpy")
    gaussian = corruptions.gaussian
    if "multichannel" not in inspect.signature(gaussian).parameters:

        def gaussian_with_multichannel(image, *args, multichannel=False, **kwargs):
            if multichannel:
                kwargs["channel_axis"] = -1
            return gaussian(image, *args, **kwargs)

        corruptions.gaussian = gaussian_with_multichannel


@functools.lru_cache(maxsize=None)
def load_corruption_library() -> Tuple[Callable[..., np.ndarray], Tuple[str, ...]]:
    """Imports imagecorruptions (made compatible, see :func:`_make_compatible`).

    Returns:
        Its ``corrupt`` function and the names of all its corruptions.

    Raises:
        ImportError: naming the pip package when it is not installed.
    """
    try:
        with warnings.catch_warnings():
            # it reads its frost images through setuptools' deprecated pkg_resources
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            library = importlib.import_module(PIP_PACKAGE)
    except ModuleNotFoundError as error:
        if error.name != PIP_PACKAGE:
            raise ImportError(
                f"{PIP_PACKAGE} is installed but cannot be imported: {error}"
            ) from error
        raise ImportError(
            f"the corruptions come from the {PIP_PACKAGE} package: pip install {PIP_PACKAGE} "
            "(or pip install -e .[robustness])"
        ) from error
    _make_compatible(importlib.import_module(f"{PIP_PACKAGE}.corruptions"))
    return library.corrupt, tuple(library.get_corruption_names("all"))


def check_settings(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """Raises ValueError for a corruption the library lacks, a severity outside 1..5, or
    neither corruption nor severity."""
    if not corruptions or not severities:
        raise ValueError("give at least one corruption and one severity")
    valid = load_corruption_library()[1]
    unknown = [name for name in corruptions if name not in valid]
    if unknown:
        raise ValueError(
            f"unknown corruption(s) {', '.join(map(repr, unknown))}; the valid ones are "
            f"{', '.join(valid)} (Table 11 uses {', '.join(PAPER_CORRUPTIONS)})"
        )
    bad = [severity for severity in severities if severity not in SEVERITIES]
    if bad:
        raise ValueError(f"severities must lie in 1..5, got {', '.join(map(str, bad))}")


def corruption_seed(image_id: Any, corruption: str, severity: int) -> int:
    """A 32-bit seed that is the same in every process and run (unlike ``hash`` of a str)."""
    return zlib.crc32(f"{image_id}/{corruption}/{severity}".encode())


class ImageCorruption(T.Transform):
    """Corrupts an (H, W, 3) uint8 image in ``image_format`` (RGB or BGR) with imagecorruptions,
    which takes RGB. Draws from numpy's global generator; geometry is left unchanged."""

    def __init__(self, corruption: str, severity: int, image_format: str) -> None:
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR to corrupt, got {image_format!r}")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        corrupt = load_corruption_library()[0]
        rgb = img if self.image_format == "RGB" else img[:, :, ::-1]
        out = corrupt(
            np.ascontiguousarray(rgb), severity=self.severity, corruption_name=self.corruption
        )
        return out if self.image_format == "RGB" else out[:, :, ::-1]

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class CorruptedMapper:
    """The test-time :class:`PanopticSegFormerDatasetMapper` with the image corrupted right after
    it is read, before the test-time resize, reproducibly: numpy's global generator is seeded
    from (image id, corruption, severity) for the call, and restored after it. Nothing in the
    mapper draws from it before the corruption."""

    def __init__(self, cfg: CfgNode, corruption: str, severity: int) -> None:
        self.corruption = corruption
        self.severity = severity
        corrupt = ImageCorruption(corruption, severity, cfg.INPUT.FORMAT)
        self.mapper = PanopticSegFormerDatasetMapper(
            is_train=False,
            augmentations=[corrupt, *build_augmentations(cfg, is_train=False)],
            image_format=cfg.INPUT.FORMAT,
        )

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """Maps one dataset dict as the test-time mapper does (see its docstring)."""
        state = np.random.get_state()
        np.random.seed(corruption_seed(dataset_dict["image_id"], self.corruption, self.severity))
        try:
            return self.mapper(dataset_dict)
        finally:
            np.random.set_state(state)


def _mean(results: Sequence[Dict[str, float]]) -> Dict[str, float]:
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def summarize(
    clean: Dict[str, float], corrupted: Dict[str, Dict[int, Dict[str, float]]]
) -> Dict[str, Any]:
    """Means over severities and corruptions of the panoptic metrics (PQ, SQ, RQ, ...).

    Args:
        clean: the metrics on the clean images.
        corrupted: corruption name -> severity -> metrics.

    Returns:
        ``clean``; ``corruptions``: name -> {``mean``: over its severities, ``severities``:
        str(severity) -> metrics}; ``mean``: the mean over corruptions of their means; and
        ``relative_PQ``: 100 * mean PQ / clean PQ (rPC; None where the clean PQ is 0). The last
        two only once ``corrupted`` has results.
    """
    summary: Dict[str, Any] = {CLEAN: clean, "corruptions": {}}
    for name, by_severity in corrupted.items():
        summary["corruptions"][name] = {
            "mean": _mean(list(by_severity.values())),
            "severities": {str(s): metrics for s, metrics in by_severity.items()},
        }
    if corrupted:
        summary["mean"] = _mean([c["mean"] for c in summary["corruptions"].values()])
        summary["relative_PQ"] = (
            100.0 * summary["mean"]["PQ"] / clean["PQ"] if clean["PQ"] else None
        )
    return summary


def format_table(summary: Dict[str, Any]) -> str:
    """PQ in the layout of Table 11: clean, mean over corruptions, each corruption (mean over
    severities)."""
    columns = {CLEAN: summary[CLEAN]["PQ"], "mean": summary["mean"]["PQ"]}
    columns.update({name: c["mean"]["PQ"] for name, c in summary["corruptions"].items()})
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    row = "| " + " | ".join(f"{value:.1f}" for value in columns.values()) + " |"
    return "\n".join([header, rule, row])


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Trailing KEY VALUE pairs override the config, e.g. MODEL.WEIGHTS model.pth.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--num-images", type=int, default=2000, help="images of DATASETS.TEST[0] (paper: 2000)"
    )
    parser.add_argument(
        "--subset-seed",
        type=int,
        default=None,
        help="draw the images at random with this seed (default: the first --num-images)",
    )
    parser.add_argument(
        "--corruptions", nargs="+", default=list(PAPER_CORRUPTIONS), help="default: Table 11's 16"
    )
    parser.add_argument("--severities", nargs="+", default=[str(s) for s in SEVERITIES])
    parser.add_argument(
        "--output", default="output/robustness", help=f"folder of {RESULTS_FILE} and the logs"
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="'auto' on a single machine")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line; ``severities`` become ints.

    A list option given last (``--corruptions fog snow MODEL.WEIGHTS model.pth``) swallows the
    config overrides after it; they are given back to ``opts`` from its first item with a
    capital letter (config keys are upper case, corruption names and severities are not).
    """
    parser = get_parser()
    args = parser.parse_args(argv)
    for name in ("corruptions", "severities"):
        items = getattr(args, name)
        split = next((i for i, item in enumerate(items) if item != item.lower()), len(items))
        setattr(args, name, items[:split])
        args.opts = items[split:] + args.opts
    try:
        args.severities = [int(severity) for severity in args.severities]
    except ValueError:
        parser.error(f"--severities takes integers in 1..5, got {' '.join(args.severities)}")
    return args


def setup(args: argparse.Namespace) -> CfgNode:
    """The config of the command line, evaluating panoptic results only, logging to --output."""
    register()
    cfg = get_config(args.config_file, args.opts)
    test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON = True, False, False
    cfg.OUTPUT_DIR = args.output
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def load_model(cfg: CfgNode) -> nn.Module:
    """The model of ``cfg`` with MODEL.WEIGHTS loaded (warned about when empty), prepared for
    inference."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        PanopticSegFormerCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: evaluating an untrained model")
    return model.prepare_for_inference()


def evaluate(
    cfg: CfgNode,
    model: nn.Module,
    images: List[Dict[str, Any]],
    dataset_name: str,
    corruption: Optional[str] = None,
    severity: Optional[int] = None,
) -> Dict[str, float]:
    """The panoptic metrics of ``model`` on ``images``, corrupted unless ``corruption`` is None
    (empty on other processes than the main one)."""
    if corruption is None:
        mapper = PanopticSegFormerDatasetMapper(cfg, False)
    else:
        mapper = CorruptedMapper(cfg, corruption, severity)
    loader = build_detection_test_loader(
        images, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
    )
    results = inference_on_dataset(model, loader, COCOPanopticEvaluator(dataset_name))
    return results.get("panoptic_seg", {})


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluates clean and corrupted images; returns the summary (empty on other processes)."""
    corruptions = list(dict.fromkeys(args.corruptions))
    severities = list(dict.fromkeys(args.severities))
    check_settings(corruptions, severities)
    cfg = setup(args)
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the dataset to evaluate")
    dataset_name = cfg.DATASETS.TEST[0]
    check_panoptic_dataset(dataset_name)
    # panopticapi scores every image of its json: the subset gets its own
    subset_name = register_subset(dataset_name, args.num_images, cfg.OUTPUT_DIR, args.subset_seed)
    images = DatasetCatalog.get(subset_name)
    model = load_model(cfg)
    results_file = os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE)

    settings = [(None, None)] + [(c, s) for c in corruptions for s in severities]
    clean: Dict[str, float] = {}
    corrupted: Dict[str, Dict[int, Dict[str, float]]] = {}
    summary: Dict[str, Any] = {}
    progress = tqdm(settings, desc="robustness", disable=not comm.is_main_process())
    for corruption, severity in progress:
        progress.set_postfix_str(f"{corruption} {severity}" if corruption else CLEAN)
        metrics = evaluate(cfg, model, images, subset_name, corruption, severity)
        if not comm.is_main_process():
            continue
        if corruption is None:
            clean = metrics
        else:
            corrupted.setdefault(corruption, {})[severity] = metrics
        summary = {
            "config_file": args.config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "dataset": dataset_name,
            "num_images": len(images),
            "subset_seed": args.subset_seed,
            "complete": sum(map(len, corrupted.values())) == len(settings) - 1,
            **summarize(clean, corrupted),
            "image_ids": [d["image_id"] for d in images],
        }
        with open(results_file, "w") as f:  # after every evaluation: a long run keeps its part
            json.dump(summary, f, indent=1)
    if comm.is_main_process():
        print(format_table(summary))
        print(f"all results: {results_file}")
    return summary


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    # spawned for --num-gpus, or the processes torchrun started; the backend of MODEL.DEVICE
    launch(main, args, get_config(args.config_file, args.opts).MODEL.DEVICE)
