"""Shared helpers of the detectron2-layer tests (each test module skips without detectron2)."""

import importlib.util
import json
import os
import socket
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# A small model for CPU tests: ResNet-18, 64 channels, one layer per stack, 20 queries.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "64",
    "MODEL.PANOPTIC_SEGFORMER.NHEADS", "4",
    "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "128",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "20",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "1",
]  # fmt: skip

# the instance results too (INSTANCE_ON is off by default: panoptic results only)
INSTANCES = ["MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "True"]

# every query passes the merging: an untrained model then still paints segments
PERMISSIVE = [
    "MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.MASK_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.THING_OVERLAP_THRESHOLD", "1.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_OVERLAP_THRESHOLD", "1.0",
]  # fmt: skip
# the score and overlap thresholds of PERMISSIVE, the masks' binarisation kept: every query
# passes the merging and is painted where its mask has pixels no earlier one took
PERMISSIVE_SCORES = [
    "MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESHOLD", "0.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.THING_OVERLAP_THRESHOLD", "1.0",
    "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_OVERLAP_THRESHOLD", "1.0",
]  # fmt: skip
# the class-weighted pixel-wise argmax merging (Table 7's "(p*)") without a score threshold:
# each pixel goes to its best query, so even an untrained model paints thing and stuff segments
# side by side
PIXEL_ARGMAX = [
    "MODEL.PANOPTIC_SEGFORMER.TEST.MERGE", "pixel_argmax",
    "MODEL.PANOPTIC_SEGFORMER.TEST.PIXEL_ARGMAX_CLASS_WEIGHTED", "True",
    "MODEL.PANOPTIC_SEGFORMER.TEST.PIXEL_SCORE_THRESHOLD", "0.0",
]  # fmt: skip


def train_net_args(output_dir, dataset, *extra, eval_only=False, resume=False):
    """train_net.py's parsed command line for the TINY model on ``dataset`` (train and test),
    two images a batch at short side 160, no augmentation; ``extra`` overrides come last."""
    from detectron2.engine import default_argument_parser

    opts = [
        *TINY,
        "DATASETS.TRAIN", f"('{dataset}',)",
        "DATASETS.TEST", f"('{dataset}',)",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(160,)",
        "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.CROP.ENABLED", "False",
        "INPUT.MIN_SIZE_TEST", "160",
        "INPUT.MAX_SIZE_TEST", "256",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
        *extra,
    ]  # fmt: skip
    argv = ["--config-file", str(CONFIGS[0].parent / "r50.yaml")]
    flags = (["--eval-only"] if eval_only else []) + (["--resume"] if resume else [])
    return default_argument_parser().parse_args(argv + flags + opts)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Waits for ``process`` (started with its output piped as text) and returns its output; fails
    the test with the end of it when the process fails or outlasts ``timeout`` seconds (then it
    is killed)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-6000:]
    return output


def load_checkpoint(path):
    """A checkpoint file's content, tensors on the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(ours, theirs, where=""):
    """Nested dicts, lists and tensors are equal, tensors bit for bit."""
    import torch

    if isinstance(ours, dict):
        assert isinstance(theirs, dict) and ours.keys() == theirs.keys(), where
        for key in ours:
            assert_identical(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_identical(a, b, f"{where}[{i}]")
    elif isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and ours.dtype == theirs.dtype, where
        assert torch.equal(ours, theirs), where
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def lay_out_test_dev(root, sample):
    """Makes ``root`` (a DETECTRON2_DATASETS folder, new or not) one whose COCO test-dev is the
    images of the COCO panoptic sample in folder ``sample``; its image-info json has, as the
    real one, ``images`` and the 80 detection ``categories``. Returns ``root``."""
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "test2017").symlink_to(sample / "images")
    panoptic = json.loads((sample / "panoptic.json").read_text())
    things = [c for c in panoptic["categories"] if c["isthing"]]
    info = {"images": panoptic["images"], "categories": things}
    (coco / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    return root


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_demo() -> ModuleType:
    """demo/demo.py as a fresh module (its ``main`` is what the script runs). Its sibling
    ``visualization`` is imported as the script imports it (Python puts the script's folder
    first on ``sys.path``), then ``sys.path`` is restored."""
    import sys

    spec = importlib.util.spec_from_file_location("psf_demo", ROOT / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "demo"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "demo"))
    return module


def load_visualization() -> ModuleType:
    """demo/visualization.py (:class:`VisualizationDemo`) as a module."""
    load_demo()
    import visualization

    return visualization


def make_cfg(config_file, *opts):
    """The config of ``config_file`` with Panoptic SegFormer's keys and the given overrides."""
    from panoptic_segformer.d2.config import get_config
    from panoptic_segformer.d2.registration import register

    register()
    return get_config(str(config_file), opts)


