#!/usr/bin/env python
"""Submits train_net.py's training to SLURM through submitit, one task per GPU.

    python tools/submit.py --config-file configs/r50.yaml --nodes 2 --gpus-per-node 8 \\
        --partition P --timeout 72:00:00 [train_net.py's options and config overrides]
    python tools/submit.py ... --dry-run   # prints the sbatch script, submits nothing
    # the same job as processes on this machine (submitit's local executor), e.g. on the CPU
    python tools/submit.py --config-file configs/r50.yaml --cluster local --gpus-per-node 0 \\
        --tasks-per-node 2 MODEL.DEVICE cpu

Needs ``pip install -e ".[cluster]"`` (submitit). Each task joins the process group SLURM's
environment describes (the first node's address, a port drawn from the job id, the task's rank;
:mod:`panoptic_segformer.d2.engine.launch`) and runs train_net's ``main``. ``OUTPUT_DIR`` is the
job's folder, ``<--job-dir>/<job id>``, beside submitit's logs (an ``OUTPUT_DIR`` override wins).

Preemption and the time limit: the job asks SLURM for a warning signal ``--signal-delay`` seconds
ahead (``--signal=USR2@120``) and to be requeued (``--requeue``). At the warning the tasks
checkpoint the iteration in progress and stop (:mod:`panoptic_segformer.d2.engine.preemption`), and
the job requeues itself with ``--resume``, under the same job id and folder: the requeued job goes
on from that checkpoint with its iteration, optimizer, scheduler and data stream. A job is
requeued at most ``--max-timeouts`` times for its time limit; preemptions are not counted.
"""

import argparse
import functools
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import submitit
from detectron2.engine import default_argument_parser
from submitit.slurm.slurm import _make_sbatch_string  # the script SlurmExecutor submits

ROOT = Path(__file__).resolve().parents[1]
from panoptic_segformer.d2.config import get_config
from panoptic_segformer.d2.engine import train as train_net
from panoptic_segformer.d2.engine.launch import distributed_backend
from panoptic_segformer.d2.engine.preemption import StopOnSignal, TrainingStopped
from panoptic_segformer.d2.registration import register

# train_net.py's ways of choosing processes, which are the job's here
LAUNCH_FLAGS = {
    "num_gpus": "--num-gpus",
    "num_machines": "--num-machines",
    "machine_rank": "--machine-rank",
    "dist_url": "--dist-url",
}


def get_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(__doc__.split("\n")[0])
    parser.set_defaults(**{name: None for name in LAUNCH_FLAGS})
    job = parser.add_argument_group("the job")
    job.add_argument("--cluster", choices=("slurm", "local"), default="slurm")
    job.add_argument("--nodes", type=int, default=1)
    job.add_argument("--gpus-per-node", type=int, default=8)
    job.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node")
    job.add_argument("--cpus-per-task", type=int, help="default: DATALOADER.NUM_WORKERS + 1")
    job.add_argument("--mem-gb", type=int, help="memory per node (default: the partition's)")
    job.add_argument("--partition")
    job.add_argument("--timeout", default="72:00:00", help="minutes, H:MM:SS or D-HH:MM:SS")
    job.add_argument("--job-name", default="panoptic_segformer")
    job.add_argument("--job-dir", default="output/jobs", help="a folder every node can reach")
    job.add_argument("--signal-delay", type=int, default=120, help="warning before the end (s)")
    job.add_argument("--max-timeouts", type=int, default=20)
    job.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="any other sbatch option, e.g. --slurm account=abc --slurm qos=high",
    )
    job.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    return parser


def minutes(timeout: str) -> int:
    """A time limit in SLURM's formats (minutes, H:MM:SS, D-HH:MM:SS) in whole minutes."""
    if timeout.isdigit():
        total = int(timeout)
    else:
        match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", timeout)
        if not match:
            raise ValueError(f"--timeout {timeout!r}: give minutes, H:MM:SS or D-HH:MM:SS")
        days, hours, mins, secs = (int(group or 0) for group in match.groups())
        total = (days * 24 + hours) * 60 + mins + (secs > 0)
    if total < 1:
        raise ValueError(f"--timeout {timeout!r}: the job needs at least a minute")
    return total


def sbatch_options(values: Sequence[str]) -> Dict[str, Any]:
    """``--slurm`` values: ``option=value``, or a bare ``option`` for a switch."""
    options: Dict[str, Any] = {}
    for value in values:
        key, equals, setting = value.partition("=")
        if not key or (equals and not setting):
            raise ValueError(f"--slurm {value!r}: give OPTION=VALUE (or a bare OPTION)")
        options[key.lstrip("-")] = setting if equals else True
    return options


