#!/usr/bin/env python
"""Per-stage inference time and memory of Panoptic SegFormer (parameters and FLOPs against the
paper's Table 1: tools/analyze_model.py).

The model is built untrained, inference-only (no criterion), and run on one random image of
--height x --width (default 800x1333, the paper's test size), batch 1, no padding.

Stage table, for two runs of the same model: keeping the authors' 100 thing queries (100 + 53
stuff = 153 masks) and keeping 300 (353 masks); the stages are the backbone, neck + encoder
(ChannelMapper, deformable encoder), location decoder and mask decoder (thing and stuff stacks):
  ms      median wall time over --reps runs after --warmup, under torch.inference_mode; stages
          are split by forward hooks at the end of the backbone, encoder and location decoder
          (neck + encoder also holds the position encoding and flattening; mask decoder also
          the top-k selection of thing queries); on CUDA every boundary synchronises.
  %       share of the stage in the total, post-processing included.
The model is timed as users run it, prepared for inference (``prepare_for_inference``: the
backbone's frozen batch norms folded into its convolutions, its weights channels-last);
--preparations instead times the whole network (153 masks) as built, with each preparation alone,
with both, and with both under ``torch.compile`` (--compile; its first call, the compilation,
reported as start-up time), each on a copy of the same model.
Post-processing (``PanopticSegFormerCore.postprocess`` with --result-types, by default panoptic
results only, as the model, at the input size) runs on outputs of the model's shapes in which
every query passes the merging's score and area tests (scores 1, mask values uniform in [0, 1]):
an untrained model's scores (about 0.01, the focal prior) would let no query reach the merging
and understate its cost. The last line checks the bar: post-processing of 353 queries under 10 %
of the inference time (the stage table's total, post-processing included, same run); the share
of the network alone (backbone to mask decoder) is printed beside it.

Examples:
  python tools/benchmark_model.py                        # R50 on the CPU, 800x1333
  python tools/benchmark_model.py --result-types panoptic_seg instances sem_seg  # all results
  python tools/benchmark_model.py --device cuda --reps 20 --warmup 5 --json r50.json
  python tools/benchmark_model.py --device cuda --autocast float16   # mixed precision
  python tools/benchmark_model.py --preparations --compile   # folding, channels-last, compile
"""

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from panoptic_segformer.modeling.complexity import (
    PAPER_TABLE1,
    PARTS,
    build_core_model,
    print_markdown,
)
from panoptic_segformer.modeling.inference import InferenceOptions
from panoptic_segformer.modeling.inference_preparation import (
    fold_frozen_batchnorm,
    store_channels_last,
)
from panoptic_segformer.modeling.panoptic_segformer import PanopticSegFormerCore
from panoptic_segformer.modeling.postprocessing import RESULT_TYPES

