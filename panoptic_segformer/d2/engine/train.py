"""Training and evaluation with detectron2's trainer: :class:`Trainer` (Panoptic SegFormer's
data, optimiser, evaluators and checkpointer), :func:`main` (train, or evaluate with
``--eval-only``) and :func:`launch_main` (``main`` in every process of the run). ``train_net.py``
is the command line over these.
"""

import argparse
import inspect
import json
import logging
import math
import os
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
)
from detectron2.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    verify_results,
)
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from panoptic_segformer.d2.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.d2.class_info import class_info_of_config
from panoptic_segformer.d2.config import get_config
from panoptic_segformer.d2.data import PanopticSegFormerDatasetMapper
from panoptic_segformer.d2.data.train_loader import ResumableTrainLoader
from panoptic_segformer.d2.engine.launch import launch
from panoptic_segformer.d2.evaluation import (
    SUBMISSION_EVALUATOR_TYPE,
    BoundaryPanopticEvaluator,
    COCOPanopticSubmissionWriter,
    PanopticInstanceEvaluator,
    check_panoptic_dataset,
)
from panoptic_segformer.d2.registration import register
from panoptic_segformer.d2.solver import build_optimizer


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with Panoptic SegFormer's data, optimiser, evaluators and
    checkpointer."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, written out: it is the narrowest method that wraps the
        # model, and detectron2 0.6 has no hook there. Its create_ddp_model gives DDP the local
        # rank as device_ids, which DDP refuses for a CPU model (multi-process training on gloo),
        # so super().__init__ cannot run with several CPU processes; nor is there a
        # build_checkpointer: ours (loads MODEL.WEIGHTS / resumes raising on missing or
        # mismatched weights, saves atomically) is built here, before build_hooks hands it to
        # the PeriodicCheckpointer, so nothing is swapped after construction
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # the checkpoints carry the dataset's class names: the demo draws from them
        self.checkpointer = PanopticSegFormerCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            class_info=class_info_of_config(cfg),
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        if not (resume and self.checkpointer.has_checkpoint()):
            message = random_init_warning(self.cfg)
            if message:
                logging.getLogger("detectron2").warning(message)
        super().resume_or_load(resume=resume)
        # a resumed run goes on with the images after those the checkpoint's iterations used
        self._trainer.data_loader.start_at(self.start_iter)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's training loader, whose stream a resumed run continues
        (:class:`ResumableTrainLoader`)."""
        return ResumableTrainLoader(cfg, PanopticSegFormerDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = PanopticSegFormerDatasetMapper(cfg, False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOPanopticEvaluator (and :class:`BoundaryPanopticEvaluator` with
        TEST.BOUNDARY_PQ), COCOEvaluator (instance masks and boxes, where the dataset has an
        instances json; :class:`PanopticInstanceEvaluator`) and SemSegEvaluator (where it has
        semantic ground truth), as the results enabled by MODEL.PANOPTIC_SEGFORMER.TEST.*_ON;
        for a dataset without ground truth (COCO test-dev), :class:`COCOPanopticSubmissionWriter`
        alone, which writes the panoptic predictions for COCO's evaluation server."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        metadata = MetadataCatalog.get(dataset_name)
        test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
        if metadata.get("evaluator_type", None) == SUBMISSION_EVALUATOR_TYPE:
            if not test.PANOPTIC_ON:
                raise ValueError(
                    f"{dataset_name!r} has no ground truth: its panoptic predictions are written "
                    "as a COCO submission, which needs MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON"
                )
            return COCOPanopticSubmissionWriter(
                dataset_name, output_folder, cfg.TEST.SUBMISSION_NAME
            )
        check_panoptic_dataset(dataset_name)
        evaluators = []
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
            if cfg.TEST.BOUNDARY_PQ:
                evaluators.append(BoundaryPanopticEvaluator(dataset_name))
        if test.INSTANCE_ON and _ground_truth(metadata, "json_file", "instances json"):
            evaluators.append(PanopticInstanceEvaluator(dataset_name, output_dir=output_folder))
        if test.SEMANTIC_ON and _ground_truth(metadata, "sem_seg_root", "semantic ground truth"):
            evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_folder))
        if not evaluators:
            raise ValueError(
                f"nothing to evaluate on {dataset_name!r}: enable MODEL.PANOPTIC_SEGFORMER.TEST."
                "PANOPTIC_ON (or INSTANCE_ON with an instances json, SEMANTIC_ON with semantic "
                "ground truth)"
            )
        return DatasetEvaluators(evaluators)


def _ground_truth(metadata, key: str, what: str) -> bool:
    """Whether the dataset names its ``key`` ground truth and it exists; a named but missing one
    (detectron2 registers COCO's instances json whether or not it was downloaded) is skipped
    with a warning rather than failing the evaluation at the end of training."""
    path = metadata.get(key, None)
    if not path:
        return False
    if PathManager.exists(path):
        return True
    logging.getLogger("detectron2").warning(
        f"{metadata.name}: the {what} {path} does not exist; evaluating without it"
    )
    return False


def create_ddp_model(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else as it is.

    Every trainable parameter gets a gradient in every iteration, whatever the config and the
    batch (tested), so DDP needs no ``find_unused_parameters`` search. A CUDA model is given the
    GPU it is on (detectron2's ``create_ddp_model`` gives the local rank, which is not that GPU's
    index where each process sees only its own, as under SLURM's GPU binding); a CPU model,
    trained on gloo with ``MODEL.DEVICE cpu``, must be given none, which DDP requires of CPU
    modules.
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    # the buffers (frozen batch-norm statistics, class maps) never change: no broadcast before
    # every forward (torch >= 2.13 names the switch forward_sync_buffers)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        no_sync = {"forward_sync_buffers": False}
    else:
        no_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)


def build_step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """detectron2's loop of one iteration: ``AMPTrainer`` (float16 autocast and gradient
    scaling) with ``SOLVER.AMP.ENABLED``, else ``SimpleTrainer``.

    Raises:
        ValueError: ``SOLVER.AMP.ENABLED`` on a model that is not on CUDA (detectron2's AMP
            trainer autocasts CUDA only; the CPU runs in float32).
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.ENABLED True needs a CUDA model, but MODEL.DEVICE is "
            f"{cfg.MODEL.DEVICE!r} (parameters on {device}): detectron2's AMPTrainer autocasts "
            "CUDA only; train on the CPU with SOLVER.AMP.ENABLED False"
        )
    return AMPTrainer(model, data_loader, optimizer)


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
    register()
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # the package's own log lines (the submission's path, the dataset mapper, the kernels in use)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="panoptic_segformer")
    share_cpu_threads(cfg)
    return cfg