def register_sample(name, ground_truth, images, **kwargs):
    """Registers a two-image COCO panoptic sample as dataset ``name`` (once): the images in
    ``images`` with the ground truth in ``ground_truth`` (``panoptic/`` PNGs and
    ``panoptic.json``); returns ``name``."""
    from detectron2.data import DatasetCatalog

    from panoptic_segformer.d2.data import register_panoptic_dataset

    if name not in DatasetCatalog.list():
        register_panoptic_dataset(
            name,
            str(images),
            str(ground_truth / "panoptic"),
            str(ground_truth / "panoptic.json"),
            **kwargs,
        )
    return name


def write_own_predictions_as_ground_truth(cfg, dataset, folder):
    """The panoptic predictions on the sample dataset ``dataset`` of the model of ``cfg`` (with
    its ``MODEL.WEIGHTS``), from this (single) process, written as a COCO panoptic dataset (PNGs
    under ``folder/panoptic``, ``folder/panoptic.json`` with the images and categories of
    ``dataset``'s json); returns the number of predicted segments per image.

    Contiguous ids become COCO's by detectron2's own ``coco_2017_train_panoptic`` metadata, not
    by the package's: a mistake in the package's id maps then shows as a mismatch. A 4 x 4
    "person" is added in the top-left corner of each image: panopticapi divides by the number of
    thing categories seen, and a barely trained model may predict no things.
    """
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model
    from panopticapi.utils import id2rgb
    from PIL import Image

    from panoptic_segformer import PanopticSegFormerCheckpointer
    from panoptic_segformer.d2.data import PanopticSegFormerDatasetMapper

    model = build_model(cfg).eval()
    PanopticSegFormerCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    metadata = MetadataCatalog.get("coco_2017_train_panoptic")
    to_dataset_id = {v: k for k, v in metadata.stuff_dataset_id_to_contiguous_id.items()}
    to_dataset_id.update({v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()})
    mapper = PanopticSegFormerDatasetMapper(cfg, False)
    (folder / "panoptic").mkdir(parents=True)
    annotations, counts = [], []
    for record in DatasetCatalog.get(dataset):
        with torch.no_grad():
            (output,) = model([mapper(record)])
        seg, segments = output["panoptic_seg"]
        seg = seg.numpy()
        counts.append(len(segments))
        categories = {info["id"]: to_dataset_id[info["category_id"]] for info in segments}
        person = int(seg.max()) + 1
        seg[:4, :4] = person
        categories[person] = 1
        infos = []
        for segment_id, category_id in categories.items():
            ys, xs = (seg == segment_id).nonzero()
            if len(ys) == 0:
                continue
            box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            infos.append(
                {
                    "id": segment_id,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "area": int(len(ys)),
                    "bbox": box,
                }
            )
        name = os.path.basename(record["pan_seg_file_name"])
        Image.fromarray(id2rgb(seg)).save(folder / "panoptic" / name)
        annotations.append(
            {"image_id": record["image_id"], "file_name": name, "segments_info": infos}
        )
    sample = json.loads(Path(MetadataCatalog.get(dataset).panoptic_json).read_text())
    (folder / "panoptic.json").write_text(json.dumps({**sample, "annotations": annotations}))
    return counts
