#!/usr/bin/env python
"""Everything only a GPU can show, in one command: for whoever next holds a GPU for a few minutes.

Runs on a machine with a CUDA GPU and PyTorch preinstalled (>= 2.4), without network access, from
the repository root. It installs nothing. In order, each part in a subprocess with its own time
budget (the parts of a one-GPU machine add up to under 8 minutes):

  environment      torch, CUDA, the GPUs, whether detectron2 is importable
  kernel           load the CUDA deformable-attention kernel, compiling it first if it was not
                   built at install time (needs nvcc under CUDA_HOME then)
  cuda tests       the CUDA kernel's tests and the float16 autocast tests
  msda cuda        tools/benchmark_msda.py on the GPU in float32, float16 and bfloat16 (the
                   CUDA kernel against the PyTorch path)
  msda cpu         the same encoder workload on this machine's CPU kernel, for comparison
  model float32    tools/benchmark_model.py: R50 inference at 800x1333 on the GPU
  model autocast   the same under float16 autocast
  amp training     20 iterations of train_net.py with SOLVER.AMP.ENABLED True on images this
                   tool makes (needs detectron2)
  2-gpu training   the same on two GPUs with DDP, when two are visible

It prints one table (part, status, seconds against budget, the numbers) and writes it, with each
part's command and the end of its output, to OUTPUT/gpu_acceptance.json. The exit status is 1
when any part failed.

    python tools/gpu_acceptance.py                   # on the GPU machine
    python tools/gpu_acceptance.py --dry-run         # anywhere: every part, nothing run

``--dry-run`` reaches every part and runs none: each says what it would run, or why it would be
skipped (``skipped: no GPU`` on a machine without one).
"""

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# (COCO panoptic category id, is a thing, colour) of the images this tool makes
PERSON, CAR, DOG = (1, True, (220, 20, 60)), (3, True, (0, 0, 142)), (18, True, (255, 179, 240))
SKY, GRASS, WALL = (
    (187, False, (70, 130, 180)),
    (193, False, (152, 251, 152)),
    (199, False, (102, 102, 156)),
)


