"""``train_net.py``'s command line, with every rank reporting what it trained (a test helper).

detectron2 logs the losses on the main process only. Here each process also writes
``OUTPUT_DIR/rank<r>.json``: the iterations it ran, per iteration its batch's total loss averaged
over all processes (an all-reduce, so every rank holds the value the main process logs), and a
SHA-256 of its final weights. Used by ``test_distributed.py`` on "machines" that are local
processes:

    python tests/engine/train_net_reporting.py --config-file configs/r50.yaml --num-machines 2 \\
        --machine-rank 0 --dist-url tcp://127.0.0.1:<port> MODEL.DEVICE cpu ...

With ``PSF_TEST_SIGNAL=<signal>:<rank>:<iteration>`` (e.g. ``SIGKILL:1:4``), the process of that
rank sends itself the signal at the end of that iteration, in a run that started at iteration 0
(not in the run that resumes after it): a worker dying, or SLURM's warning before preemption, at
a known point rather than after a sleep.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist
from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils import comm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from panoptic_segformer.d2.engine import train as train_net


class ReportEveryRank(HookBase):
    """Records this process's total loss of each step, all-reduces it, and writes the report
    after training."""

    def before_train(self):
        self.losses, self._last = [], None
        self.trainer.model.register_forward_hook(self._record)

    def _record(self, module, args, output):
        if module.training:
            self._last = sum(output.values()).detach().double()

    def after_step(self):
        total = self._last.clone()
        if comm.get_world_size() > 1:
            dist.all_reduce(total)
        self.losses.append(float(total) / comm.get_world_size())

    def after_train(self):
        digest = hashlib.sha256()
        for name, value in sorted(self.trainer.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        report = {
            "rank": comm.get_rank(),
            "iterations": len(self.losses),
            "losses": self.losses,
            "weights_sha256": digest.hexdigest(),
        }
        path = os.path.join(self.trainer.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}.json")
        with open(path, "w") as f:
            json.dump(report, f)


class SignalAt(HookBase):
    """Sends ``signum`` to this process after ``iteration`` on ``rank``, when training started
    at iteration 0."""

    def __init__(self, signum, rank, iteration):
        self.signum, self.rank, self.iteration = signum, rank, iteration

    def after_step(self):
        if (self.trainer.start_iter, comm.get_rank(), self.trainer.iter) == (
            0,
            self.rank,
            self.iteration,
        ):
            os.kill(os.getpid(), self.signum)


def signal_at(value):
    """The SignalAt hook of ``PSF_TEST_SIGNAL``'s value ``<signal>:<rank>:<iteration>``."""
    name, rank, iteration = value.split(":")
    return SignalAt(signal.Signals[name], int(rank), int(iteration))


class ReportingTrainer(train_net.Trainer):
    def build_hooks(self):
        hooks = super().build_hooks() + [ReportEveryRank()]
        if os.environ.get("PSF_TEST_SIGNAL"):
            hooks.append(signal_at(os.environ["PSF_TEST_SIGNAL"]))
        return hooks


def main(args, hooks=()):
    train_net.Trainer = ReportingTrainer
    return train_net.main(args, hooks)


if __name__ == "__main__":
    train_net.launch_main(default_argument_parser().parse_args(), main)
