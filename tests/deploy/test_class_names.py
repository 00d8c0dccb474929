"""Models carry their class names: a checkpoint of train_net's checkpointer and an exported
file let the demo draw a model of a dataset the drawing process never registered."""

import pytest
from skips import require, require_detectron2

require_detectron2("class names live in detectron2's metadata")
require("cv2", "the demo draws with OpenCV")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLASS_INFO = {
    "dataset": "my_fruit_train",
    "thing_classes": ["apple", "pear"],
    "stuff_classes": ["apple", "pear", "table"],
    "thing_colors": [[200, 0, 0], [0, 200, 0]],
    "stuff_colors": [[200, 0, 0], [0, 200, 0], [90, 90, 90]],
    "thing_dataset_id_to_contiguous_id": [[1, 0], [2, 1]],
    "stuff_dataset_id_to_contiguous_id": [[5, 2]],
}
# the fruit model: 2 things, 1 stuff class, trained on a dataset registered elsewhere
FRUIT = [
    "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "2",
    "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "1",
    "DATASETS.TRAIN", "('my_fruit_train',)",
    "DATASETS.TEST", "('my_fruit_val',)",
]  # fmt: skip


def test_class_info_round_trips_through_metadata():
    from detectron2.data import MetadataCatalog

    from panoptic_segformer.d2.class_info import class_info_of, drawing_metadata

    coco = class_info_of(MetadataCatalog.get("coco_2017_val_panoptic"))
    assert coco["thing_classes"][:2] == ["person", "bicycle"] and len(coco["stuff_classes"]) == 133
    drawn = drawing_metadata("__not_registered_anywhere", coco)
    assert drawn.thing_classes == coco["thing_classes"]
    assert drawn.thing_dataset_id_to_contiguous_id[90] == 79  # "toothbrush", as a dict again
    assert drawing_metadata("coco_2017_val_panoptic", CLASS_INFO) is MetadataCatalog.get(
        "coco_2017_val_panoptic"
    )  # a registered dataset wins
    assert class_info_of(MetadataCatalog.get("__not_registered_anywhere")) is None


def test_without_class_names_one_line_names_the_dataset_and_the_fix():
    from panoptic_segformer.d2.class_info import drawing_metadata

    with pytest.raises(ValueError) as error:
        drawing_metadata("my_fruit_val", None)
    message = str(error.value)
    assert "dataset 'my_fruit_val' is not registered" in message and "\n" not in message
    assert "register the dataset" in message


@pytest.fixture(scope="module")
def fruit_weights(tmp_path_factory, tiny_cfg):
    """A fruit model's checkpoint written by train_net's checkpointer, with class names."""
    from detectron2.modeling import build_model

    from panoptic_segformer.d2.checkpoint import PanopticSegFormerCheckpointer

    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(FRUIT)
    folder = tmp_path_factory.mktemp("fruit")
    torch.manual_seed(0)
    checkpointer = PanopticSegFormerCheckpointer(
        build_model(cfg), str(folder), class_info=CLASS_INFO
    )
    checkpointer.save("model_final")
    (folder / "config.yaml").write_text(cfg.dump())
    return folder


def test_checkpoints_carry_class_names_and_the_predictor_draws_from_them(fruit_weights):
    from panoptic_segformer.d2.config import get_config
    from panoptic_segformer.d2.predictor import Predictor
    from panoptic_segformer.d2.registration import register

    saved = torch.load(fruit_weights / "model_final.pth", weights_only=True)
    assert saved["class_info"] == CLASS_INFO
    register()
    cfg = get_config(
        str(fruit_weights / "config.yaml"),
        ["MODEL.WEIGHTS", str(fruit_weights / "model_final.pth")],
    )
    metadata = Predictor(cfg).metadata  # my_fruit_val is registered nowhere
    assert metadata.thing_classes == ["apple", "pear"] and metadata.stuff_colors[2] == [90, 90, 90]


def run_demo(workdir, *arguments):
    command = [sys.executable, str(ROOT / "demo" / "demo.py"), *arguments]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


def test_demo_draws_a_model_of_an_unregistered_dataset(fruit_weights, tmp_path, photos):
    """The new user's case: the training script's saved config.yaml, a dataset the demo never
    registered. It draws (from the checkpoint's class names); without them, one line says why."""
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), photos[0])
    config = str(fruit_weights / "config.yaml")
    out = tmp_path / "drawn.png"
    weights = str(fruit_weights / "model_final.pth")
    done = run_demo(
        tmp_path, "--config-file", config, "--input", str(photo), "--output", str(out),
        "--opts", "MODEL.WEIGHTS", weights,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert cv2.imread(str(out)).shape == photos[0].shape

    done = run_demo(
        tmp_path, "--config-file", config, "--input", str(photo), "--output", str(out),
        "--opts", "MODEL.WEIGHTS", "",
    )  # fmt: skip
    assert done.returncode == 2
    assert "error: dataset 'my_fruit_val' is not registered in this process" in done.stderr
    assert "AttributeError" not in done.stderr


def test_demo_draws_from_an_exported_model(exported, tmp_path, photos):
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), photos[0])
    out = tmp_path / "drawn.png"
    done = run_demo(
        tmp_path, "--exported", str(exported("torchscript")), "--trust-exported-code",
        "--input", str(photo), "--output", str(out), "--confidence-threshold", "0.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    drawn = cv2.imread(str(out))
    assert drawn.shape == photos[0].shape
    assert (abs(drawn.astype(int) - photos[0].astype(int)) > 30).mean() > 0.05  # drawn on
