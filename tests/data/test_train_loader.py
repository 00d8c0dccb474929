"""The training loader's stream goes on after a resume (panoptic_segformer/data/train_loader.py),
on the generated COCO panoptic sample."""

import itertools

from skips import require_detectron2

require_detectron2("the training loader needs detectron2")

from d2_helpers import CONFIGS, TINY, make_cfg, register_sample  # noqa: E402
from detectron2.data.samplers import TrainingSampler  # noqa: E402

from panoptic_segformer.d2.data import PanopticSegFormerDatasetMapper  # noqa: E402
from panoptic_segformer.d2.data.train_loader import (  # noqa: E402
    ResumableSampler,
    ResumableTrainLoader,
)

DATASET = "psf_test_train_loader_sample"


def test_the_sampler_goes_on_from_its_start():
    sampler = ResumableSampler(TrainingSampler(5, seed=3))
    stream = list(itertools.islice(TrainingSampler(5, seed=3), 40))
    assert list(itertools.islice(sampler, 40)) == stream
    sampler.start = 7
    assert list(itertools.islice(sampler, 33)) == stream[7:]
    assert stream[7:] != stream[:33]  # the stream shuffles: starting elsewhere differs


def image_ids(loader, batches):
    return [[image["image_id"] for image in batch] for batch in itertools.islice(loader, batches)]


def test_a_resumed_loader_goes_on_with_the_next_batches(coco_panoptic_sample):
    dataset = register_sample(DATASET, coco_panoptic_sample, coco_panoptic_sample / "images")
    cfg = make_cfg(
        CONFIGS[0].parent / "r50.yaml",
        *TINY,
        "DATASETS.TRAIN", f"('{dataset}',)",
        "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.CROP.ENABLED", "False",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "SEED", "1",
    )  # fmt: skip

    def loader(start):
        built = ResumableTrainLoader(cfg, PanopticSegFormerDatasetMapper(cfg, True))
        built.start_at(start)
        return built

    uninterrupted = image_ids(loader(0), 8)
    # batches of two draws of the two images: some hold one image twice, so the order matters
    assert len({tuple(batch) for batch in uninterrupted}) > 1
    assert image_ids(loader(5), 3) == uninterrupted[5:]
