#!/usr/bin/env python
"""Panoptic SegFormer against Mask2Former: per-image inference time of both predictors in one run.

Both models are R50, untrained (random weights: speed does not depend on them), panoptic output
only, and run through detectron2's ``DefaultPredictor`` (ours through its subclass
``panoptic_segformer.predictor.Predictor``) on the same photos, resized the same way (short side
800, long side at most 1333). Each model runs in its own process, one after the other: both
projects register datasets of the same names at import (``ade20k_panoptic_train``, ...), and a
process of its own gives each its own peak memory. Per image: ``--warmup`` calls, then the median
of ``--reps`` calls; the table gives both medians and their ratio, the last row the sums.

Mask2Former comes from its public repository, cloned by you into a folder you name
(``git clone https://github.com/facebookresearch/Mask2Former``; nothing to build). Its
deformable-attention module raises at import when its CUDA op is not compiled, although its
PyTorch fallback runs on a CPU; this script puts an empty ``MultiScaleDeformableAttention``
module in ``sys.modules`` of the Mask2Former process before the import, so the import passes and
every call takes the fallback (its ``MSDeformAttn.forward`` catches the missing function). Your
copy is not modified.

Trailing ``KEY VALUE`` pairs override our config (e.g. ``MODEL.WEIGHTS model_final.pth``).

Examples:
  python tools/benchmark_peers.py --mask2former ~/src/Mask2Former --threads 2
  python tools/benchmark_peers.py --mask2former ~/src/Mask2Former --images a.jpg b.jpg --reps 5
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT.parent / "shared" / "data" / "coco_panoptic_sample" / "images"
OURS, MASK2FORMER = "Panoptic SegFormer", "Mask2Former"
MASK2FORMER_CONFIG = "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
RATIO_BAR = 0.7  # issue 14: our time at most 0.7 of Mask2Former's


def our_predictor(config_file: str, opts: List[str]):
    sys.path.insert(0, str(ROOT))
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config
    from panoptic_segformer.config import merge_config_file
    from panoptic_segformer.predictor import Predictor

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    merge_config_file(cfg, config_file)
    ps = cfg.MODEL.PANOPTIC_SEGFORMER
    ps.TEST.PANOPTIC_ON, ps.TEST.INSTANCE_ON, ps.TEST.SEMANTIC_ON = True, False, False
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cpu"
    cfg.merge_from_list(opts)
    return Predictor(cfg)


def mask2former_predictor(folder: Path):
    if not (folder / "mask2former" / "__init__.py").is_file():
        raise SystemExit(f"--mask2former {folder}: no mask2former/__init__.py there")
    sys.path.insert(0, str(folder))
    # the in-memory patch: an empty module for the compiled op lets Mask2Former import; its
    # MSDeformAttn.forward then falls back to its PyTorch implementation on every call
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MSDA_missing"))
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(folder / MASK2FORMER_CONFIG), allow_unsafe=False)  # data only
    test = cfg.MODEL.MASK_FORMER.TEST
    test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON = True, False, False
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cpu"
    return DefaultPredictor(cfg)


def worker(args: argparse.Namespace) -> None:
    """Times one model on every image and writes the medians to ``args.result``."""
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == OURS:
        predictor = our_predictor(args.config_file, args.opts)
    else:
        predictor = mask2former_predictor(args.mask2former)
    rows = []
    for path in args.images:
        image = cv2.imread(str(path))
        if image is None:
            raise SystemExit(f"{path}: not an image cv2 can read")
        size = predictor.aug.get_transform(image).apply_image(image).shape[:2]
        times = []
        for rep in range(args.warmup + args.reps):
            start = time.perf_counter()
            predictor(image)
            if rep >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        rows.append({"image": path.name, "size": list(size), "ms": statistics.median(times)})
        print(f"{args.worker}: {path.name} {size[0]}x{size[1]} {rows[-1]['ms']:.0f} ms", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    result = {"rows": rows, "peak_gib": peak, "threads": torch.get_num_threads()}
    args.result.write_text(json.dumps(result))


def run_worker(name: str, args: argparse.Namespace, folder: Path) -> Dict:
    result = folder / f"{name.replace(' ', '_')}.json"
    command = [sys.executable, __file__, "--images", *map(str, args.images)]
    command += ["--worker", name, "--result", str(result), "--mask2former", str(args.mask2former)]
    command += ["--threads", str(args.threads), "--reps", str(args.reps)]
    command += ["--warmup", str(args.warmup), "--config-file", args.config_file, *args.opts]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit(f"the {name} process failed (its output is above)")
    return json.loads(result.read_text())


def print_table(results: Dict[str, Dict], threads: int, reps: int, warmup: int) -> List[Dict]:
    import torch

    print(
        f"\nR50, untrained, panoptic output only, DefaultPredictor, CPU ({threads} threads), "
        f"torch {torch.__version__}, median of {reps} after {warmup} warm-up"
    )
    print(f"| image | input | {OURS} ms | {MASK2FORMER} ms | ratio |")
    print("|---|---|---:|---:|---:|")
    ours, theirs = results[OURS]["rows"], results[MASK2FORMER]["rows"]
    for a, b in zip(ours, theirs):
        h, w = a["size"]
        print(
            f"| {a['image']} | {h}x{w} | {a['ms']:.0f} | {b['ms']:.0f} | {a['ms'] / b['ms']:.2f} |"
        )
    total_a, total_b = sum(r["ms"] for r in ours), sum(r["ms"] for r in theirs)
    ratio = total_a / total_b
    print(f"| all | | {total_a:.0f} | {total_b:.0f} | **{ratio:.2f}** |")
    print(
        f"peak memory (resident set of each process): {OURS} {results[OURS]['peak_gib']:.1f} GiB, "
        f"{MASK2FORMER} {results[MASK2FORMER]['peak_gib']:.1f} GiB"
    )
    print(f"bar: ratio <= {RATIO_BAR}: " + ("met" if ratio <= RATIO_BAR else "NOT met"))
    return [{"ours_ms": a["ms"], "mask2former_ms": b["ms"], **a} for a, b in zip(ours, theirs)]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mask2former", type=Path, required=True, help="your Mask2Former clone")
    parser.add_argument("--images", type=Path, nargs="+", default=None)
    parser.add_argument("--config-file", default=str(ROOT / "configs" / "r50.yaml"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of each model")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", choices=[OURS, MASK2FORMER], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of our config")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    if args.images is None:
        args.images = sorted(SAMPLE_IMAGES.glob("*.jpg"))
        if not args.images:
            parser.error(f"no images given and none in {SAMPLE_IMAGES}: pass --images")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        parser.error(f"--images: no such file: {', '.join(missing)}")
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(
            f"--reps and --threads must be >= 1 and --warmup >= 0, got {args.reps}, "
            f"{args.threads} and {args.warmup}"
        )
    args.mask2former = args.mask2former.expanduser().resolve()
    if args.worker:
        worker(args)
        return
    if not (args.mask2former / MASK2FORMER_CONFIG).is_file():
        parser.error(f"--mask2former {args.mask2former}: no {MASK2FORMER_CONFIG} there")
    with tempfile.TemporaryDirectory() as folder:
        results = {name: run_worker(name, args, Path(folder)) for name in (OURS, MASK2FORMER)}
    rows = print_table(results, args.threads, args.reps, args.warmup)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **results}))


if __name__ == "__main__":
    main()
