#!/usr/bin/env python
"""Panoptic SegFormer on images, a video or a webcam, drawn with detectron2's Visualizer.

Examples:
    python demo/demo.py --config-file configs/r50.yaml --input img.jpg --output out.jpg \
        --opts MODEL.WEIGHTS model.pth
    python demo/demo.py --config-file configs/r50.yaml --input "photos/*.jpg" photos2/ \
        --output drawn/ --opts MODEL.WEIGHTS model.pth
    python demo/demo.py --config-file configs/r50.yaml --video-input in.mp4 --output out.mp4 \
        --opts MODEL.WEIGHTS model.pth
    python demo/demo.py --config-file configs/r50.yaml --webcam --opts MODEL.WEIGHTS model.pth
    python demo/demo.py --exported exported/r50.onnx --input img.jpg --output out.jpg
    python demo/demo.py --exported exported/r50.pt2 --trust-exported-code --input img.jpg

Runs on the GPU when one is visible, else on the CPU (or as MODEL.DEVICE says). Only the
panoptic result is asked of the model (``MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON`` and
``SEMANTIC_ON`` False, before ``--opts``, which may ask for them again).

Channel order: RGB from decoding (``load_image``) to drawing (detectron2's Visualizer); the
predictor converts to the model's ``INPUT.FORMAT`` once. OpenCV's BGR only at the edges: video
and webcam frames in, the window and the written video out.
"""

import argparse
import glob
import logging
import os
import sys
import time
from pathlib import Path
from typing import List

import cv2
import tqdm
from detectron2.utils.logger import setup_logger
from visualization import VisualizationDemo

from panoptic_segformer.d2.config import get_config
from panoptic_segformer.d2.predictor import load_image
from panoptic_segformer.d2.registration import register

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINDOW = "Panoptic SegFormer"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", metavar="FILE", help="config file (optional with --exported)"
    )
    parser.add_argument(
        "--exported",
        metavar="FILE",
        help="run this exported model (.onnx, .ts, .pt2 of tools/deploy/export_model.py); the "
        "config, when given, still sets the test size and thresholds",
    )
    parser.add_argument(
        "--trust-exported-code",
        action="store_true",
        help="allow an --exported .ts or .pt2 file: loading one runs code it holds, so only for "
        "files from a source you trust (.onnx files are data and need no such flag)",
    )
    parser.add_argument("--input", nargs="+", help="images: files, globs ('*.jpg') or directories")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--webcam", action="store_true", help="the webcam (camera 0)")
    parser.add_argument(
        "--output",
        help="where to save: a directory, or a file for one image or a video; shown in a "
        "window when omitted",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="draw only segments and instances scoring at least this",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides: KEY VALUE pairs (after the demo's own: INSTANCE_ON and "
        "SEMANTIC_ON of MODEL.PANOPTIC_SEGFORMER.TEST False)",
    )
    return parser


# what the demo asks of the model, merged before the user's --opts: only the panoptic result
# is drawn, and instance and semantic results would need every query's mask at full size
# (gigabytes for a 48-megapixel photo)
DRAWN_RESULTS = [
    "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON",
    "False",
    "MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON",
    "False",
]


def setup_cfg(args):
    if not args.config_file:  # --exported without a config: the file's own
        return None
    register()
    cfg = get_config(args.config_file, [*DRAWN_RESULTS, *args.opts], cpu_fallback=True)
    cfg.freeze()
    return cfg


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files, glob matches and the images of directories, in order.

    Raises:
        FileNotFoundError: naming a pattern that matches nothing.
    """
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            found = sorted(glob.glob(pattern))
        if not found:
            raise FileNotFoundError(f"--input {pattern!r} matches no image")
        paths.extend(found)
    return paths


def output_path(output: str, image_path: str, many: bool) -> str:
    if many or os.path.isdir(output) or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(image_path))
    return output


def run_images(demo: VisualizationDemo, args, logger: logging.Logger) -> List[str]:
    """Predicts and draws every input image; returns the messages of the ones that failed
    (each was said in one line, and the run went on with the others)."""
    paths = expand_inputs(args.input)
    failed = []
    for path in tqdm.tqdm(paths, disable=len(paths) == 1 or not args.output):
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as e:
            failed.append(str(e))
            tqdm.tqdm.write(f"skipped {e}")
            continue
        start = time.perf_counter()
        predictions, drawing = demo.run_on_image(image)
        found = len(predictions["panoptic_seg"][1]) if "panoptic_seg" in predictions else "-"
        logger.info(f"{path}: {found} segments in {time.perf_counter() - start:.2f} s")
        if args.output:
            drawing.save(output_path(args.output, path, len(paths) > 1))
        else:
            cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW, cv2.cvtColor(drawing.get_image(), cv2.COLOR_RGB2BGR))
            if cv2.waitKey(0) == 27:  # Esc
                break
    return failed


def run_video(demo: VisualizationDemo, args) -> None:
    source = 0 if args.webcam else args.video_input
    video = cv2.VideoCapture(source)
    if not video.isOpened():
        raise FileNotFoundError(f"cannot open {'the webcam' if args.webcam else source!r}")
    writer = None
    if args.output and not args.webcam:
        out = args.output
        if os.path.isdir(out):
            out = os.path.join(out, os.path.splitext(os.path.basename(source))[0] + ".mp4")
        fps = video.get(cv2.CAP_PROP_FPS) or 30.0
        size = (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    try:
        for drawn in tqdm.tqdm(demo.run_on_video(video), total=frames, disable=args.webcam):
            frame = cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)  # OpenCV writes and shows BGR
            if writer is not None:
                writer.write(frame)
            else:
                cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
                cv2.imshow(WINDOW, frame)
                if cv2.waitKey(1) == 27:  # Esc
                    break
    finally:
        video.release()
        if writer is not None:
            writer.release()
        else:  # a window was shown (headless OpenCV builds have no windows to close)
            cv2.destroyAllWindows()


def main(argv=None) -> int:
    """Runs the demo; returns the exit status: 0, 1 when some inputs failed, 2 on a usage
    error (each said in one line, without a traceback)."""
    args = get_parser().parse_args(argv)
    sources = [bool(args.input), bool(args.video_input), args.webcam]
    if sum(sources) != 1:
        print("error: give exactly one of --input, --video-input and --webcam", file=sys.stderr)
        return 2
    if not args.config_file and not args.exported:
        print("error: give --config-file (or --exported)", file=sys.stderr)
        return 2
    if args.config_file and not os.path.isfile(args.config_file):
        print(f"error: --config-file {args.config_file!r}: no such file", file=sys.stderr)
        return 2
    setup_logger(name="fvcore")
    logger = setup_logger()
    logger.info(f"Arguments: {args}")
    try:
        demo = VisualizationDemo(
            setup_cfg(args),
            args.confidence_threshold,
            exported=args.exported,
            trust_exported_code=args.trust_exported_code,
        )
        if not args.input:
            run_video(demo, args)
            return 0
        failed = run_images(demo, args, logger)
    except (FileNotFoundError, ValueError) as e:  # a path or a setting of the user's
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"{len(failed)} input(s) failed:", *failed, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