def make_panoptic_dataset(root: Path, num_images: int = 8, seed: int = 0) -> Path:
    """Writes a small COCO panoptic train2017 split under ``root/coco`` (detectron2's layout for
    ``DETECTRON2_DATASETS``): images of a sky, grass or wall background with a few people, cars
    and dogs as coloured rectangles, with their panoptic PNGs and json. Returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coco = root / "coco"
    images_dir, panoptic_dir = coco / "train2017", coco / "panoptic_train2017"
    for folder in (images_dir, panoptic_dir, coco / "annotations"):
        folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        height, width = [(480, 640), (640, 480), (512, 683)][index % 3]
        ids = np.zeros((height, width), dtype=np.int64)
        segments = []
        split = int(rng.integers(height // 3, 2 * height // 3))
        for segment_id, (category, top, bottom) in enumerate(
            [(SKY if index % 2 else WALL, 0, split), (GRASS, split, height)], start=1
        ):
            ids[top:bottom] = segment_id
            segments.append((segment_id, category))
        for segment_id in range(3, 3 + int(rng.integers(1, 4))):
            category = [PERSON, CAR, DOG][int(rng.integers(0, 3))]
            h, w = int(rng.integers(height // 6, height // 2)), int(
                rng.integers(width // 8, width // 3)
            )
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            ids[y : y + h, x : x + w] = segment_id
            segments.append((segment_id, category))
        colours = np.zeros((height, width, 3), dtype=np.float64)
        infos = []
        for segment_id, (category_id, isthing, colour) in segments:
            where = ids == segment_id
            if not where.any():  # covered by later things
                continue
            colours[where] = colour
            ys, xs = where.nonzero()
            infos.append(
                {
                    "id": segment_id,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "area": int(where.sum()),
                    "bbox": [
                        int(xs.min()),
                        int(ys.min()),
                        int(np.ptp(xs)) + 1,
                        int(np.ptp(ys)) + 1,
                    ],
                }
            )
        noise = rng.normal(0, 12, size=colours.shape)
        pixels = np.clip(colours + noise, 0, 255).astype(np.uint8)
        name = f"{index:012d}"
        Image.fromarray(pixels).save(images_dir / f"{name}.jpg", quality=95)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(panoptic_dir / f"{name}.png")
        images.append({"id": index, "file_name": f"{name}.jpg", "height": height, "width": width})
        annotations.append({"image_id": index, "file_name": f"{name}.png", "segments_info": infos})
    categories = [
        {"id": c, "name": str(c), "isthing": int(t), "color": list(rgb)}
        for c, t, rgb in (PERSON, CAR, DOG, SKY, GRASS, WALL)
    ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (coco / "annotations" / "panoptic_train2017.json").write_text(json.dumps(data))
    return root


@dataclass
class Context:
    output: Path
    gpus: int
    detectron2: Optional[str]  # None when importable, else why not
    dry_run: bool


@dataclass
class Part:
    """One check: a command run with a time budget, and what to read from its results."""

    name: str
    budget_s: int
    command: Callable[[Context], List[str]]
    numbers: Callable[[Context, str], str] = lambda context, output: ""
    needs_gpus: int = 1
    needs_detectron2: bool = False
    prepare: Callable[[Context], Dict[str, str]] = lambda context: {}
    result: Dict[str, object] = field(default_factory=dict)


def _pytest_numbers(context: Context, output: str) -> str:
    lines = [line for line in output.splitlines() if " passed" in line or " failed" in line]
    return lines[-1].strip("= ") if lines else ""


def _msda_numbers(name: str, impl: str, reference: Optional[str]):
    def numbers(context: Context, output: str) -> str:
        rows = json.loads((context.output / f"{name}.json").read_text())
        by = {(r["impl"], r["workload"], r["batch"], r["dtype"]): r for r in rows}
        parts = []
        for (kind, workload, batch, dtype), row in by.items():
            if kind != impl or workload != "encoder" or batch != 1:
                continue
            text = f"{dtype} fwd {row['fwd_ms']:.2f} / fwd+bwd {row['fwd_bwd_ms']:.2f} ms"
            base = by.get((reference, workload, batch, dtype))
            if base:
                speedup = base["fwd_ms"] / row["fwd_ms"], base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                text += f" ({speedup[0]:.1f}x / {speedup[1]:.1f}x {reference})"
            parts.append(text)
        return "encoder b1: " + "; ".join(parts)

    return numbers


def _model_numbers(name: str):
    def numbers(context: Context, output: str) -> str:
        results = json.loads((context.output / f"{name}.json").read_text())
        total = {k: sum(v.values()) for k, v in results["timing"].items()}
        return (
            f"{total['100']:.1f} ms (153 masks), {total['300']:.1f} ms (353 masks), peak "
            f"{results['peak_memory_gib']:.1f} GiB"
        )

    return numbers


def _training_opts(context: Context, gpus: int) -> List[str]:
    return [
        "--config-file", str(ROOT / "configs" / "r50.yaml"),
        "--num-gpus", str(gpus),
        "MODEL.WEIGHTS", "",  # nothing is downloaded: random initialisation
        "SOLVER.AMP.ENABLED", "True",
        "SOLVER.IMS_PER_BATCH", str(2 * gpus),
        "SOLVER.MAX_ITER", "20",
        "SOLVER.CHECKPOINT_PERIOD", "100000",
        "DATASETS.TRAIN", "('coco_2017_train_panoptic',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "2",
        "OUTPUT_DIR", str(context.output / f"train_{gpus}gpu"),
    ]  # fmt: skip


def _training_numbers(gpus: int):
    def numbers(context: Context, output: str) -> str:
        # detectron2 writes metrics.json every 20 iterations and at the end: losses are medians
        # over the last 20 iterations, "time" the seconds per iteration after 3 of warm-up
        path = context.output / f"train_{gpus}gpu" / "metrics.json"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        last = [r for r in rows if "total_loss" in r][-1]
        if not math.isfinite(last["total_loss"]):
            raise ValueError(f"total loss {last['total_loss']}")
        text = f"{last['iteration'] + 1} iterations, total loss {last['total_loss']:.2f} (finite)"
        if "time" in last:
            text += f", {last['time']:.3f} s/iter"
        return text

    return numbers


def _dataset_env(context: Context) -> Dict[str, str]:
    root = context.output / "datasets"
    if not (root / "coco" / "annotations" / "panoptic_train2017.json").is_file():
        make_panoptic_dataset(root)
    return {"DETECTRON2_DATASETS": str(root)}


def script(arguments: str, *more: str) -> List[str]:
    """``python <arguments split on spaces> <more>``."""
    return [PYTHON, *arguments.split(), *more]


LOAD_KERNEL = """
from panoptic_segformer.layers.ms_deform_attn_op import load_extension
module, reason = load_extension()
print(reason or f"loaded {module.__file__}")
raise SystemExit(module is None)
"""
BENCHMARK_MSDA = "tools/benchmark_msda.py --device"
MSDA_CPU_REPS = "--warmup 1 --reps 3"
BENCHMARK_MODEL = "tools/benchmark_model.py --device cuda --reps 20 --warmup 5"

PARTS = [
    Part(
        "kernel",
        120,
        lambda c: [PYTHON, "-c", LOAD_KERNEL],
        lambda c, output: output.strip().splitlines()[-1],
    ),
    Part(
        "cuda tests",
        90,
        lambda c: script(
            "-m pytest -q -p no:cacheprovider tests/layers/test_ms_deform_attn_cuda.py "
            "tests/modeling/test_mixed_precision.py"
        ),
        _pytest_numbers,
    ),
    Part(
        "msda cuda",
        45,
        lambda c: script(
            f"{BENCHMARK_MSDA} cuda --dtypes float32 float16 bfloat16 --reps 10 --json",
            str(c.output / "msda_cuda.json"),
        ),
        _msda_numbers("msda_cuda", "cuda", "pytorch"),
    ),
    Part(
        "msda cpu",
        40,
        lambda c: script(
            f"{BENCHMARK_MSDA} cpu --batch 1 --workloads encoder --implementations pytorch cpu "
            f"{MSDA_CPU_REPS} --json",
            str(c.output / "msda_cpu.json"),
        ),
        _msda_numbers("msda_cpu", "cpu", "pytorch"),
    ),
    Part(
        "model float32",
        40,
        lambda c: script(f"{BENCHMARK_MODEL} --json", str(c.output / "model_float32.json")),
        _model_numbers("model_float32"),
    ),
    Part(
        "model autocast",
        40,
        lambda c: script(
            f"{BENCHMARK_MODEL} --autocast float16 --json", str(c.output / "model_autocast.json")
        ),
        _model_numbers("model_autocast"),
    ),
    *(
        Part(
            "amp training" if gpus == 1 else f"{gpus}-gpu training",
            90,
            lambda c, gpus=gpus: [PYTHON, "train_net.py", *_training_opts(c, gpus)],
            _training_numbers(gpus),
            needs_gpus=gpus,
            needs_detectron2=True,
            prepare=_dataset_env,
        )
        for gpus in (1, 2)
    ),
]


def skip_reason(part: Part, context: Context) -> Optional[str]:
    """Why ``part`` cannot run here, or None."""
    if context.gpus == 0:
        return "no GPU"
    if context.gpus < part.needs_gpus:
        return f"{part.needs_gpus} GPUs needed, {context.gpus} visible"
    if part.needs_detectron2 and context.detectron2:
        return context.detectron2
    return None


def run_part(part: Part, context: Context) -> Dict[str, object]:
    """Runs one part (or says why not) and returns its row."""
    command = part.command(context)
    row: Dict[str, object] = {
        "part": part.name,
        "budget_s": part.budget_s,
        "seconds": 0.0,
        "numbers": "",
        "command": " ".join(command),
    }
    reason = skip_reason(part, context)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    if context.dry_run:
        return {**row, "status": "dry run"}
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part.prepare(context)}
    try:
        process = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=part.budget_s,
        )
        output, failed = process.stdout, process.returncode != 0
        status = f"fail: exit status {process.returncode}" if failed else "pass"
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        output, status = output or "", f"fail: over its budget of {part.budget_s} s"
    row.update(seconds=time.perf_counter() - start, status=status, output_tail=output[-4000:])
    if status == "pass":
        try:
            row["numbers"] = part.numbers(context, output)
        except (OSError, ValueError, KeyError, IndexError) as e:
            row["status"] = f"fail: results unreadable ({e})"
    return row


def environment(context: Context) -> Dict[str, object]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(context.gpus)]
    numbers = (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: {', '.join(gpus) or 'none'}, "
        f"detectron2: {'importable' if context.detectron2 is None else 'no'}"
    )
    return {
        "part": "environment",
        "budget_s": 0,
        "seconds": 0.0,
        "status": "pass",
        "numbers": numbers,
        "command": "",
    }


def detectron2_missing() -> Optional[str]:
    """None when detectron2 (and what train_net.py imports with it) is importable, else why
    not."""
    for name in ("detectron2.engine", "panopticapi", "pycocotools"):
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken build raising anything
            return f"{name} is not importable ({type(e).__name__}: {e})"
    return None


def print_table(rows: List[Dict[str, object]]) -> None:
    print("\n| part | status | seconds / budget | numbers |")
    print("|---|---|---|---|")
    for row in rows:
        budget = f"{row['seconds']:.0f} / {row['budget_s']}" if row["budget_s"] else "-"
        print(f"| {row['part']} | {row['status']} | {budget} | {row['numbers']} |")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would run; run nothing")
    parser.add_argument("--output", type=Path, default=ROOT / "output" / "gpu_acceptance")
    args = parser.parse_args(argv)
    import torch

    args.output.mkdir(parents=True, exist_ok=True)
    context = Context(
        output=args.output.resolve(),
        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        detectron2=detectron2_missing(),
        dry_run=args.dry_run,
    )
    start = time.perf_counter()
    rows = [environment(context)]
    for part in PARTS:
        print(f"{part.name} (budget {part.budget_s} s) ...", file=sys.stderr, flush=True)
        rows.append(run_part(part, context))
    print_table(rows)
    total = time.perf_counter() - start
    print(f"\nwall time {total:.0f} s; results in {context.output / 'gpu_acceptance.json'}")
    report = {"wall_time_s": total, "dry_run": args.dry_run, "parts": rows}
    (context.output / "gpu_acceptance.json").write_text(json.dumps(report, indent=2))
    return 1 if any(str(r["status"]).startswith("fail") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
