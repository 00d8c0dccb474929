#!/usr/bin/env python
"""Inference ablations of one checkpoint on one dataset: mask-wise merging "(m)" vs pixel-wise
argmax, plain (variant ``pixel_argmax``: Table 7's Panoptic SegFormer "(p)" row) and
class-weighted (``pixel_argmax_class_weighted``: Table 7's "(p*)", as MaskFormer), early exit after
the first 1, 2, 3 or all mask-decoder layers (Table 10), and thing classes from the mask decoder
(Sec. 3.3.3).

Every variant runs the same weights on the same images through detectron2's
COCOPanopticEvaluator (PQ) and :class:`panoptic_segformer.d2.evaluation.BoundaryPanopticEvaluator`
(Boundary PQ of Cheng et al., CVPR 2021, boundary width 2% of the image diagonal: Table 7's right
half); only the inference switches change (``MERGE``, ``PIXEL_ARGMAX_CLASS_WEIGHTED``,
``MASK_DECODER_LAYERS`` and ``THING_CLASSES_FROM`` of ``MODEL.PANOPTIC_SEGFORMER.TEST``). Images
per second count the model's forward and post-processing, not data loading or evaluation. The
training switches (Table 6's ``DEC_LAYERS``, Table 8's ``JOINT_MATCHING``, Fig. 5's
``DEEP_SUPERVISION``) describe the checkpoint: pass them as overrides with its weights.

    python tools/ablate_inference.py --config-file configs/r50.yaml \
        --output output/ablation MODEL.WEIGHTS model.pth
    python tools/ablate_inference.py --config-file configs/r50.yaml --num-images 500 \
        --variants mask_wise,pixel_argmax --output output/ablation MODEL.WEIGHTS model.pth

Prints one table (PQ, SQ, RQ of all / things / stuff, Boundary PQ of all / things / stuff and
images per second per variant) and writes it as JSON to --output/ablate_inference.json; a kind
of category (things or stuff) absent from the images gives NaN for its Boundary PQ.
"""

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import tqdm

if TYPE_CHECKING:
    from panoptic_segformer.modeling import InferenceOptions

_TEST = "MODEL.PANOPTIC_SEGFORMER.TEST."


def _switches(merge: str = "mask_wise", layers: int = 0, **more: object) -> Dict[str, object]:
    """Config overrides of one variant: the merging, mask-decoder layers (0 = all) and more
    ``TEST`` keys; the keys not given keep the config's values."""
    overrides = {"MERGE": merge, "MASK_DECODER_LAYERS": layers, **more}
    return {_TEST + key: value for key, value in overrides.items()}


# variant name -> the inference switches it sets
VARIANTS = OrderedDict(
    [
        # Table 7: "(m)", Panoptic SegFormer's own merging
        ("mask_wise", _switches()),
        # Table 7's Panoptic SegFormer "(p)" row: plain pixel-wise argmax of the mask values
        ("pixel_argmax", _switches("pixel_argmax", PIXEL_ARGMAX_CLASS_WEIGHTED=False)),
        # Table 7's "(p*)" (MaskFormer's rows): argmax of class probability x mask value
        (
            "pixel_argmax_class_weighted",
            _switches("pixel_argmax", PIXEL_ARGMAX_CLASS_WEIGHTED=True),
        ),
        ("exit_1", _switches(layers=1)),
        ("exit_2", _switches(layers=2)),
        ("exit_3", _switches(layers=3)),
        ("mask_decoder_classes", _switches(THING_CLASSES_FROM="mask_decoder")),
    ]
)
PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
# table column -> BoundaryPanopticEvaluator's key
BOUNDARY_METRICS = OrderedDict([("BPQ", "PQ"), ("BPQ_th", "PQ_th"), ("BPQ_st", "PQ_st")])
METRICS = PANOPTIC_METRICS + tuple(BOUNDARY_METRICS)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--dataset", help="a registered panoptic dataset (default: DATASETS.TEST[0])"
    )
    parser.add_argument("--num-images", type=int, help="only the first N images of the dataset")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, any of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--output", default="output/ablate_inference", help="folder of the JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


