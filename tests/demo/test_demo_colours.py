"""The demo's path keeps colours: an image decoded (RGB) goes to the model in its INPUT.FORMAT
and is drawn in its own colours, in saved images and in video frames alike."""

import pytest
from skips import require, require_detectron2

require_detectron2()
require("cv2", "the demo draws with OpenCV")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from d2_helpers import CONFIGS, TINY, load_demo, load_visualization, make_cfg  # noqa: E402
from PIL import Image  # noqa: E402

from panoptic_segformer.d2.predictor import load_image  # noqa: E402

R50 = str(CONFIGS[0].parent / "r50.yaml")
RED, BLUE = (255, 0, 0), (0, 0, 255)  # RGB
NOTHING_SHOWN = 2.0  # a confidence threshold no segment reaches: the drawing is the image


def red_and_blue(height=64, width=96):
    """(H, W, 3) uint8 RGB: the left half pure red, the right half pure blue."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = RED
    image[:, width // 2 :] = BLUE
    return image


@pytest.fixture(scope="module", params=["RGB", "BGR"])
def demo(request):
    torch.manual_seed(0)
    cfg = make_cfg(R50, *load_demo().DRAWN_RESULTS, *TINY, "INPUT.FORMAT", request.param)
    cfg.freeze()
    return load_visualization().VisualizationDemo(cfg, NOTHING_SHOWN)


def spy_on_model_inputs(demo, monkeypatch):
    seen = []
    model = demo.predictor.model
    monkeypatch.setattr(demo.predictor, "model", lambda batch: seen.append(batch) or model(batch))
    return seen


def test_a_decoded_image_is_predicted_and_drawn_in_its_colours(demo, tmp_path, monkeypatch):
    Image.fromarray(red_and_blue()).save(tmp_path / "in.png")
    image = load_image(str(tmp_path / "in.png"))
    assert tuple(image[10, 10]) == RED
    seen = spy_on_model_inputs(demo, monkeypatch)
    predictions, drawing = demo.run_on_image(image)
    # the model got red where the image is red, in its own channel order
    (model_input,) = seen[0]
    red = RED if demo.predictor.input_format == "RGB" else RED[::-1]
    assert tuple(model_input["image"][:, 10, 10].tolist()) == red
    assert "panoptic_seg" in predictions and "instances" not in predictions  # only what is drawn
    # nothing confident enough: the drawing is the image itself, red still red
    drawn = drawing.get_image()
    assert np.array_equal(drawn, image)
    drawing.save(str(tmp_path / "out.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), image)


def test_video_frames_are_drawn_in_their_colours(demo, tmp_path):
    path = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (96, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG videos")
    for _ in range(2):
        writer.write(cv2.cvtColor(red_and_blue(), cv2.COLOR_RGB2BGR))  # OpenCV writes BGR
    writer.release()
    video = cv2.VideoCapture(str(path))
    try:
        frames = list(demo.run_on_video(video))
    finally:
        video.release()
    assert len(frames) == 2
    for frame in frames:  # RGB drawings (lossy video: near the colours)
        assert frame.shape == (64, 96, 3)
        assert np.abs(frame[20:44, 10:30].astype(int) - RED).max() < 40
        assert np.abs(frame[20:44, 66:86].astype(int) - BLUE).max() < 40
