#!/usr/bin/env python
"""End-to-end proof on the CPU: overfit the two real COCO panoptic sample images, then score
them with detectron2's COCOPanopticEvaluator.

Everything is the real pipeline: the sample is registered as a COCO-panoptic dataset, the
dataset mapper builds the targets, ``train_net.Trainer`` (detectron2's DefaultTrainer with our
optimiser and checkpointer) trains, and the evaluator computes PQ with panopticapi. Only the
scale is small: a ResNet-18 with GroupNorm trained from scratch (no weights can be downloaded
here), a narrow head, short side --size, no augmentation.

    python tools/overfit_sample.py                      # until PQ >= 50, at most --max-iter
    python tools/overfit_sample.py --size 320 --eval-period 200 --output output/overfit

Evaluates every --eval-period iterations, stops once PQ reaches --target-pq, and prints a final
table with PQ, PQ_th, PQ_st, the iterations and the wall time.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "coco_panoptic_sample"
DATASET = "coco_panoptic_sample"


# A small model trained from scratch on the CPU (also the distributed tests' model)
SMALL_MODEL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    # ResNet-18 from scratch: GroupNorm instead of frozen BN, nothing frozen
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "128",
    "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "512",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "3",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "60",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.DROPOUT", "0.0",
]  # fmt: skip


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", default=str(SAMPLE), help="COCO panoptic sample folder")
    parser.add_argument("--size", type=int, default=320, help="short side of the images")
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--eval-period", type=int, default=200)
    parser.add_argument("--target-pq", type=float, default=50.0, help="stop once PQ reaches it")
    # the authors' rate; 4e-4 made the thing masks' final ReLU die here (dice loss stuck at 1)
    parser.add_argument("--lr", type=float, default=1.4e-4)
    parser.add_argument("--output", default="output/overfit_sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="further config overrides")
    return parser


def build_cfg(args):
    from panoptic_segformer.d2.config import get_config
    from panoptic_segformer.d2.registration import register

    size = str(args.size)
    register()
    cfg = get_config(
        str(ROOT / "configs" / "r50.yaml"),
        [
            *SMALL_MODEL,
            "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False",
            "DATASETS.TRAIN", f"('{DATASET}',)",
            "DATASETS.TEST", f"('{DATASET}',)",
            "INPUT.MIN_SIZE_TRAIN", f"({size},)",
            "INPUT.MAX_SIZE_TRAIN", str(2 * args.size),
            "INPUT.MIN_SIZE_TEST", size,
            "INPUT.MAX_SIZE_TEST", str(2 * args.size),
            "INPUT.RANDOM_FLIP", "none",
            "INPUT.CROP.ENABLED", "False",
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.BASE_LR", str(args.lr),
            "SOLVER.BACKBONE_MULTIPLIER", "1.0",
            "SOLVER.MAX_ITER", str(args.max_iter),
            "SOLVER.STEPS", "()",
            "SOLVER.CHECKPOINT_PERIOD", str(10 * args.max_iter),
            "TEST.EVAL_PERIOD", "0",  # evaluated at the end of every chunk (see main)
            "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", args.output,
            "SEED", str(args.seed),
            *args.opts,
        ],
    )  # fmt: skip
    cfg.freeze()
    return cfg


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    for flag in ("size", "max_iter", "eval_period"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    sample = Path(args.sample)
    if not (sample / "panoptic.json").is_file():
        raise SystemExit(f"no COCO panoptic sample at {sample} (expected panoptic.json there)")

    from detectron2.data import DatasetCatalog
    from detectron2.engine import default_setup, hooks
    from detectron2.utils.logger import setup_logger

    from panoptic_segformer.d2.data import register_panoptic_dataset
    from panoptic_segformer.d2.engine import train as train_net

    if DATASET not in DatasetCatalog.list():
        register_panoptic_dataset(
            DATASET, str(sample / "images"), str(sample / "panoptic"), str(sample / "panoptic.json")
        )
    cfg = build_cfg(args)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    default_setup(cfg, argparse.Namespace(config_file="", eval_only=False, opts=[]))
    logger = setup_logger(name="overfit")

    # Evaluate every --eval-period iterations (in place of detectron2's evaluation hook) and
    # end training once PQ reaches the target.
    history = []

    class EvaluateAndStop(hooks.HookBase):
        def after_step(self):
            done = self.trainer.iter + 1
            if done % args.eval_period and done != self.trainer.max_iter:
                return
            pq = train_net.Trainer.test(cfg, self.trainer.model)["panoptic_seg"]
            history.append((done, pq, time.perf_counter() - start))
            logger.info(
                f"iteration {done}: PQ {pq['PQ']:.1f}, PQ_th {pq['PQ_th']:.1f}, "
                f"PQ_st {pq['PQ_st']:.1f} ({history[-1][2]:.0f} s)"
            )
            if pq["PQ"] >= args.target_pq:
                raise TargetReached()

    trainer = train_net.Trainer(cfg)
    trainer._hooks = [h for h in trainer._hooks if not isinstance(h, hooks.EvalHook)]
    trainer.register_hooks([EvaluateAndStop()])
    # the trainer logs any exception that ends training; this one is the planned stop
    logging.getLogger("detectron2.engine.train_loop").addFilter(
        lambda record: not (record.exc_info and record.exc_info[0] is TargetReached)
    )
    start = time.perf_counter()
    try:
        trainer.train()
    except TargetReached:
        pass
    iteration, pq, seconds = history[-1]
    print("\n| iterations | PQ | PQ_th | PQ_st | SQ | RQ | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {iteration} | {pq['PQ']:.1f} | {pq['PQ_th']:.1f} | {pq['PQ_st']:.1f} | "
        f"{pq['SQ']:.1f} | {pq['RQ']:.1f} | {seconds:.0f} |"
    )
    trajectory = ", ".join(f"{i}: {p['PQ']:.1f}" for i, p, _ in history)
    print(f"PQ after each evaluation (iteration: PQ): {trajectory}")
    verdict = "met" if pq["PQ"] >= args.target_pq else "NOT met"
    print(f"target PQ >= {args.target_pq}: {verdict}")
    return {"iterations": iteration, "seconds": seconds, **pq}


class TargetReached(Exception):
    """Ends training once PQ reaches the target."""


if __name__ == "__main__":
    main()