class _Timed(torch.nn.Module):
    """Counts the seconds spent in the model (forward and post-processing)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seconds = 0.0
        self.images = 0

    def forward(self, inputs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = self.model(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += len(inputs)
        return outputs


def variant_options(cfg, switches: Dict[str, object]) -> "InferenceOptions":
    """The inference settings of ``cfg`` with a variant's config overrides."""
    from panoptic_segformer.d2.build import inference_options_from_config

    variant = cfg.clone()
    variant.defrost()
    variant.merge_from_list([item for pair in switches.items() for item in pair])
    return inference_options_from_config(variant)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators, inference_on_dataset
    from detectron2.utils.logger import setup_logger

    from panoptic_segformer.d2.build import THING_CLASS_KEYS
    from panoptic_segformer.d2.config import get_config
    from panoptic_segformer.d2.data import register_subset
    from panoptic_segformer.d2.engine import train as train_net
    from panoptic_segformer.d2.evaluation import BoundaryPanopticEvaluator
    from panoptic_segformer.d2.predictor import Predictor
    from panoptic_segformer.d2.registration import register
    from panoptic_segformer.modeling.inference import check_thing_classes

    setup_logger(name="panoptic_segformer")
    register()
    cfg = get_config(args.config_file, args.opts, cpu_fallback=True)
    # panoptic results only: no time spent on instance or semantic results
    cfg.merge_from_list(
        [
            "MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON", "True",
            "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False",
            "MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON", "False",
        ]
    )  # fmt: skip
    cfg.freeze()
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if dataset is None:
        raise SystemExit("no dataset: give --dataset or set DATASETS.TEST")
    os.makedirs(args.output, exist_ok=True)
    if args.num_images is not None:
        dataset = register_subset(dataset, args.num_images, args.output)

    meta = Predictor(cfg).model  # builds, loads MODEL.WEIGHTS (raising on a mismatch)
    depth = len(meta.core.mask_decoder.thing_class_heads)  # layers of the thing stack
    loader = train_net.Trainer.build_test_loader(cfg, dataset)
    rows = OrderedDict()
    for name in tqdm.tqdm(args.variants, desc="variants"):
        options = variant_options(cfg, VARIANTS[name])
        if (options.mask_decoder_layers or 0) > depth:
            print(f"skipping {name}: the thing mask decoder has only {depth} layers")
            continue
        try:  # the thing classes must come from a part that classifies and was trained
            check_thing_classes(
                options.thing_classes_from,
                cfg.MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS,
                cfg.MODEL.PANOPTIC_SEGFORMER.THING_CLASS_WEIGHT,
                THING_CLASS_KEYS,
            )
        except ValueError as e:
            print(f"skipping {name}: {e}")
            continue
        meta.core.set_inference(options)
        timed = _Timed(meta)
        evaluator = DatasetEvaluators(
            [
                COCOPanopticEvaluator(dataset, os.path.join(args.output, name)),
                BoundaryPanopticEvaluator(dataset),
            ]
        )
        results = inference_on_dataset(timed, loader, evaluator)
        rows[name] = {m: results["panoptic_seg"][m] for m in PANOPTIC_METRICS}
        rows[name].update(
            {m: results["boundary_panoptic_seg"][k] for m, k in BOUNDARY_METRICS.items()}
        )
        rows[name]["images_per_second"] = timed.images / timed.seconds
    result = {
        "config": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "dataset": dataset,
        "device": cfg.MODEL.DEVICE,
        "variants": rows,
    }
    print_table(result)
    path = os.path.join(args.output, "ablate_inference.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written: {path}")
    return result


def print_table(result: Dict[str, object]) -> None:
    print(f"\n{result['config']} on {result['dataset']} ({result['device']})")
    print("| variant | " + " | ".join(METRICS) + " | images/s |")
    print("|---" * (len(METRICS) + 2) + "|")
    for name, row in result["variants"].items():
        cells = [f"{row[m]:.1f}" for m in METRICS] + [f"{row['images_per_second']:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
