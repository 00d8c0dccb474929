#!/usr/bin/env python
"""Parameters and FLOPs of any config, beside the paper's Table 1 (as detectron2's
tools/analyze_model.py, for Panoptic SegFormer).

FLOPs are fvcore's (1 FLOP = 1 multiply-add, as the mmcv counter the paper used) of the
network, backbone to mask decoder (post-processing excluded), either at one input size or
averaged over the first N test images of the config's dataset, resized as at test time.
Parameters count the frozen batch norms' affine weights, as mmdet (the authors' code) does.

    python tools/analyze_model.py --config-file configs/r50.yaml                # 800 x 1333
    python tools/analyze_model.py --config-file configs/swin_l.yaml --size 800 1216
    python tools/analyze_model.py --config-file configs/r50.yaml --num-inputs 100 \
        --output output/r50_analysis.json
    python tools/analyze_model.py --params-only   # parameters of Table 1's four models

With a config: one table (parameters and GFLOPs per part, the total, Table 1's value and the
difference) and the ops fvcore could not count. With --params-only: the parameters per part of
the four backbones' models (built from the backbones' names, without a config or detectron2;
a model whose backbone timm cannot build is skipped with a note) against Table 1. Either is also
written as JSON (--output). Inference time: tools/benchmark_model.py.
"""

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from unittest import mock

import torch
import tqdm
from torch import nn

