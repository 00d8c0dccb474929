#!/usr/bin/env python
"""CPU time of the exported network against eager PyTorch: ONNX Runtime, torch.export,
TorchScript.

Builds the model of --config-file (random weights unless MODEL.WEIGHTS is given), exports it in
each of --formats at the --height x --width input, then times the network (normalised padded
image -> raw outputs, batch 1, no post-processing) over --reps runs after one warm-up, with
--threads CPU threads for PyTorch and ONNX Runtime alike. Eager is the model as the Predictor
runs it (prepare_for_inference: frozen batch norms folded, backbone weights channels-last), and
that model is exported. Prints, per runtime: median ms, the ratio to eager PyTorch, the export
time, the file size and the largest absolute difference of any output to eager on the same
input.

Example (the issue's bar, R50 at 800 x 1333):
    python tools/deploy/benchmark_export.py --config-file configs/r50.yaml --threads 2 \\
        --reps 5 --height 800 --width 1344
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor

from panoptic_segformer.d2.config import get_config
from panoptic_segformer.d2.registration import register
from panoptic_segformer.deploy import (
    EXPORTERS,
    ExportedNetwork,
    export_network,
    max_abs_differences,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default="configs/r50.yaml", metavar="FILE")
    parser.add_argument("--height", type=int, default=800, help="input height (padded up)")
    parser.add_argument("--width", type=int, default=1333, help="input width (padded up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5, help="timed runs per runtime")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["onnx", "torchscript"],
        choices=sorted([*EXPORTERS, ORT_CUSTOM_OP]),
        help=f"{ORT_CUSTOM_OP}: onnx with deformable attention as our ONNX Runtime operator "
        "(needs ORT_INCLUDE_DIR, see panoptic_segformer/deploy/ort_ops.py)",
    )
    parser.add_argument("--output", help="directory for the exported files (default: temporary)")
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


# the --formats entry of an ONNX file with the ONNX Runtime custom operator
ORT_CUSTOM_OP = "onnx_custom_op"
RUNTIME_NAMES = {"onnx": "ONNX Runtime", ORT_CUSTOM_OP: "ORT + custom op"}


def median_ms(run: Callable[[], object], reps: int) -> float:
    """Median wall time of ``run`` in ms over ``reps`` runs, after one warm-up run."""
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def padded_input(height: int, width: int, divisibility: int) -> List[Tensor]:
    """A fixed random normalised image padded up to the divisibility: (1, 3, Hp, Wp) and its
    (1, Hp, Wp) padding mask."""
    hp = -(-height // divisibility) * divisibility
    wp = -(-width // divisibility) * divisibility
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(1, 3, hp, wp)
    images[:, :, :height, :width] = torch.randn(1, 3, height, width, generator=generator)
    padding_mask = torch.ones(1, hp, wp, dtype=torch.bool)
    padding_mask[:, :height, :width] = False
    return [images, padding_mask]


def benchmark(args) -> List[Dict[str, object]]:
    """One row per runtime: name, ms, ratio, export s, MB, max abs difference."""
    from detectron2.modeling import build_model

    from panoptic_segformer.d2.checkpoint import PanopticSegFormerCheckpointer

    torch.set_num_threads(args.threads)
    # random weights unless the overrides name some (the config's are ImageNet backbone ones)
    register()
    cfg = get_config(args.config_file, ["MODEL.WEIGHTS", "", *args.opts])
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        PanopticSegFormerCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    # eager as the Predictor runs it, and what export_model.py exports
    model.prepare_for_inference()
    images, padding_mask = padded_input(args.height, args.width, model.size_divisibility)

    def eager() -> Dict[str, Tensor]:
        with torch.inference_mode():
            return model.network(images, padding_mask)

    expected = eager()
    rows = [{"runtime": "eager PyTorch", "ms": median_ms(eager, args.reps)}]
    folder = args.output or tempfile.mkdtemp(prefix="psf_export_")
    for name in args.formats:
        fmt = "onnx" if name == ORT_CUSTOM_OP else name
        path = os.path.join(folder, f"{Path(args.config_file).stem}_{name}{EXPORTERS[fmt][0]}")
        start = time.perf_counter()
        export_network(
            model,
            images,
            padding_mask,
            fmt,
            path,
            config_text=cfg.dump(),
            ort_custom_op=name == ORT_CUSTOM_OP,
        )
        seconds = time.perf_counter() - start
        # the file this run just wrote
        network = ExportedNetwork(path, threads=args.threads, trust_code=True)
        actual = network(images, padding_mask)
        rows.append(
            {
                "runtime": RUNTIME_NAMES.get(name, name),
                "ms": median_ms(lambda: network(images, padding_mask), args.reps),
                "export_s": seconds,
                "mb": os.path.getsize(path) / 2**20,
                "max_abs_diff": max(max_abs_differences(expected, actual).values()),
            }
        )
    return rows


def print_table(rows: List[Dict[str, object]], args) -> None:
    eager_ms = rows[0]["ms"]
    print(
        f"{Path(args.config_file).stem} at {args.height}x{args.width}, {args.threads} thread(s), "
        f"median of {args.reps}, torch {torch.__version__}"
    )
    print(f"{'runtime':<15} {'ms':>9} {'x eager':>8} {'export s':>9} {'MB':>7} {'max |diff|':>11}")
    for row in rows:
        extra = (
            f"{row['export_s']:>9.1f} {row['mb']:>7.1f} {row['max_abs_diff']:>11.2e}"
            if "export_s" in row
            else f"{'-':>9} {'-':>7} {'-':>11}"
        )
        print(f"{row['runtime']:<15} {row['ms']:>9.1f} {row['ms'] / eager_ms:>8.2f} {extra}")


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    print_table(benchmark(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