def share_cpu_threads(cfg) -> None:
    """Several training processes on the CPU of one machine share its cores, rather than each
    starting one thread per core (torchrun's rule; set OMP_NUM_THREADS to choose)."""
    local = comm.get_local_size()
    if cfg.MODEL.DEVICE != "cpu" or local < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, torch.get_num_threads() // local)
    torch.set_num_threads(threads)
    logging.getLogger("detectron2").info(
        f"{local} processes share this machine's CPU: {threads} threads each"
    )


def main(args: argparse.Namespace, hooks: Sequence[HookBase] = ()) -> Any:
    """Trains (or evaluates with ``--eval-only``); returns the evaluation results, which the
    main process also writes to ``OUTPUT_DIR/inference/results.json``. ``hooks`` are added to
    the trainer's own (``tools/submit.py``: checkpoint and stop at SLURM's warning signal)."""
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("--eval-only needs trained weights: set MODEL.WEIGHTS")
        model = Trainer.build_model(cfg)
        PanopticSegFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model.prepare_for_inference())
        if comm.is_main_process():
            verify_results(cfg, results)
    else:
        trainer = Trainer(cfg)
        trainer.register_hooks(hooks)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # detectron2's evaluation hook keeps the results of the evaluation after the last
        # iteration
        results = getattr(trainer, "_last_eval_results", None)
    if results and comm.is_main_process():
        write_results(results, os.path.join(cfg.OUTPUT_DIR, "inference", "results.json"))
    return results


def write_results(results, path: str) -> None:
    """Evaluation results (task -> metric -> value, or dataset -> task -> metric -> value with
    several test datasets) as JSON; NaN (COCO's AP where nothing matches) is written as null."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    PathManager.mkdirs(os.path.dirname(path))
    with PathManager.open(path, "w") as f:
        json.dump(clean(results), f, indent=2, default=float)


def launch_main(
    args: argparse.Namespace, main_func: Optional[Callable[[argparse.Namespace], Any]] = None
) -> Any:
    """``main_func`` (default :func:`main`) in every process of the run: spawned here for
    ``--num-gpus`` / ``--num-machines``, or this process in the group torchrun (or another
    launcher) started; the backend follows ``MODEL.DEVICE``
    (:mod:`panoptic_segformer.d2.engine.launch`).
    """
    device = get_config(args.config_file, args.opts).MODEL.DEVICE
    return launch(main_func or main, args, device)