STAGES = list(PARTS)
POSTPROCESS = "post-processing"
# thing queries kept at inference: the authors' 100, and 300 for the 353-query acceptance bar
DETECTIONS = (100, 300)
POSTPROCESS_BAR = 10.0  # % of the model's inference time that post-processing may take


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_forward(
    model: PanopticSegFormerCore, images: Tensor, mask: Tensor, device: str
) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
    """One forward; milliseconds per stage, split where the hooked modules return."""
    marks = [_now(device)]
    hooks = [
        module.register_forward_hook(lambda *_: marks.append(_now(device)))
        for module in (model.backbone, model.encoder, model.location_decoder)
    ]
    try:
        outputs = model(images, mask)
        marks.append(_now(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {s: (b - a) * 1e3 for s, a, b in zip(STAGES, marks, marks[1:])}, outputs


def dense_outputs(outputs: Dict[str, Tensor], seed: int = 0) -> Dict[str, Tensor]:
    """Outputs of the same shapes in which every query passes the merging's score and area tests."""
    g = torch.Generator().manual_seed(seed)
    dense = dict(outputs)
    for key in ("thing_masks", "stuff_masks"):
        dense[key] = torch.rand(outputs[key].shape, generator=g).to(outputs[key])
    for key in ("thing_scores", "stuff_scores"):
        dense[key] = torch.ones_like(outputs[key])
    return dense


def time_stages(
    model: PanopticSegFormerCore,
    images: Tensor,
    mask: Tensor,
    device: str,
    warmup: int,
    reps: int,
    autocast: Optional[torch.dtype] = None,
) -> Dict[str, float]:
    """Median milliseconds of every stage and of post-processing, under ``torch.autocast`` to
    ``autocast`` when given."""
    size = tuple(images.shape[-2:])
    samples: Dict[str, List[float]] = {s: [] for s in [*STAGES, POSTPROCESS]}
    mixed = torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None)
    with torch.inference_mode(), mixed:
        for rep in range(warmup + reps):
            stage_ms, outputs = time_forward(model, images, mask, device)
            dense = dense_outputs(outputs)
            start = _now(device)
            model.postprocess(dense, size, [size])
            stage_ms[POSTPROCESS] = (_now(device) - start) * 1e3
            if rep >= warmup:
                for stage, ms in stage_ms.items():
                    samples[stage].append(ms)
    return {stage: statistics.median(ms) for stage, ms in samples.items()}


def _folded(model: PanopticSegFormerCore) -> PanopticSegFormerCore:
    fold_frozen_batchnorm(model.backbone)
    return model


def _channels_last(model: PanopticSegFormerCore) -> PanopticSegFormerCore:
    store_channels_last(model.backbone)  # the backbone only, as prepare_for_inference
    return model


PREPARATIONS = {
    "as built": lambda model: model,
    "batch norms folded": _folded,
    "channels-last weights": _channels_last,
    "both (prepare_for_inference)": lambda model: model.prepare_for_inference(),
    "both + torch.compile": lambda model: torch.compile(model.prepare_for_inference()),
}


def time_preparations(
    model: PanopticSegFormerCore, args: argparse.Namespace, images: Tensor, mask: Tensor
) -> Dict[str, Dict[str, float]]:
    """Start-up (the first call, less a steady call) and steady milliseconds of the network for
    every preparation, each on its own copy of ``model`` as built."""
    rows = {}
    for name, prepare in PREPARATIONS.items():
        if "compile" in name and not args.compile:
            continue
        print(f"timing {name} ...", file=sys.stderr)
        prepared = prepare(copy.deepcopy(model))
        with torch.inference_mode():
            start = _now(args.device)
            prepared(images, mask)
            first = (_now(args.device) - start) * 1e3
            times = []
            for rep in range(args.warmup + args.reps):
                start = _now(args.device)
                prepared(images, mask)
                if rep >= args.warmup:
                    times.append((_now(args.device) - start) * 1e3)
        steady = statistics.median(times)
        rows[name] = {"startup_s": max(first - steady, 0.0) / 1e3, "ms": steady}
    return rows


def print_preparations(rows: Dict[str, Dict[str, float]]) -> None:
    base = rows["as built"]["ms"]
    lines = [
        [name, f"{row['startup_s']:.1f}", f"{row['ms']:.0f}", f"{row['ms'] / base:.2f}"]
        for name, row in rows.items()
    ]
    print_markdown(["preparation", "start-up s", "ms", "vs as built"], lines)


def peak_memory_gib(device: str) -> float:
    """Peak CUDA allocation, or on the CPU the peak resident set of this process (Linux: KiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def print_stages(timing: Dict[int, Dict[str, float]], num_stuff: int) -> None:
    header = ["stage"] + [f"{h} ({k + num_stuff} masks)" for k in timing for h in ("ms", "%")]
    totals = {k: sum(ms.values()) for k, ms in timing.items()}
    lines = []
    for stage in [*STAGES, POSTPROCESS, "total"]:
        line = [stage]
        for k, ms in timing.items():
            value = totals[k] if stage == "total" else ms[stage]
            line += [f"{value:.0f}", f"{100 * value / totals[k]:.1f}"]
        lines.append(line)
    print_markdown(header, lines)


def print_bar(
    args: argparse.Namespace, timing: Dict[int, Dict[str, float]], num_stuff: int
) -> None:
    kept = DETECTIONS[-1]
    post_ms = timing[kept][POSTPROCESS]
    total_ms = sum(timing[kept].values())
    network_ms = total_ms - post_ms
    share = 100 * post_ms / total_ms
    print(
        f"post-processing of {kept + num_stuff} queries ({kept} things + {num_stuff} stuff) at "
        f"{args.height}x{args.width}: {post_ms:.0f} ms = {share:.1f} % of the inference time "
        f"({total_ms:.0f} ms, the stage table's total; {100 * post_ms / network_ms:.1f} % of the "
        f"network alone, {network_ms:.0f} ms); bar < {POSTPROCESS_BAR:.0f} %: "
        + ("met" if share < POSTPROCESS_BAR else "NOT met")
    )


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(PAPER_TABLE1), default="resnet50")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--result-types",
        nargs="+",
        choices=RESULT_TYPES,
        default=["panoptic_seg"],
        help="what post-processing computes (default: panoptic_seg, as the model)",
    )
    parser.add_argument(
        "--autocast",
        choices=["float16", "bfloat16"],
        default=None,
        help="run the model and post-processing under torch.autocast to this type",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--preparations",
        action="store_true",
        help="time the network as built, with its batch norms folded, channels-last, and both",
    )
    parser.add_argument(
        "--compile", action="store_true", help="with --preparations: also under torch.compile"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    if args.height < 32 or args.width < 32:
        parser.error(f"--height and --width must be at least 32, got {args.height}x{args.width}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        inference = InferenceOptions(result_types=args.result_types)
        model = build_core_model(args.backbone, inference=inference).to(args.device)
    except ImportError as e:  # timm missing for Swin / PVTv2
        parser.error(str(e))
    images = torch.randn(1, 3, args.height, args.width, device=args.device)
    mask = torch.zeros(1, args.height, args.width, dtype=torch.bool, device=args.device)

    if args.preparations:
        results = {"preparations": time_preparations(model, args, images, mask)}
        print(
            f"\n{args.backbone}, {args.height}x{args.width}, batch 1, the network (153 masks), "
            f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
            f"median of {args.reps} after {args.warmup} warm-up"
        )
        print_preparations(results["preparations"])
    else:
        autocast = getattr(torch, args.autocast) if args.autocast else None
        model.prepare_for_inference()
        timing = {}
        for kept in DETECTIONS:
            print(f"timing with {kept} thing queries kept ...", file=sys.stderr)
            model.set_inference(replace(model.inference, max_detections=kept))
            timing[kept] = time_stages(
                model, images, mask, args.device, args.warmup, args.reps, autocast
            )
        results = {
            "timing": timing,
            "peak_memory_gib": peak_memory_gib(args.device),
            "autocast": args.autocast,
        }
        where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(
            f"\n{args.backbone}, {args.height}x{args.width}, batch 1, {where} "
            f"({torch.get_num_threads()} threads), torch {torch.__version__}, "
            f"median of {args.reps} after {args.warmup} warm-up; "
            + (f"autocast to {args.autocast}; " if args.autocast else "float32; ")
            + "post-processing: "
            + ", ".join(args.result_types)
        )
        print_stages(timing, model.num_stuff_classes)
        print_bar(args, timing, model.num_stuff_classes)
        print(f"peak memory: {results['peak_memory_gib']:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