from panoptic_segformer.layers.ms_deform_attn_func import IMPLEMENTATION_ENV
from panoptic_segformer.modeling.complexity import (
    FLOP_HANDLES,
    PAPER_TABLE1,
    PARTS,
    build_core_model,
    parameter_parts,
    print_markdown,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config-file", metavar="FILE", help="parameters and GFLOPs of a config")
    what.add_argument(
        "--params-only",
        action="store_true",
        help="parameters of Table 1's four models, no config (no detectron2), no FLOPs",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="one input of this size"
    )
    group.add_argument(
        "--num-inputs", type=int, help="average over the first N images of DATASETS.TEST[0]"
    )
    parser.add_argument("--output", default="output/analyze_model.json", help="JSON of results")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def paper_key(cfg) -> Optional[str]:
    """The Table 1 row of the config's backbone, or None."""
    if cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone":
        key = f"resnet{cfg.MODEL.RESNETS.DEPTH}"
    elif cfg.MODEL.BACKBONE.NAME == "D2TimmBackbone":
        key = cfg.MODEL.TIMM.NAME
    else:
        return None
    return key if key in PAPER_TABLE1 else None


class _Network(nn.Module):
    """The meta-architecture's network on one (3, H, W) image: normalisation, padding, backbone,
    neck, encoder and decoders; no post-processing."""

    def __init__(self, meta: nn.Module) -> None:
        super().__init__()
        self.meta = meta

    def forward(self, image: torch.Tensor):
        images, padding_mask = self.meta.preprocess_images([image])
        outputs = self.meta.network(images.tensor, padding_mask)
        return tuple(outputs[key] for key in sorted(outputs))


def count_flops(meta: nn.Module, image: torch.Tensor) -> Tuple[Dict[str, float], List[str]]:
    """GFLOPs of each part and the total for one (3, H, W) image, and the ops fvcore has no
    handle for (not counted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's use of the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis
    network = _Network(meta).eval()
    with mock.patch.dict(os.environ, {IMPLEMENTATION_ENV: "pytorch"}):
        analysis = FlopCountAnalysis(network, (image,)).set_op_handle(**FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation warnings while tracing
            by_module, total = analysis.by_module(), analysis.total()
            skipped = sorted(analysis.unsupported_ops())
    parts = {
        "backbone": by_module["meta.backbone"],
        "location decoder": by_module["meta.core.location_decoder"],
        "mask decoder": by_module["meta.core.mask_decoder"],
    }
    parts["neck + encoder"] = total - sum(parts.values())  # neck, encoder, positions, flattening
    result = {part: parts[part] / 1e9 for part in PARTS}
    result["total"] = total / 1e9
    return result, skipped


def inputs_of(cfg, args) -> List[torch.Tensor]:
    """The (3, H, W) uint8 images to count on."""
    if args.num_inputs is None:
        h, w = args.size or (800, 1333)
        return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8)]
    from detectron2.data import DatasetCatalog

    from panoptic_segformer.d2.data import PanopticSegFormerDatasetMapper

    if not cfg.DATASETS.TEST:
        raise ValueError("--num-inputs reads DATASETS.TEST[0], which the config leaves empty")
    if args.num_inputs < 1:
        raise ValueError(f"--num-inputs must be positive, got {args.num_inputs}")
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.num_inputs]
    mapper = PanopticSegFormerDatasetMapper(cfg, False)
    return [mapper(d)["image"] for d in dicts]


def analyze_config(args: argparse.Namespace) -> Dict[str, object]:
    """Parameters and mean GFLOPs per part of the config's detectron2 model."""
    from detectron2.modeling import build_model

    from panoptic_segformer.d2.config import get_config
    from panoptic_segformer.d2.registration import register

    register()
    cfg = get_config(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
    cfg.freeze()
    meta = build_model(cfg).eval()
    params = {k: v / 1e6 for k, v in parameter_parts(meta.backbone, meta.core).items()}
    images = inputs_of(cfg, args)
    counts, skipped = zip(
        *(count_flops(meta, image) for image in tqdm.tqdm(images, disable=len(images) == 1))
    )
    gflops = {key: statistics.mean(c[key] for c in counts) for key in counts[0]}
    sizes = [list(image.shape[-2:]) for image in images]
    key = paper_key(cfg)
    paper = PAPER_TABLE1.get(key, {}) if key else {}
    result = {
        "config": args.config_file,
        "inputs": len(images),
        "input_sizes": sizes if len(sizes) <= 10 else sizes[:10] + ["..."],
        "params_m": params,
        "gflops": gflops,
        "not_counted": sorted(set().union(*skipped)),
        "paper_table1": {"backbone": key, **paper},
    }
    print_table(result)
    return result


def analyze_table1_models() -> Dict[str, object]:
    """Parameters per part of Table 1's four models, built from their backbones' names; those
    whose backbone cannot be built (timm missing or too old) are skipped with a note."""
    rows = []
    for name, paper in PAPER_TABLE1.items():
        try:
            model = build_core_model(name)
        except ImportError as e:
            print(f"note: {name} skipped: {e}")
            continue
        params = {k: v / 1e6 for k, v in parameter_parts(model.backbone, model).items()}
        rows.append({"backbone": name, "params_m": params, "paper_params_m": paper["params"]})
    print_parameters(rows)
    return {"parameters": rows}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.params_only and (args.size or args.num_inputs is not None or args.opts):
        parser.error("--params-only takes no --size, --num-inputs or config overrides")
    if args.size is not None and min(args.size) < 1:
        parser.error(f"--size must be positive, got {args.size[0]} {args.size[1]}")
    result = analyze_table1_models() if args.params_only else analyze_config(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written: {args.output}")
    return result


def _difference(value: float, reference: Optional[float]) -> str:
    return f"{100 * (value - reference) / reference:+.1f} %" if reference else "-"


def print_table(result: Dict[str, object]) -> None:
    params, gflops, paper = result["params_m"], result["gflops"], result["paper_table1"]
    shape = result["input_sizes"][0] if result["inputs"] == 1 else "mean"
    where = f"{shape[0]}x{shape[1]}" if result["inputs"] == 1 else f"{result['inputs']} images"
    print(f"\n{result['config']}: parameters (M, frozen BN affine included) and GFLOPs ({where})")
    lines = [[part, f"{params[part]:.2f}", f"{gflops[part]:.1f}"] for part in [*PARTS, "total"]]
    if paper.get("params"):
        lines.append(
            [
                f"paper Table 1 ({paper['backbone']})",
                f"{paper['params']:.1f} ({_difference(params['total'], paper['params'])})",
                f"{paper['gflops']:.0f} ({_difference(gflops['total'], paper['gflops'])})",
            ]
        )
    print_markdown(["part", "params (M)", "GFLOPs"], lines)
    not_counted = ", ".join(result["not_counted"])
    print(f"not counted (fvcore has no handle; mostly element-wise): {not_counted}")


def print_parameters(rows: List[Dict[str, object]]) -> None:
    print("\nParameters (M), frozen BN affine weights included")
    lines = []
    for row in rows:
        params, paper = row["params_m"], row["paper_params_m"]
        cells = [f"{params[k]:.2f}" for k in [*PARTS, "total"]]
        lines.append([row["backbone"], *cells, f"{paper:.1f}", _difference(params["total"], paper)])
    print_markdown(["model", *PARTS, "total", "paper", "difference"], lines)


if __name__ == "__main__":
    main()
