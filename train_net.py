#!/usr/bin/env python
"""Train and evaluate Panoptic SegFormer with detectron2.

Examples:
    python train_net.py --config-file configs/r50.yaml --num-gpus 8
    python train_net.py --config-file configs/r50.yaml --num-gpus 8 --resume
    python train_net.py --config-file configs/r50.yaml --eval-only MODEL.WEIGHTS model.pth
    # COCO test-dev: the submission zip for COCO's server, under OUTPUT_DIR/inference/<dataset>
    python train_net.py --config-file configs/r50.yaml --eval-only MODEL.WEIGHTS model.pth \
        DATASETS.TEST "('coco_2017_test-dev_panoptic',)"
    # two machines of 8 GPUs (run on each, with its --machine-rank)
    python train_net.py --config-file configs/swin_l.yaml --num-gpus 8 --num-machines 2 \
        --machine-rank 0 --dist-url tcp://<address of machine 0>:29500
    # the same without GPUs: processes on the CPU talk over gloo
    python train_net.py --config-file configs/r50.yaml --num-gpus 2 MODEL.DEVICE cpu
    # processes started by torchrun (or SLURM through tools/submit.py) join their group
    torchrun --nproc-per-node 8 train_net.py --config-file configs/r50.yaml

detectron2's trainer does the rest (logging, ETA, checkpoints every SOLVER.CHECKPOINT_PERIOD,
evaluation at the end or every TEST.EVAL_PERIOD iterations, AMP with SOLVER.AMP.ENABLED).
"""

from detectron2.engine import default_argument_parser

from panoptic_segformer.d2.engine.train import launch_main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_main(args)
