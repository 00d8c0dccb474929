"""Starting the processes of a distributed run, or joining those a launcher started.

There are two ways to get one process per GPU (or several on the CPU):

* ``train_net.py --num-gpus N [--num-machines M --machine-rank R --dist-url URL]``: detectron2's
  ``launch`` spawns the N processes of this machine.
* A launcher starts the processes itself and tells each its place in the environment, as
  ``torchrun`` does (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``; also torch elastic, Kubernetes' PyTorchJob, and SLURM through
  ``tools/submit.py``). Each process then joins the group they describe (``env://``, or the
  store of torch elastic's agent) and spawns nothing. After torch elastic restarted the group
  (``torchrun --max-restarts``), it resumes from the last checkpoint.

Either way the backend follows ``MODEL.DEVICE``: NCCL for CUDA, gloo for the CPU. detectron2's
``launch`` picks NCCL whenever ``torch.cuda.is_available()``, so CPU processes on a machine with
GPUs would fail; it spawns them here with the GPUs hidden from them.
"""

import argparse
import contextlib
import functools
import os
import sys
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = [
    "LauncherRanks",
    "distributed_backend",
    "elastic_restarts",
    "join_process_group",
    "launch",
    "launcher_ranks",
]

# detectron2's launch waits as long for its processes
TIMEOUT = timedelta(minutes=30)
# the variables a launcher sets, and whether a process started by one can do without them
_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LOCAL = ("LOCAL_RANK", "LOCAL_WORLD_SIZE")  # both or neither: without them, one per machine
_RESTARTS = "TORCHELASTIC_RESTART_COUNT"


