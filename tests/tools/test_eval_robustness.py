"""tools/eval_robustness.py: the corruption library under the installed numpy and scikit-image,
the corrupting mapper (deterministic, before the resize, in either channel order), the checks of
the command line, and the whole tool on the generated COCO panoptic sample (tests/coco_panoptic_sample.py) with a tiny
untrained model."""

import json
import math
import sys

import pytest
from skips import require, require_detectron2

require_detectron2("the robustness tool needs detectron2 installed")
require("imagecorruptions", "the corruptions come from imagecorruptions")
require("panopticapi", "COCOPanopticEvaluator needs panopticapi installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from d2_helpers import ROOT, TINY, make_cfg, register_sample  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from PIL import Image  # noqa: E402

from panoptic_segformer.d2.data import (  # noqa: E402
    PanopticSegFormerDatasetMapper,
    register_subset,
    select_images,
)

CONFIG = ROOT / "configs" / "r50.yaml"
DATASET = "psf_test_robustness_sample"
SMALL_TEST = ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256"]


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("eval_robustness")


@pytest.fixture(scope="module")
def sample_dataset(coco_panoptic_sample):
    return register_sample(DATASET, coco_panoptic_sample, coco_panoptic_sample / "images")


def test_every_paper_corruption_runs(tool):
    """Guards the compatibility patches: fog (np.float_), gaussian_blur and glass_blur
    (scikit-image's removed ``multichannel``) fail unpatched under NumPy 2 / scikit-image 0.26."""
    corrupt, names = tool.load_corruption_library()
    assert set(tool.PAPER_CORRUPTIONS) <= set(names)
    image = np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8)
    for name in tool.PAPER_CORRUPTIONS:
        np.random.seed(0)
        out = corrupt(image, severity=5, corruption_name=name)
        assert out.shape == image.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, image), name


def test_corrupted_mapper_is_deterministic_and_before_the_resize(tool, coco_panoptic_sample):
    cfg = make_cfg(CONFIG, *SMALL_TEST)
    image = coco_panoptic_sample / "images" / "000000142238.jpg"
    width, height = Image.open(image).size
    record = {"file_name": str(image), "image_id": 142238, "height": height, "width": width}
    clean = PanopticSegFormerDatasetMapper(cfg, False)(record)["image"]
    mapper = tool.CorruptedMapper(cfg, "gaussian_noise", 3)
    state = np.random.get_state()[1].copy()
    first, second = mapper(record)["image"], mapper(record)["image"]
    assert np.array_equal(np.random.get_state()[1], state)  # the global generator is restored
    assert first.shape == clean.shape == (3, 160, 240)  # corrupted, then resized
    assert first.dtype == torch.uint8
    assert (first.float() - clean.float()).abs().mean() > 5  # severity 3: sigma 0.18 * 255
    assert torch.equal(first, second)
    # another image id draws other noise
    assert not torch.equal(first, mapper({**record, "image_id": 1})["image"])
    # a BGR model gets the same corruption of the RGB image, in its channel order
    cfg.INPUT.FORMAT = "BGR"
    bgr = tool.CorruptedMapper(cfg, "gaussian_noise", 3)(record)["image"]
    assert torch.equal(bgr.flip(0), first)
    cfg.INPUT.FORMAT = "L"
    with pytest.raises(ValueError, match="INPUT.FORMAT must be RGB or BGR to corrupt, got 'L'"):
        tool.CorruptedMapper(cfg, "fog", 1)


def test_bad_settings_raise(tool):
    with pytest.raises(
        ValueError, match=r"unknown corruption\(s\) 'fgo'; the valid ones are .*fog"
    ):
        tool.check_settings(["fog", "fgo"], [1])
    with pytest.raises(ValueError, match="severities must lie in 1..5, got 0, 6"):
        tool.check_settings(["fog"], [0, 3, 6])
    with pytest.raises(SystemExit):  # argparse's usage error
        tool.parse_args(["--config-file", str(CONFIG), "--severities", "1", "high"])


