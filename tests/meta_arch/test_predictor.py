"""The Predictor: builds the model and loads MODEL.WEIGHTS once (through our checkpointer,
never detectron2's), and takes images in either channel order, converting to INPUT.FORMAT once
(the results do not depend on which order the caller holds the image in)."""

import numpy as np
import pytest
from skips import require_detectron2

require_detectron2()

import torch  # noqa: E402
from d2_helpers import CONFIGS, PERMISSIVE_SCORES, TINY, make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fvcore.common.checkpoint import Checkpointer  # noqa: E402

from panoptic_segformer.d2.predictor import Predictor  # noqa: E402

R50 = str(CONFIGS[0].parent / "r50.yaml")
OPTS = [*TINY, *PERMISSIVE_SCORES, "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False"]


def blobs(height=90, width=150, seed=0):
    """An (H, W, 3) uint8 image of coloured 16-pixel blocks."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 16 + 1, width // 16 + 1, 3))
    return np.kron(small, np.ones((16, 16, 1)))[:height, :width].astype(np.uint8)


def test_weights_are_loaded_once_by_our_checkpointer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    saved = build_model(make_cfg(R50, *OPTS))
    torch.save({"model": saved.state_dict()}, tmp_path / "weights.pth")
    loads = []
    original = Checkpointer.load

    def counting_load(self, path, *args, **kwargs):
        loads.append((type(self).__name__, path))
        return original(self, path, *args, **kwargs)

    # every checkpointer's load ends in fvcore's (detectron2's calls it, and so does ours)
    monkeypatch.setattr(Checkpointer, "load", counting_load)
    torch.manual_seed(1)  # a different initialisation: the weights must come from the file
    predictor = Predictor(make_cfg(R50, *OPTS, "MODEL.WEIGHTS", str(tmp_path / "weights.pth")))
    assert loads == [("PanopticSegFormerCheckpointer", str(tmp_path / "weights.pth"))]
    assert predictor.cfg.MODEL.WEIGHTS == str(tmp_path / "weights.pth")
    assert predictor.model.prepared_for_inference and not predictor.model.training
    for name, value in saved.core.state_dict().items():  # the core (the backbone is folded)
        assert torch.equal(predictor.model.core.state_dict()[name], value), name


@pytest.fixture(scope="module", params=["RGB", "BGR"])
def predictor(request):
    torch.manual_seed(0)
    return Predictor(make_cfg(R50, *OPTS, "INPUT.FORMAT", request.param))


def test_either_channel_order_gives_the_same_results(predictor):
    bgr = blobs()
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    expected = predictor(bgr)  # BGR by default, as detectron2's DefaultPredictor
    assert expected["panoptic_seg"][1], "the check compares segments"
    for image, fmt in ((bgr, "BGR"), (rgb, "RGB")):
        seg, segments = predictor(image, format=fmt)["panoptic_seg"]
        assert torch.equal(seg, expected["panoptic_seg"][0])
        assert segments == expected["panoptic_seg"][1]


def test_the_model_gets_its_input_format(predictor):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[..., 0] = 255  # red in RGB
    inputs = predictor.preprocess(image, format="RGB")
    assert (inputs["height"], inputs["width"]) == (64, 64)
    red = [255.0, 0.0, 0.0] if predictor.input_format == "RGB" else [0.0, 0.0, 255.0]
    assert inputs["image"][:, 5, 5].tolist() == red
    with pytest.raises(ValueError, match="format must be RGB or BGR, got 'HSV'"):
        predictor(image, format="HSV")
