#!/usr/bin/env python
"""Train and evaluate Panoptic SegFormer with detectron2.

Examples:
    python train_net.py --config-file configs/r50.yaml --num-gpus 8
    python train_net.py --config-file configs/r50.yaml --num-gpus 8 --resume
    python train_net.py --config-file configs/r50.yaml --eval-only MODEL.WEIGHTS model.pth
    # two machines of 8 GPUs (run on each, with its --machine-rank)
    python train_net.py --config-file configs/swin_l.yaml --num-gpus 8 --num-machines 2 \
        --machine-rank 0 --dist-url tcp://<address of machine 0>:29500

detectron2's trainer does the rest (logging, ETA, checkpoints every SOLVER.CHECKPOINT_PERIOD,
evaluation at the end or every TEST.EVAL_PERIOD iterations, AMP with SOLVER.AMP.ENABLED).
"""

import logging
import os
import weakref

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    verify_results,
)
from detectron2.utils import comm

from panoptic_segformer import PanopticSegFormerCheckpointer
from panoptic_segformer.config import get_config
from panoptic_segformer.data import PanopticSegFormerDatasetMapper
from panoptic_segformer.evaluation import PanopticInstanceEvaluator, check_panoptic_dataset
from panoptic_segformer.solver import build_optimizer


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with Panoptic SegFormer's data, optimiser, evaluators and
    checkpointer."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # loads MODEL.WEIGHTS / resumes, raising on missing or mismatched weights, and saves
        # atomically: the periodic checkpoints too, whose hook detectron2 built with its own
        self.checkpointer = PanopticSegFormerCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    def resume_or_load(self, resume=True):
        if not (resume and self.checkpointer.has_checkpoint()):
            message = random_init_warning(self.cfg)
            if message:
                logging.getLogger("detectron2").warning(message)
        super().resume_or_load(resume=resume)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=PanopticSegFormerDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = PanopticSegFormerDatasetMapper(cfg, False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOPanopticEvaluator, COCOEvaluator (instance masks and boxes, where the dataset
        has an instances json; :class:`PanopticInstanceEvaluator`) and SemSegEvaluator (where
        it has semantic ground truth), as the results enabled by
        MODEL.PANOPTIC_SEGFORMER.TEST.*_ON."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        check_panoptic_dataset(dataset_name)
        metadata = MetadataCatalog.get(dataset_name)
        test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
        evaluators = []
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if test.INSTANCE_ON and metadata.get("json_file", None):
            evaluators.append(PanopticInstanceEvaluator(dataset_name, output_dir=output_folder))
        if test.SEMANTIC_ON and metadata.get("sem_seg_root", None):
            evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_folder))
        if not evaluators:
            raise ValueError(
                f"nothing to evaluate on {dataset_name!r}: enable MODEL.PANOPTIC_SEGFORMER.TEST."
                "PANOPTIC_ON (or INSTANCE_ON with an instances json, SEMANTIC_ON with semantic "
                "ground truth)"
            )
        return DatasetEvaluators(evaluators)


def random_init_warning(cfg):
    """What starts from random weights when training begins without a checkpoint, or None."""
    if cfg.MODEL.WEIGHTS:
        return None
    if cfg.MODEL.BACKBONE.NAME == "D2TimmBackbone":
        if cfg.MODEL.TIMM.PRETRAINED:
            return None
        hint = "set MODEL.TIMM.PRETRAINED to a local ImageNet checkpoint of " + cfg.MODEL.TIMM.NAME
    else:
        hint = "set MODEL.WEIGHTS, e.g. detectron2://ImageNetPretrained/torchvision/R-50.pkl"
    return (
        "MODEL.WEIGHTS is empty and no pretrained backbone is given: the whole model, backbone "
        f"included, starts from random weights ({hint})"
    )


def setup(args):
    """The config of the command line: the file, then the overrides."""
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    """Trains (or evaluates with ``--eval-only``); returns the evaluation results."""
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("--eval-only needs trained weights: set MODEL.WEIGHTS")
        model = Trainer.build_model(cfg)
        PanopticSegFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # detectron2's evaluation hook keeps the results of the evaluation after the last iteration
    return getattr(trainer, "_last_eval_results", None)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
