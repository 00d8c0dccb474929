"""Reliability of training and inference on the CPU.

* A training run killed mid-save resumes from its last complete checkpoint and then follows an
  uninterrupted run bit for bit (model, AdamW moments and step counts, LR scheduler).
* Checkpoints are never half-written under their final name, nor ``last_checkpoint`` rewritten
  to name one.
* A non-finite loss stops training before the backward pass, naming the term and the iteration.
* All-black and all-white images give valid panoptic results; inference is deterministic.

What the resume comparison needs, and why (detectron2 checkpoints the model, the optimizer, the
scheduler and the iteration, but no random state):

* ``SEED`` fixed: the model's initialisation and detectron2's ``TrainingSampler`` order.
* Dropout 0: dropout draws from torch's global generator, which a resumed run re-seeds at start
  instead of restoring, so its masks would differ from an uninterrupted run's.
* Augmentations without randomness (no crop, no flip, one training size): they draw from
  numpy's global generator, which is not restored either.
* A one-image dataset: every batch is the same, so the comparison holds whatever the order of
  the images (that a resumed run's stream goes on in order is tested on two images by
  tests/engine/test_distributed.py and tests/data/test_train_loader.py).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from skips import require_detectron2

require_detectron2()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from d2_helpers import (  # noqa: E402
    CONFIGS,
    PERMISSIVE,
    PIXEL_ARGMAX,
    ROOT,
    TINY,
    assert_identical,
    finish,
    load_checkpoint,
    make_cfg,
    register_sample,
)
from detectron2.engine import hooks  # noqa: E402
from detectron2.utils.events import get_event_storage  # noqa: E402

from panoptic_segformer import PanopticSegFormerCheckpointer  # noqa: E402
from panoptic_segformer.d2.meta_arch import check_losses_finite  # noqa: E402
from panoptic_segformer.d2.predictor import Predictor, load_image  # noqa: E402

sys.path.insert(0, str(ROOT))
from panoptic_segformer.d2.engine import train as train_net

CONFIG = CONFIGS[0].parent / "r50.yaml"
DATASET = "psf_test_reliability_sample"
ONE_IMAGE = 142238  # a sample image: sky, grass, a person, a car and a crowd of persons
MAX_ITER = 8
TRAIN = [
    *TINY,
    "MODEL.PANOPTIC_SEGFORMER.DROPOUT", "0.0",
    "SEED", "7",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", str(MAX_ITER),
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "200",
    "INPUT.CROP.ENABLED", "False",
    "INPUT.RANDOM_FLIP", "none",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
]  # fmt: skip
# the test-time thresholds: the configs' own, and with every query passing the merging, so
# that an untrained model still paints segments
THRESHOLDS = {"default": [], "mask_wise": PERMISSIVE, "pixel_argmax": PIXEL_ARGMAX}


# --- interrupted training -------------------------------------------------------------------


def one_image_coco(root, sample):
    """A ``$DETECTRON2_DATASETS`` folder whose ``coco_2017_train_panoptic`` (the configs'
    training set) is the image ``ONE_IMAGE`` of the COCO panoptic sample in folder ``sample``."""
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").symlink_to(sample / "images")
    (coco / "panoptic_train2017").symlink_to(sample / "panoptic")
    data = json.loads((sample / "panoptic.json").read_text())
    data["images"] = [im for im in data["images"] if im["id"] == ONE_IMAGE]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == ONE_IMAGE]
    (coco / "annotations" / "panoptic_train2017.json").write_text(json.dumps(data))
    return root


def train_command(output_dir, resume=False):
    command = [sys.executable, str(ROOT / "train_net.py"), "--config-file", str(CONFIG)]
    return command + (["--resume"] if resume else []) + TRAIN + ["OUTPUT_DIR", str(output_dir)]


def start_training(output_dir, env, resume=False):
    """Starts train_net.py; ``finish`` (tests/d2_helpers.py) waits for it."""
    return subprocess.Popen(
        train_command(output_dir, resume),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_while_saving(output_dir, env, name):
    """Starts train_net.py and SIGKILLs it as soon as the checkpoint ``name`` (or a later one)
    starts being written. Returns whether the kill caught the write unfinished."""
    with open(output_dir.parent / "killed.log", "w") as log:
        process = subprocess.Popen(
            train_command(output_dir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                started = [
                    p for p in output_dir.glob("model_*.pth*") if p.name.split(".")[0] >= name
                ]
                if started:
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                process.kill()
            returncode = process.wait()
    assert returncode == -signal.SIGKILL, f"the run ended ({returncode}) before being killed"
    return not (output_dir / f"{name}.pth").exists()


def optimizer_steps(checkpoint):
    state = checkpoint["trainer"]["_trainer"]["optimizer"]["state"]
    return {float(s["step"]) for s in state.values()}


def test_killed_training_resumes_exactly_where_it_stopped(tmp_path, coco_panoptic_sample):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        DETECTRON2_DATASETS=str(one_image_coco(tmp_path / "datasets", coco_panoptic_sample)),
        OMP_NUM_THREADS="1",  # float reductions are reproducible for a fixed thread count
    )
    reference, run = tmp_path / "uninterrupted", tmp_path / "interrupted"
    try:
        # the uninterrupted run beside the one to kill (a thread each: neither changes the other)
        uninterrupted = start_training(reference, env)
        try:
            mid_save = kill_while_saving(run, env, "model_0000005")
        finally:
            finish(uninterrupted, timeout=300)

        # whatever the kill interrupted, every checkpoint file is complete and last_checkpoint
        # names one; when the kill caught the save of model_0000005 unfinished (nearly always:
        # the poll is much faster than writing 140 MB), it names model_0000003
        complete = []
        for path in run.glob("*.pth"):
            load_checkpoint(path)  # raises on a truncated file
            complete.append(path.name)
        last = (run / "last_checkpoint").read_text()
        assert last in complete and last >= "model_0000003.pth"
        if mid_save:
            assert last == "model_0000003.pth" and "model_0000005.pth" not in complete
        resumed_from = load_checkpoint(run / last)
        start = resumed_from["iteration"] + 1
        assert optimizer_steps(resumed_from) == {start}
        assert resumed_from["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == start
        # the killed run matched the uninterrupted one up to there
        assert_identical(resumed_from, load_checkpoint(reference / last), last)

        log = finish(start_training(run, env, resume=True), timeout=300)
        assert f"Loading trainer from {run / last}" in log
        assert "Loading scheduler from state_dict" in log
        assert f"Starting training from iteration {start}" in log
        assert not list(run.glob("*.tmp"))  # the resumed run rewrote what the kill left
        later = [f"model_{i:07d}.pth" for i in range(start + 1, MAX_ITER, 2)] + ["model_final.pth"]
        for name in later:
            # model, AdamW step counts and moments, scheduler, iteration: bit for bit
            assert_identical(load_checkpoint(run / name), load_checkpoint(reference / name), name)
        assert optimizer_steps(load_checkpoint(run / "model_final.pth")) == {MAX_ITER}
    finally:
        for path in [*reference.glob("*.pth*"), *run.glob("*.pth*")]:
            path.unlink()  # about 140 MB each


def checkpoint_files(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def test_a_save_that_fails_midway_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = PanopticSegFormerCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    before = checkpoint_files(tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def half_a_save(obj, f):  # what a kill or a full disk leaves: the start of a file
        f.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_a_save)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.save("model_0000003", iteration=3)
    assert checkpoint_files(tmp_path) == before  # no model_0000003.pth, no temporary file
    monkeypatch.undo()

    resumed = torch.nn.Linear(3, 2)
    extra = PanopticSegFormerCheckpointer(resumed, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert_identical(resumed.state_dict(), saved)


def test_a_failed_tag_leaves_last_checkpoint_naming_a_complete_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = PanopticSegFormerCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    fsync = os.fsync
    calls = []

    def fsync_fails_on_the_tag(fd):  # calls: the checkpoint, its directory, last_checkpoint
        calls.append(fd)
        if len(calls) == 3:
            raise OSError("Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_the_tag)
    with pytest.raises(OSError, match="Input/output error"):
        checkpointer.save("model_0000003")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert_identical(load_checkpoint(tmp_path / "model_0000003.pth")["model"], model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]


# --- the trainer in-process: its checkpoints, a NaN ----------------------------------------


@pytest.fixture(scope="module")
def sample_dataset(coco_panoptic_sample):
    """The generated COCO panoptic sample (tests/coco_panoptic_sample.py)."""
    return register_sample(DATASET, coco_panoptic_sample, coco_panoptic_sample / "images")


def trainer(output_dir, dataset):
    cfg = make_cfg(
        CONFIG,
        *TRAIN,
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "DATASETS.TRAIN", f"('{dataset}',)",
        "OUTPUT_DIR", str(output_dir),
    )  # fmt: skip
    torch.manual_seed(0)
    return train_net.Trainer(cfg)


def test_the_trainer_saves_its_periodic_checkpoints_atomically(tmp_path, sample_dataset):
    built = trainer(tmp_path, sample_dataset)
    periodic = [h for h in built._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert len(periodic) == 1
    assert periodic[0].checkpointer is built.checkpointer
    assert type(built.checkpointer) is PanopticSegFormerCheckpointer


def test_a_nan_loss_stops_training_naming_the_term_and_iteration(tmp_path, sample_dataset):
    built = trainer(tmp_path, sample_dataset)
    built.resume_or_load(resume=False)
    before_nan = {}

    def nan_at_iteration_2(criterion, inputs, losses):
        if get_event_storage().iter != 2:
            return None
        before_nan.update({k: v.clone() for k, v in built.model.state_dict().items()})
        return {**losses, "loss_mask_stuff": losses["loss_mask_stuff"] * float("nan")}

    built.model.core.criterion.register_forward_hook(nan_at_iteration_2)
    with pytest.raises(
        FloatingPointError,
        match=r"^Loss became infinite or NaN at iteration=2: loss_mask_stuff = nan "
        r"\(1 of \d+ loss terms\)$",
    ):
        built.train()
    assert built.iter == 2
    # it stopped before the backward pass (no NaN gradient) and the optimizer step: the weights
    # are those iteration 1 left
    assert before_nan
    assert_identical(built.model.state_dict(), before_nan)
    grads = [p.grad for p in built.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_check_losses_finite_names_every_bad_term():
    finite = {"loss_cls": torch.tensor(1.5), "d0.loss_bbox": torch.tensor(0.25)}
    check_losses_finite(finite)
    check_losses_finite({})
    bad = {**finite, "loss_giou": torch.tensor(float("inf")), "t0.x": torch.tensor(float("nan"))}
    with pytest.raises(
        FloatingPointError,
        match=r"^Loss became infinite or NaN at this step: loss_giou = inf, t0\.x = nan "
        r"\(2 of 4 loss terms\)$",
    ):
        check_losses_finite(bad)


# --- inference: blank images, determinism --------------------------------------------------


def predictor(thresholds):
    cfg = make_cfg(
        CONFIG,
        *TINY,
        *THRESHOLDS[thresholds],
        "MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON", "True",
        "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "True",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "200",
    )  # fmt: skip
    torch.manual_seed(0)
    return Predictor(cfg)


def assert_valid(outputs, metadata, height, width):
    seg, segments = outputs["panoptic_seg"]
    assert seg.dtype == torch.int32 and tuple(seg.shape) == (height, width)
    ids = [s["id"] for s in segments]
    assert len(set(ids)) == len(ids) and 0 not in ids
    assert set(torch.unique(seg).tolist()) - {0} == set(ids)  # every segment is painted
    things = set(metadata.thing_dataset_id_to_contiguous_id.values())
    stuff = set(metadata.stuff_dataset_id_to_contiguous_id.values())
    for s in segments:
        assert s["category_id"] in (things if s["isthing"] else stuff), s
        assert 0.0 <= s["score"] <= 1.0, s
    instances = outputs["instances"]
    assert instances.image_size == (height, width)
    assert tuple(instances.pred_masks.shape) == (len(instances), height, width)
    assert set(instances.pred_classes.tolist()) <= things
    assert torch.isfinite(instances.scores).all()
    assert torch.isfinite(instances.pred_boxes.tensor).all()
    assert torch.isfinite(outputs["sem_seg"]).all()
    assert tuple(outputs["sem_seg"].shape) == (len(things | stuff), height, width)


# the kinds of segment (isthing) the untrained model paints on a blank image: with the configs'
# thresholds none (its scores pass none: this case checks the empty result, no segment and every
# pixel void); with every query passing the mask-wise merging, stuff; with the pixel-wise argmax,
# things and stuff, so that the category checks run on both
PAINTED = {"default": set(), "mask_wise": {False}, "pixel_argmax": {False, True}}


@pytest.mark.parametrize("thresholds", sorted(THRESHOLDS))
@pytest.mark.parametrize("value", [0, 255], ids=["black", "white"])
def test_blank_images_give_valid_panoptic_results(thresholds, value):
    image = np.full((90, 150, 3), value, dtype=np.uint8)
    model = predictor(thresholds)
    outputs = model(image)
    assert_valid(outputs, model.metadata, 90, 150)
    segments = outputs["panoptic_seg"][1]
    assert {s["isthing"] for s in segments} == PAINTED[thresholds], segments


def assert_same_outputs(ours, theirs):
    assert torch.equal(ours["panoptic_seg"][0], theirs["panoptic_seg"][0])
    assert ours["panoptic_seg"][1] == theirs["panoptic_seg"][1]  # scores compared exactly
    for field in ("pred_masks", "scores", "pred_classes"):
        assert torch.equal(getattr(ours["instances"], field), getattr(theirs["instances"], field))
    assert torch.equal(ours["instances"].pred_boxes.tensor, theirs["instances"].pred_boxes.tensor)
    assert torch.equal(ours["sem_seg"], theirs["sem_seg"])


@pytest.mark.parametrize("thresholds", ["mask_wise", "pixel_argmax"])
def test_inference_is_deterministic_on_the_cpu(thresholds, coco_panoptic_sample):
    image = load_image(str(coco_panoptic_sample / "images" / f"{ONE_IMAGE:012d}.jpg"))
    model = predictor(thresholds)
    first = model(image, format="RGB")
    assert first["panoptic_seg"][1] and len(first["instances"]) > 0
    assert_same_outputs(model(image, format="RGB"), first)
    # a model built again with the same seed: the initialisation is deterministic too
    assert_same_outputs(predictor(thresholds)(image, format="RGB"), first)
