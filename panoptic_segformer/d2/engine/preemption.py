"""Stopping training at a signal with a checkpoint, for a job that is requeued and resumes.

SLURM warns a job before it preempts it or its time limit ends: ``sbatch --signal=USR2@120``
sends SIGUSR2 to every task two minutes ahead (``tools/submit.py`` asks for it through
submitit). :class:`StopOnSignal` turns that warning into a checkpoint of the iteration in
progress: the signal only marks the process; after each step the processes agree (one of them
marked is enough), the main process saves ``model_<iteration>.pth`` as the periodic checkpointer
does (model, optimizer, scheduler, iteration), and every process leaves the training loop with
:class:`TrainingStopped` (a signal during the last iteration lets training finish instead). The
job is then requeued, and ``--resume`` goes on from that checkpoint.
"""

import logging
import signal
from typing import Any, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["StopOnSignal", "TrainingStopped"]

logger = logging.getLogger(__name__)


class TrainingStopped(BaseException):
    """Raised in every process by :class:`StopOnSignal` once the checkpoint is written.

    A ``BaseException``, as ``KeyboardInterrupt``: stopping is no failure, and detectron2's
    training loop logs every ``Exception`` as one.

    Attributes:
        iteration: the last iteration trained (the checkpoint's).
    """

    def __init__(self, iteration: int) -> None:
        super().__init__(f"training stopped by a signal after iteration {iteration}")
        self.iteration = iteration


class StopOnSignal(HookBase):
    """Checkpoints and stops training at the end of the step in which a process received
    ``signum`` (see module).

    Args:
        signum: the signal, e.g. ``signal.SIGUSR2``; its handler is this hook's during training,
            and the one before it again afterwards.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.received = False
        self._previous: Any = None

    def _mark(self, signum: int, frame: Optional[Any]) -> None:
        # only a mark: the step in progress finishes, every process stops after the same one
        self.received = True

    def before_train(self) -> None:
        self._previous = signal.signal(self.signum, self._mark)

    def after_step(self) -> None:
        iteration = self.trainer.iter
        # one small all-gather a step, so that every process stops after the same iteration
        if not any(comm.all_gather(self.received)) or iteration + 1 >= self.trainer.max_iter:
            return
        logger.info(
            f"{signal.Signals(self.signum).name} received: checkpointing iteration {iteration} "
            "and stopping"
        )
        self.trainer.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()  # no process leaves before the checkpoint is complete
        raise TrainingStopped(iteration)

    def after_train(self) -> None:
        signal.signal(self.signum, self._previous)
