"""demo/demo.py draws a prediction on an image of the generated COCO panoptic sample, on the
CPU."""

import os
import subprocess
import sys

import pytest
from skips import require, require_detectron2

require_detectron2()
require("cv2", "the demo draws with OpenCV")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from d2_helpers import CONFIGS, ROOT, TINY, load_demo  # noqa: E402


def run_demo(workdir, *arguments):
    """Runs demo/demo.py with the R50 config (and ``arguments``) as a user would; must succeed."""
    command = [
        sys.executable,
        str(ROOT / "demo" / "demo.py"),
        "--config-file",
        str(CONFIGS[0].parent / "r50.yaml"),
        *arguments,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_demo_writes_a_drawn_image(tmp_path, coco_panoptic_sample):
    photo_path = coco_panoptic_sample / "images" / "000000142238.jpg"  # 640 x 427
    out = tmp_path / "drawn.jpg"
    done = run_demo(
        tmp_path,
        "--input", str(photo_path),
        "--output", str(out),
        "--confidence-threshold", "0.0",
        "--opts", *TINY, "MODEL.PANOPTIC_SEGFORMER.TEST.THING_SCORE_THRESHOLD", "0.0",
        "MODEL.PANOPTIC_SEGFORMER.TEST.STUFF_SCORE_THRESHOLD", "0.0",
    )  # fmt: skip
    drawn = cv2.imread(str(out))
    assert drawn is not None and drawn.shape == (427, 640, 3)
    photo = cv2.imread(str(photo_path))
    assert (abs(drawn.astype(int) - photo.astype(int)) > 30).mean() > 0.05  # something drawn
    assert "MODEL.WEIGHTS is empty" in done.stdout + done.stderr


def test_demo_draws_every_frame_of_a_video(tmp_path):
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4 videos")
    for i in range(3):
        writer.write(np.full((64, 96, 3), 40 * i, dtype=np.uint8))
    writer.release()
    out = tmp_path / "out.mp4"
    run_demo(tmp_path, "--video-input", str(video), "--output", str(out), "--opts", *TINY)
    drawn = cv2.VideoCapture(str(out))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert (drawn.get(cv2.CAP_PROP_FRAME_WIDTH), drawn.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (96, 64)
    drawn.release()


def test_input_expansion(tmp_path, coco_panoptic_sample):
    demo = load_demo()
    images = coco_panoptic_sample / "images"
    assert demo.expand_inputs([str(images)]) == [
        str(images / "000000142238.jpg"),
        str(images / "000000439180.jpg"),
    ]
    assert demo.expand_inputs([str(images / "*439180.jpg")]) == [str(images / "000000439180.jpg")]
    with pytest.raises(FileNotFoundError, match=r"--input '.*nothing\*.png' matches no image"):
        demo.expand_inputs([str(tmp_path / "nothing*.png")])
    assert demo.output_path(str(tmp_path / "out"), "/a/b.jpg", many=True) == str(
        tmp_path / "out" / "b.jpg"
    )
    assert demo.output_path(str(tmp_path / "one.jpg"), "/a/b.jpg", many=False) == str(
        tmp_path / "one.jpg"
    )