class LauncherRanks(NamedTuple):
    """A process's place in a group a launcher started."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def distributed_backend(device: str) -> str:
    """The process-group backend for a model on ``device`` (``MODEL.DEVICE``).

    Raises:
        ValueError: a device that is neither CUDA nor the CPU.
    """
    kind = torch.device(device).type
    backends = {"cuda": "nccl", "cpu": "gloo"}
    if kind not in backends:
        raise ValueError(
            f"MODEL.DEVICE {device!r}: distributed training runs on CUDA (NCCL) or the CPU (gloo)"
        )
    return backends[kind]


def _integer(environ: Dict[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer") from None


def launcher_ranks(environ: Optional[Dict[str, str]] = None) -> Optional[LauncherRanks]:
    """This process's place in the group a launcher describes in ``environ`` (default
    ``os.environ``), or None when no launcher started it (none of ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` is set).

    Raises:
        ValueError: a partial or inconsistent description, naming the variables and values.
    """
    environ = os.environ if environ is None else environ
    if not any(name in environ for name in _REQUIRED):
        return None
    local = [name for name in _LOCAL if name in environ]
    missing = [name for name in _REQUIRED + (_LOCAL if local else ()) if name not in environ]
    if missing:
        present = [name for name in _REQUIRED + _LOCAL if name in environ]
        raise ValueError(
            f"the environment describes a process group only in part: {', '.join(present)} "
            f"set, {', '.join(missing)} missing (torchrun sets them all)"
        )
    rank, world_size = _integer(environ, "RANK"), _integer(environ, "WORLD_SIZE")
    local_rank, local_size = (_integer(environ, name) for name in _LOCAL) if local else (0, 1)
    description = (
        f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}, "
        f"LOCAL_WORLD_SIZE={local_size}"
    )
    if not (0 <= rank < world_size and 0 <= local_rank < local_size <= world_size):
        raise ValueError(f"{description}: ranks out of range")
    # detectron2's per-machine groups (comm.create_local_process_group) take the ranks of a
    # machine to be consecutive, as torchrun and SLURM's default block distribution give them
    if world_size % local_size or rank % local_size != local_rank:
        raise ValueError(
            f"{description}: each machine must run LOCAL_WORLD_SIZE processes of consecutive "
            "ranks (SLURM: the default block distribution of tasks)"
        )
    return LauncherRanks(rank, world_size, local_rank, local_size)


def elastic_restarts() -> int:
    """How many times torch elastic restarted the group (0 outside torchrun)."""
    return _integer(os.environ, _RESTARTS) if _RESTARTS in os.environ else 0


def _agent_store(ranks: LauncherRanks) -> Tuple[Optional[dist.Store], int]:
    """The store torch elastic's agent serves (``TORCHELASTIC_USE_AGENT_STORE``), under a prefix
    of this group's own, and how many groups this torchrun started before; (None, its restart
    count) without one (``env://`` then makes a store of its own)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None, elastic_restarts()
    # the agent keeps one store through all restarts of the group, and workers that join it
    # without a prefix of their own read the addresses their dead predecessors left there and
    # hang (pytorch/pytorch#135712; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is torch's way round)
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _integer(os.environ, "MASTER_PORT"),
        ranks.world_size,
        is_master=False,
        timeout=TIMEOUT,
    )
    # the n-th process to join belongs to group (n - 1) // world_size: a number all processes
    # of a group agree on, where each agent's restart count counts its own workers' failures
    generation = (client.add("panoptic_segformer/joined", 1) - 1) // ranks.world_size
    return dist.PrefixStore(f"panoptic_segformer/group_{generation}", client), generation


def join_process_group(ranks: LauncherRanks, device: str) -> bool:
    """Joins the group a launcher described with the backend of ``device``, and sets up
    detectron2's per-machine group (``comm.get_local_rank`` and the like). Returns whether
    torch elastic started this group after an earlier one failed (every process gets the same
    answer)."""
    backend = distributed_backend(device)
    if backend == "nccl":
        # a task sees all the machine's GPUs (torchrun) or only its own (SLURM's GPU binding)
        torch.cuda.set_device(ranks.local_rank if torch.cuda.device_count() > 1 else 0)
    store, generation = _agent_store(ranks)
    dist.init_process_group(
        backend,
        init_method="env://" if store is None else None,
        store=store,
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=TIMEOUT,
    )
    comm.create_local_process_group(ranks.local_world_size)
    return any(comm.all_gather(generation > 0))


@contextlib.contextmanager
def _gpus_hidden() -> Iterator[None]:
    """Processes spawned inside see no GPU."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _run_and_leave_the_group(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace):
    """``main(args)`` in a spawned process, then the process groups destroyed: left to the
    interpreter's exit, gloo's threads are torn down while still joinable, and the process can
    abort ("terminate called without an active exception") after its work is done."""
    try:
        return main(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launch(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, device: str) -> Any:
    """Runs ``main(args)`` in every process of the run ``args`` (detectron2's
    ``default_argument_parser``) describes, with the backend of ``device``; returns its result in
    a process a launcher started (detectron2's ``launch`` returns none).

    Raises:
        ValueError: ``--num-gpus``, ``--num-machines`` or ``--machine-rank`` given to a process a
            launcher started (the launcher chose the processes), or a bad launcher environment.
    """
    ranks = launcher_ranks()
    if ranks is None:
        spawns = args.num_gpus * args.num_machines > 1
        hidden = _gpus_hidden() if spawns and distributed_backend(device) == "gloo" else None
        with hidden or contextlib.nullcontext():
            return detectron2_launch(
                functools.partial(_run_and_leave_the_group, main),
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    given = {
        "--num-gpus": (args.num_gpus, 1),
        "--num-machines": (args.num_machines, 1),
        "--machine-rank": (args.machine_rank, 0),
    }
    given = [f"{flag} {value}" for flag, (value, default) in given.items() if value != default]
    if given:
        raise ValueError(
            f"{', '.join(given)}: this process was started by a launcher (RANK={ranks.rank}, "
            f"WORLD_SIZE={ranks.world_size}), which chose the processes; leave these out"
        )
    # torch elastic restarted the group (a process died): a training goes on from the last
    # checkpoint (arguments without --resume, an evaluation's, are left as they are)
    if join_process_group(ranks, device) and getattr(args, "resume", None) is False:
        if comm.is_main_process():
            print("the group was restarted: resuming from the last checkpoint", file=sys.stderr)
        args = argparse.Namespace(**{**vars(args), "resume": True})
    return main(args)
