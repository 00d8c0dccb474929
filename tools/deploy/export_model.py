#!/usr/bin/env python
"""Exports Panoptic SegFormer's network to ONNX, TorchScript or a torch.export program.

The exported network maps the normalised, padded image (and its padding mask) to plain tensors
(thing masks, scores, labels, boxes; stuff masks, scores), with dynamic height and width
(multiples of INPUT.SIZE_DIVISIBILITY). The file carries the config and the class names;
``panoptic_segformer.d2.ExportedPredictor`` and ``demo/demo.py --exported FILE`` run it.

Examples:
    python tools/deploy/export_model.py --config-file configs/r50.yaml --format onnx \\
        --sample-image img.jpg --output exported/ MODEL.WEIGHTS model.pth
    python tools/deploy/export_model.py --config-file configs/r50.yaml --format torch_export \\
        --output exported/ --dynamic-batch MODEL.WEIGHTS model.pth
    # deformable attention as our ONNX Runtime operator (needs ONNX Runtime's C header to build
    # it for the check run: ORT_INCLUDE_DIR, see panoptic_segformer/deploy/ort_ops.py)
    python tools/deploy/export_model.py --config-file configs/r50.yaml --format onnx \\
        --ort-custom-op --output exported/ MODEL.WEIGHTS model.pth

After writing the file it prints its size and opset and runs it on the sample, printing the
largest absolute difference to PyTorch for every output.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from panoptic_segformer.d2.class_info import class_info_of_config
from panoptic_segformer.d2.config import get_config
from panoptic_segformer.d2.predictor import Predictor, load_image
from panoptic_segformer.d2.registration import register
from panoptic_segformer.deploy import (
    EXPORTERS,
    ExportedNetwork,
    export_network,
    max_abs_differences,
)
from panoptic_segformer.deploy.export import sample_inputs

logger = logging.getLogger("export_model")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config file")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="export format")
    parser.add_argument(
        "--sample-image",
        help="image to export and check with (resized as at test time); default: a generated "
        "480 x 640 image",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write to")
    parser.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="export for any number of images per call (default: one)",
    )
    parser.add_argument(
        "--ort-custom-op",
        action="store_true",
        help="(onnx) deformable attention as the ONNX Runtime operator "
        "panoptic_segformer::MSDeformAttn (faster; the runtime must register its library) "
        "instead of GridSample ops",
    )
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


def generated_image(height: int = 480, width: int = 640) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 BGR test image: smooth gradients and a few blocks."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (height + width)], 2)
    image[height // 4 : height // 2, width // 4 : width // 2] = (30, 160, 220)
    image[height // 2 :, 2 * width // 3 :] = (200, 40, 90)
    return image.astype(np.uint8)


def export(args) -> dict:
    """Exports and checks; returns what was printed as a dict (path, sizes, differences)."""
    register()
    cfg = get_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    predictor = Predictor(cfg)  # builds the model and loads (and checks) MODEL.WEIGHTS
    class_info = predictor.class_info or class_info_of_config(cfg)
    if args.sample_image:
        images, padding_mask = sample_inputs(predictor, load_image(args.sample_image), "RGB")
    else:
        images, padding_mask = sample_inputs(predictor, generated_image(), "BGR")
    if args.dynamic_batch:  # torch.export specialises a batch of 1: trace with 2
        images, padding_mask = images.repeat(2, 1, 1, 1), padding_mask.repeat(2, 1, 1)

    suffix = EXPORTERS[args.format][0]
    stem = Path(args.config_file).stem
    path = os.path.join(args.output, f"{stem}{suffix}")
    start = time.perf_counter()
    metadata = export_network(
        predictor.model,
        images,
        padding_mask,
        args.format,
        path,
        config_text=cfg.dump(),
        class_info=class_info,
        dynamic_batch=args.dynamic_batch,
        ort_custom_op=args.ort_custom_op,
    )
    seconds = time.perf_counter() - start
    size_mb = os.path.getsize(path) / 2**20
    print(f"wrote {path}: {size_mb:.1f} MB, format {args.format}", end="")
    print(f", ONNX opset {metadata['opset']}" if metadata["opset"] else "", end="")
    print(
        f", custom operators {', '.join(metadata['custom_ops'])}" if metadata["custom_ops"] else "",
        end="",
    )
    batch = metadata["batch"] or "any"
    print(f", batch {batch}, export took {seconds:.1f} s")

    with torch.no_grad():
        expected = predictor.model.network(images, padding_mask)
    # the file just written, so its code is ours
    actual = ExportedNetwork(path, trust_code=True)(images, padding_mask)
    differences = max_abs_differences(expected, actual)
    size = "x".join(str(s) for s in images.shape[-2:])
    print(f"check on the sample ({size} padded): max abs difference to PyTorch")
    for name, value in differences.items():
        print(f"  {name:<13} {value:.3g}")
    return {"path": path, "size_mb": size_mb, "seconds": seconds, "differences": differences}


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not os.path.isfile(args.config_file):
        print(f"error: --config-file {args.config_file!r}: no such file", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    try:
        export(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # a path or setting of the user's
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