def tasks_per_node(args: argparse.Namespace, cfg) -> int:
    """The job's tasks per node, after checking the job's shape against the config.

    Raises:
        ValueError: naming the flag (or config key) and its bad value.
    """
    given = [
        f"{flag} {getattr(args, name)}"
        for name, flag in LAUNCH_FLAGS.items()
        if getattr(args, name) is not None
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: the job's processes are --nodes x --tasks-per-node; leave "
            "these out"
        )
    tasks = args.gpus_per_node if args.tasks_per_node is None else args.tasks_per_node
    tasks_flag = "--tasks-per-node" + (
        " (default: --gpus-per-node)" * (args.tasks_per_node is None)
    )
    for flag, value, least in (
        ("--nodes", args.nodes, 1),
        ("--gpus-per-node", args.gpus_per_node, 0),
        (tasks_flag, tasks, 1),
        ("--signal-delay", args.signal_delay, 1),
        ("--max-timeouts", args.max_timeouts, 0),
    ):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    device = cfg.MODEL.DEVICE
    if distributed_backend(device) == "nccl" and tasks != args.gpus_per_node:
        raise ValueError(
            f"MODEL.DEVICE {device!r} runs one task per GPU, but --tasks-per-node is {tasks} "
            f"and --gpus-per-node {args.gpus_per_node}"
        )
    if args.cluster == "local" and args.nodes != 1:
        raise ValueError(f"--cluster local runs on this machine only, got --nodes {args.nodes}")
    processes = args.nodes * tasks
    if not args.eval_only and cfg.SOLVER.IMS_PER_BATCH % processes:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} does not split over the job's "
            f"{processes} processes (--nodes {args.nodes} x --tasks-per-node {tasks})"
        )
    return tasks


def job_parameters(args: argparse.Namespace, cfg) -> Dict[str, Any]:
    """The executor's parameters: sbatch's options under submitit's ``SlurmExecutor`` names, or
    those of its ``LocalExecutor``."""
    tasks = tasks_per_node(args, cfg)
    # the tasks import train_net (the class of the job, and its main, are pickled by reference)
    setup = [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    shared = {"nodes": args.nodes, "signal_delay_s": args.signal_delay, "setup": setup}
    if args.cluster == "local":
        return {
            **shared,
            "name": args.job_name,
            "tasks_per_node": tasks,
            "gpus_per_node": args.gpus_per_node,
            "timeout_min": minutes(args.timeout),
        }
    optional = {
        "gpus_per_node": args.gpus_per_node or None,
        "partition": args.partition,
        "mem": f"{args.mem_gb}GB" if args.mem_gb else None,
    }
    return {
        **shared,
        **{key: value for key, value in optional.items() if value is not None},
        "job_name": args.job_name,
        "ntasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task or cfg.DATALOADER.NUM_WORKERS + 1,
        "time": minutes(args.timeout),
        # scontrol requeue, which submitit runs at the warning signal, needs a requeueable job
        "additional_parameters": {"requeue": True, **sbatch_options(args.slurm)},
    }


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """train_net.py's arguments for each task: the job's, one process each (the job's tasks
    are the processes)."""
    defaults = vars(default_argument_parser().parse_args([]))
    given = {key: getattr(args, key) for key in defaults if key not in LAUNCH_FLAGS}
    return argparse.Namespace(**{**defaults, **given})


class TrainingJob:
    """train_net's ``main`` in one task of the job. submitit calls it in every task, and calls
    :meth:`checkpoint` on the first task when the job is to be requeued.

    Args:
        args: train_net.py's arguments (:func:`training_args`).
        main: what runs in each task, ``main(args, hooks)``; default ``train_net.main``.
    """

    def __init__(self, args: argparse.Namespace, main: Optional[Callable[..., Any]] = None) -> None:
        self.args = args
        self.main = main or train_net.main

    def __call__(self) -> Any:
        environment = submitit.JobEnvironment()
        # RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the first node) and
        # MASTER_PORT (drawn from the job id: the same after a requeue)
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        args = self.args
        if "OUTPUT_DIR" not in args.opts[::2]:
            opts = args.opts + ["OUTPUT_DIR", str(environment.paths.folder)]
            args = argparse.Namespace(**{**vars(args), "opts": opts})
        signum = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        # submitit's handler of the warning: on the first task, self.checkpoint() and requeue
        requeue = signal.getsignal(signum)
        main = functools.partial(self.main, hooks=[StopOnSignal(signum)])
        try:
            return train_net.launch_main(args, main)
        except TrainingStopped:
            if environment.global_rank == 0:
                requeue(signum, None)  # exits
            # the other tasks end here; the requeued job (SLURM's scontrol requeue, or the
            # local executor) starts them all again
            return None

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """The job to requeue: the same, resuming from the last checkpoint."""
        resumed = argparse.Namespace(**{**vars(self.args), "resume": True})
        return submitit.helpers.DelayedSubmission(TrainingJob(resumed, self.main))


def submit(
    args: argparse.Namespace, main: Optional[Callable[..., Any]] = None
) -> Optional[submitit.Job]:
    """Submits the job ``args`` (:func:`get_parser`'s) describes, running ``main`` (default
    ``train_net.main``) in each task; with ``--dry-run`` prints the sbatch script (or the local
    executor's parameters) and returns None.

    Raises:
        ValueError: a bad flag or a job that does not fit the config, naming the value.
    """
    register()
    cfg = get_config(args.config_file, args.opts)
    parameters = job_parameters(args, cfg)
    folder = Path(args.job_dir).resolve() / "%j"
    if args.dry_run:
        if args.cluster == "local":
            print(parameters)
        else:
            command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"
            print(_make_sbatch_string(command=command, folder=folder, **parameters))
        return None
    executors = {"slurm": submitit.SlurmExecutor, "local": submitit.LocalExecutor}
    executor = executors[args.cluster](folder=folder, max_num_timeout=args.max_timeouts)
    executor.update_parameters(**parameters)
    job = executor.submit(TrainingJob(training_args(args), main))
    print(f"submitted job {job.job_id}: logs and OUTPUT_DIR in {job.paths.folder}")
    return job


def main(argv: Optional[Sequence[str]] = None) -> Optional[submitit.Job]:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        return submit(args)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
