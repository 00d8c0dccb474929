"""The detectron2 model exported to each format, run by ExportedPredictor, gives the panoptic
results of the PyTorch predictor; its files carry the config and the class names. (The
format-level checks, with the core model, are in test_export_formats.py.)"""

import pytest
from skips import require_detectron2

require_detectron2("ExportedPredictor runs detectron2's predictor")

from deploy_helpers import FORMATS, TOLERANCE  # noqa: E402


def same_panoptic(expected, actual):
    """Same segments (id, category, isthing) and at least 99.9% of the pixels."""
    (seg_e, info_e), (seg_a, info_a) = expected["panoptic_seg"], actual["panoptic_seg"]
    key = [(s["id"], s["category_id"], s["isthing"]) for s in info_e]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info_a] == key
    assert seg_e.shape == seg_a.shape
    agree = (seg_e == seg_a).float().mean().item()
    assert agree >= 0.999, agree
    for e, a in zip(info_e, info_a):
        assert abs(e["score"] - a["score"]) <= TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_predictor_gives_the_panoptic_results_of_pytorch(fmt, exported, predictor, photos):
    from panoptic_segformer.d2 import ExportedPredictor

    # the config from the file; the test's own files, so their code is trusted
    exported_predictor = ExportedPredictor(str(exported(fmt)), trust_code=True)
    shown = photos[:1] if fmt == "torchscript" else photos
    for photo in shown:
        expected, actual = predictor(photo), exported_predictor(photo)
        assert len(expected["panoptic_seg"][1]) >= 2  # the check compares segments
        assert actual["panoptic_seg"][0].shape == photo.shape[:2]
        same_panoptic(expected, actual)


def test_exported_files_carry_config_and_classes(exported, tiny_cfg):
    from panoptic_segformer.deploy import ExportedNetwork

    metadata = ExportedNetwork(str(exported("torchscript")), trust_code=True).metadata
    assert metadata["size_divisibility"] == 1  # INPUT.SIZE_DIVISIBILITY: any size, unpadded
    info = metadata["class_info"]
    assert info["dataset"] == tiny_cfg.DATASETS.TRAIN[0]
    # detectron2 names every COCO panoptic category in both lists
    assert len(info["thing_classes"]) == 133 and info["thing_classes"][0] == "person"
    assert len(info["stuff_colors"]) == len(info["stuff_classes"])
    assert "MODEL:" in metadata["config"]


def test_a_core_model_file_needs_a_config(core_exported):
    from panoptic_segformer.d2 import ExportedPredictor

    path = str(core_exported("torchscript"))
    with pytest.raises(ValueError, match=r"tiny.ts holds no config .* pass the model's cfg"):
        ExportedPredictor(path, trust_code=True)


def test_exported_predictor_builds_no_pytorch_network(exported, monkeypatch):
    import panoptic_segformer.d2.meta_arch as meta_arch
    import panoptic_segformer.d2.predictor as predictor_module
    from panoptic_segformer.d2 import ExportedPredictor
    from panoptic_segformer.modeling import PanopticSegFormerCore

    def refuse(*args, **kwargs):
        raise AssertionError("the exported predictor built a PyTorch network")

    for module, name in (
        (predictor_module, "build_model"),
        (meta_arch, "build_backbone"),
        (meta_arch, "build_model_from_config"),
    ):
        monkeypatch.setattr(module, name, refuse)
    exported_predictor = ExportedPredictor(str(exported("torch_export")), trust_code=True)
    model = exported_predictor.model
    assert sum(p.numel() for p in model.parameters()) == 0
    assert model.processing.backbone is None
    assert not any(isinstance(m, PanopticSegFormerCore) for m in model.modules())
