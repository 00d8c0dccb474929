"""detectron2's training data loader, able to go on with its stream of images after a resume.

detectron2 checkpoints the model, the optimizer, the scheduler and the iteration, but not the
data loader: its sampler (``TrainingSampler``: an endless stream of seeded permutations, each
process taking every ``world_size``-th index) starts again from the beginning when a run
resumes, so a job requeued many times sees the first images of the stream again each time. Here
the sampler of a resumed run skips the indices that the iterations before the checkpoint used:
``iteration x SOLVER.IMS_PER_BATCH / world size`` in each process.

The skip counts the images of whole batches, so it is exact where each batch is the next run of
the sampler's indices: without ``DATALOADER.ASPECT_RATIO_GROUPING``, or with it on images of one
orientation and ``DATALOADER.NUM_WORKERS 0``. Otherwise (the configs' default: aspect-ratio
buckets filled by several workers) the stream goes on from about the same place, and a few images
from around it are skipped or seen twice.
"""

import itertools
import logging
from typing import Any, Iterator, Optional

from detectron2.data import build_detection_train_loader
from detectron2.utils import comm
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "ResumableTrainLoader"]

logger = logging.getLogger(__name__)


class ResumableSampler(Sampler):
    """The indices of another sampler (an endless one, as detectron2's training samplers),
    from its ``start``-th on."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)


class ResumableTrainLoader:
    """``build_detection_train_loader(cfg, mapper=mapper)``, whose stream :meth:`start_at` moves
    to where an iteration of an earlier run left it.

    Args:
        cfg: the config (``DATASETS.TRAIN``, ``DATALOADER.*``, ``SOLVER.IMS_PER_BATCH``).
        mapper: the dataset mapper.
    """

    def __init__(self, cfg, mapper: Any) -> None:
        kwargs = build_detection_train_loader.from_config(cfg, mapper=mapper)
        # None for an iterable dataset, which has no sampler to move
        self._sampler: Optional[ResumableSampler] = None
        if kwargs["sampler"] is not None:
            self._sampler = kwargs["sampler"] = ResumableSampler(kwargs["sampler"])
        self._images_per_iteration = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        self._loader = build_detection_train_loader(**kwargs)

    def start_at(self, iteration: int) -> None:
        """The stream goes on after the images of ``iteration`` iterations (call before
        iterating)."""
        if self._sampler is None:
            logger.warning("the training dataset is iterable: its stream starts again on resume")
            return
        self._sampler.start = iteration * self._images_per_iteration

    def __iter__(self) -> Iterator[Any]:
        return iter(self._loader)
