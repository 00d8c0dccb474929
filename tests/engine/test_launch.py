"""Launching and stopping, in this process: the process group a launcher describes in the
environment (panoptic_segformer.d2.engine.launch), the backend MODEL.DEVICE picks, the checks on both, and
the checkpoint-and-stop at SLURM's warning signal (panoptic_segformer.d2.engine.preemption). The launches
themselves (torchrun, its restarts, submitit) run in test_distributed.py."""

import argparse
import os
import signal
from datetime import timedelta
from types import SimpleNamespace

import pytest
from skips import require_detectron2

require_detectron2()

import torch.distributed as dist  # noqa: E402
from d2_helpers import free_port  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402

from panoptic_segformer.d2.engine import launch  # noqa: E402
from panoptic_segformer.d2.engine.launch import LauncherRanks, distributed_backend  # noqa: E402
from panoptic_segformer.d2.engine.preemption import StopOnSignal, TrainingStopped  # noqa: E402

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}


def test_the_backend_follows_the_device():
    assert distributed_backend("cpu") == "gloo"
    assert distributed_backend("cuda") == distributed_backend("cuda:1") == "nccl"
    with pytest.raises(ValueError, match="MODEL.DEVICE 'mps': distributed training runs on"):
        distributed_backend("mps")


def test_the_ranks_are_read_from_a_launchers_environment():
    assert launch.launcher_ranks({}) is None
    assert launch.launcher_ranks({"LOCAL_RANK": "0"}) is None  # no launcher's group
    assert launch.launcher_ranks(TORCHRUN) == LauncherRanks(3, 4, 1, 2)
    # one process per machine (a Kubernetes PyTorchJob without LOCAL_*)
    one_each = {k: v for k, v in TORCHRUN.items() if not k.startswith("LOCAL_")}
    assert launch.launcher_ranks(one_each) == LauncherRanks(3, 4, 0, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"MASTER_PORT": None}, "only in part: RANK, WORLD_SIZE, MASTER_ADDR, LOCAL_RANK, "
         "LOCAL_WORLD_SIZE set, MASTER_PORT missing"),
        ({"LOCAL_WORLD_SIZE": None}, "LOCAL_WORLD_SIZE missing"),
        ({"RANK": "three"}, "RANK='three' is not an integer"),
        ({"RANK": "4"}, "RANK=4, WORLD_SIZE=4, .*: ranks out of range"),
        ({"LOCAL_RANK": "0"}, "LOCAL_RANK=0, .*: each machine must run LOCAL_WORLD_SIZE processes "
         "of consecutive ranks"),
        ({"WORLD_SIZE": "5", "RANK": "1"}, "WORLD_SIZE=5, .*consecutive ranks"),
    ],
)  # fmt: skip
def test_a_partial_or_inconsistent_environment_is_refused(change, message):
    environ = {k: v for k, v in {**TORCHRUN, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        launch.launcher_ranks(environ)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in [*TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def spawns_seeing(monkeypatch):
    """Replaces detectron2's launch by one that records the CUDA_VISIBLE_DEVICES its processes
    would inherit."""
    seen = []
    monkeypatch.setattr(
        launch,
        "detectron2_launch",
        lambda main, num_gpus, **kwargs: seen.append(os.environ.get("CUDA_VISIBLE_DEVICES")),
    )
    return seen


def test_cpu_processes_are_spawned_seeing_no_gpu(no_launcher):
    # detectron2's launch picks NCCL whenever its processes see a GPU
    no_launcher.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    seen = spawns_seeing(no_launcher)
    two = default_argument_parser().parse_args(["--num-gpus", "2"])
    launch.launch(None, two, "cpu")
    launch.launch(None, two, "cuda")
    launch.launch(None, default_argument_parser().parse_args([]), "cpu")  # nothing spawned
    assert seen == ["", "0,1", "0,1"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    no_launcher.delenv("CUDA_VISIBLE_DEVICES")
    launch.launch(None, two, "cpu")
    assert seen[-1] == "" and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_launchers_processes_take_no_process_flags(no_launcher):
    for name, value in TORCHRUN.items():
        no_launcher.setenv(name, value)
    args = default_argument_parser().parse_args(["--num-gpus", "2", "--machine-rank", "1"])
    with pytest.raises(ValueError, match=r"^--num-gpus 2, --machine-rank 1: this process was "
                       r"started by a launcher \(RANK=3, WORLD_SIZE=4\)"):  # fmt: skip
        launch.launch(None, args, "cpu")


@pytest.mark.parametrize("restarted", [False, True])
def test_a_restarted_group_resumes(no_launcher, restarted):
    for name, value in TORCHRUN.items():
        no_launcher.setenv(name, value)
    joined = []
    no_launcher.setattr(
        launch, "join_process_group", lambda ranks, device: joined.append(ranks) or restarted
    )
    args = default_argument_parser().parse_args([])
    result = launch.launch(lambda run: ("ran", run.resume), args, "cpu")
    assert joined == [LauncherRanks(3, 4, 1, 2)]
    assert result == ("ran", restarted)
    assert args.resume is False  # the caller's arguments are left as they were
    # an evaluation's arguments (tools/eval_robustness.py: no --resume) stay as they are
    evaluation = argparse.Namespace(num_gpus=1, num_machines=1, machine_rank=0)
    assert launch.launch(lambda run: vars(run), evaluation, "cpu") == vars(evaluation)


def test_each_group_of_an_agents_store_gets_keys_of_its_own(no_launcher):
    # torch elastic's agent serves one store for all its groups; the processes of each group
    # (two a group here) agree on its number, from which their keys are prefixed
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30))
    no_launcher.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", str(port))
    joins = [launch._agent_store(LauncherRanks(r % 2, 2, r % 2, 2)) for r in range(6)]
    assert [generation for _, generation in joins] == [0, 0, 1, 1, 2, 2]
    joins[2][0].set("key", "group 1")
    assert not joins[0][0].check(["key"]) and joins[3][0].get("key") == b"group 1"
    assert server.get("panoptic_segformer/joined") == b"6"
    no_launcher.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    no_launcher.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # env:// makes its own store
    assert launch._agent_store(LauncherRanks(0, 2, 0, 2)) == (None, 2)


# --- the stop at SLURM's warning signal -----------------------------------------------------


class Checkpoints:
    """A checkpointer that records what it was asked to save."""

    def __init__(self):
        self.saved = []

    def save(self, name, **extra):
        self.saved.append((name, extra))


@pytest.fixture
def stop_on_signal():
    """A StopOnSignal(SIGUSR2) on a stand-in trainer at iteration 2 of 5, around its training;
    the handler before it is restored afterwards."""
    before = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    hook = StopOnSignal(signal.SIGUSR2)
    hook.trainer = SimpleNamespace(iter=2, max_iter=5, checkpointer=Checkpoints())
    hook.before_train()
    yield hook
    hook.after_train()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    signal.signal(signal.SIGUSR2, before)


def test_training_goes_on_without_the_signal(stop_on_signal):
    stop_on_signal.after_step()
    assert stop_on_signal.trainer.checkpointer.saved == []


def test_the_signal_checkpoints_the_iteration_and_stops(stop_on_signal):
    os.kill(os.getpid(), signal.SIGUSR2)  # only marks the process: the step goes on
    assert stop_on_signal.received
    with pytest.raises(TrainingStopped, match="after iteration 2") as stopped:
        stop_on_signal.after_step()
    assert stopped.value.iteration == 2
    assert not isinstance(stopped.value, Exception)  # detectron2 logs Exceptions as failures
    # named and filled as detectron2's periodic checkpoints, which --resume continues from
    assert stop_on_signal.trainer.checkpointer.saved == [("model_0000002", {"iteration": 2})]


def test_the_last_iteration_finishes_training_instead(stop_on_signal):
    os.kill(os.getpid(), signal.SIGUSR2)
    stop_on_signal.trainer.iter = 4
    stop_on_signal.after_step()
    assert stop_on_signal.trainer.checkpointer.saved == []