def test_missing_library_names_the_package(tool, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # as if not installed
    tool.load_corruption_library.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install imagecorruptions"):
            tool.check_settings(["fog"], [1])
    finally:
        monkeypatch.undo()
        tool.load_corruption_library.cache_clear()


def test_list_options_give_back_trailing_overrides(tool):
    args = tool.parse_args(
        ["--config-file", "c.yaml", "--severities", "2", "4", "MODEL.WEIGHTS", "m.pth"]
    )
    assert args.severities == [2, 4] and args.opts == ["MODEL.WEIGHTS", "m.pth"]
    args = tool.parse_args(["--config-file", "c.yaml", "--corruptions", "fog", "SEED", "1"])
    assert args.corruptions == ["fog"] and args.opts == ["SEED", "1"]


def test_select_images():
    dicts = [{"image_id": i} for i in range(10)]
    assert select_images(dicts, 3) == dicts[:3]
    sample = select_images(dicts, 4, seed=1)
    assert sample == select_images(dicts, 4, seed=1) and len(sample) == 4
    assert [d["image_id"] for d in sample] == sorted(d["image_id"] for d in sample)
    assert select_images(dicts, 20) == dicts
    with pytest.raises(ValueError, match="num_images must be positive, got 0"):
        select_images(dicts, 0)


def test_seeded_subset_ground_truth(tmp_path, sample_dataset):
    """panopticapi needs a prediction for every image of its json: the subset gets its own."""
    name = register_subset(sample_dataset, 1, str(tmp_path), seed=3)
    (image,) = DatasetCatalog.get(name)
    assert name == f"{sample_dataset}_sample1_seed3"
    metadata = MetadataCatalog.get(name)
    subset = json.loads(open(metadata.panoptic_json).read())
    assert [x["id"] for x in subset["images"]] == [image["image_id"]]
    assert [x["image_id"] for x in subset["annotations"]] == [image["image_id"]]
    assert metadata.panoptic_root == MetadataCatalog.get(sample_dataset).panoptic_root


def test_main_on_the_sample(tool, tmp_path, sample_dataset, capsys, monkeypatch):
    corrupted = []  # (corruption, severity, size of the image it corrupts)
    apply_image = tool.ImageCorruption.apply_image

    def spy(self, image):
        corrupted.append((self.corruption, self.severity, image.shape))
        return apply_image(self, image)

    monkeypatch.setattr(tool.ImageCorruption, "apply_image", spy)
    args = tool.parse_args(
        [
            "--config-file", str(CONFIG),
            "--num-images", "2",
            "--corruptions", "gaussian_noise", "fog",
            "--severities", "2",
            "--output", str(tmp_path),
            *TINY,  # MODEL.WEIGHTS "": an untrained model, evaluated with a warning
            *SMALL_TEST,
            "DATASETS.TEST", f"('{sample_dataset}',)",
            "DATALOADER.NUM_WORKERS", "0",
        ]
    )  # fmt: skip
    summary = tool.main(args)
    # each image once per setting, at its original size (427 x 640 and 360 x 640)
    assert sorted(corrupted) == [
        (name, 2, size)
        for name in ("fog", "gaussian_noise")
        for size in [(360, 640, 3), (427, 640, 3)]
    ]
    assert json.loads((tmp_path / tool.RESULTS_FILE).read_text()) == summary
    assert summary["complete"] and summary["num_images"] == 2
    assert sorted(summary["image_ids"]) == [142238, 439180]
    assert set(summary["corruptions"]) == {"gaussian_noise", "fog"}
    for results in [summary["clean"], summary["mean"]] + [
        c["severities"]["2"] for c in summary["corruptions"].values()
    ]:
        assert math.isfinite(results["PQ"]) and 0 <= results["PQ"] <= 100
        assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(results)
    for corruption in summary["corruptions"].values():
        assert corruption["mean"] == corruption["severities"]["2"]  # one severity
    expected = np.mean([c["mean"]["PQ"] for c in summary["corruptions"].values()])
    assert summary["mean"]["PQ"] == pytest.approx(expected)
    assert "| clean | mean | gaussian_noise | fog |" in capsys.readouterr().out
