"""Fixtures of the deployment tests: a tiny model, two photos, and the model exported once per
format (session scope: exporting is the slow part)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "d2"))  # d2_helpers

from deploy_helpers import TINY_DEPLOY  # noqa: E402


def _generated_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A (H, W, 3) uint8 BGR stand-in for a photo: smooth random blobs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((16, 16, 1), np.float32))[:height, :width]
    return big.astype(np.uint8)


@pytest.fixture(scope="session")
def photos():
    """Two (H, W, 3) uint8 BGR photos of different aspect ratios: the COCO sample's two photos
    (640 x 427 and 640 x 360) where present, else generated images of those sizes."""
    from d2_helpers import SAMPLE

    from panoptic_segformer.predictor import load_image

    paths = sorted((SAMPLE / "images").glob("*.jpg"))
    if len(paths) >= 2:
        return [load_image(str(p)) for p in paths[:2]]
    return [_generated_photo(427, 640, 0), _generated_photo(360, 640, 1)]


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny model's config, with thresholds that let an untrained model paint segments."""
    from d2_helpers import CONFIGS, PERMISSIVE_SCORES, make_cfg

    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml", *TINY_DEPLOY, *PERMISSIVE_SCORES)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="session")
def predictor(tiny_cfg):
    import torch

    from panoptic_segformer.predictor import Predictor

    torch.manual_seed(0)
    return Predictor(tiny_cfg)


@pytest.fixture(scope="session")
def network_inputs(predictor, photos):
    """The two photos as the network takes them: (1, 3, 96, 160) and (1, 3, 96, 192) images with
    their padding masks."""
    from panoptic_segformer.deploy.export import sample_inputs

    return [sample_inputs(predictor, photo) for photo in photos]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, predictor, network_inputs, tiny_cfg):
    """Per format, a function exporting the tiny model once (at the first photo's size) and
    returning the file: ONNX and TorchScript for batch 1, torch.export for any batch."""
    import torch

    from panoptic_segformer.class_info import class_info_of_config
    from panoptic_segformer.deploy import EXPORTERS, export_network

    folder = tmp_path_factory.mktemp("exported")
    files = {}

    def get(fmt: str) -> Path:
        if fmt == "onnx":
            pytest.importorskip("onnxruntime", reason="ONNX needs the deploy extra (onnxruntime)")
            pytest.importorskip("onnxscript", reason="ONNX needs the deploy extra (onnxscript)")
        if fmt not in files:
            images, padding_mask = network_inputs[0]
            dynamic_batch = fmt == "torch_export"
            if dynamic_batch:
                images, padding_mask = images.repeat(2, 1, 1, 1), padding_mask.repeat(2, 1, 1)
            path = folder / f"tiny{EXPORTERS[fmt][0]}"
            with torch.no_grad():
                export_network(
                    predictor.model,
                    images,
                    padding_mask,
                    fmt,
                    str(path),
                    config_text=tiny_cfg.dump(),
                    class_info=class_info_of_config(tiny_cfg),
                    dynamic_batch=dynamic_batch,
                )
            files[fmt] = path
        return files[fmt]

    return get
