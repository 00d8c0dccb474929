"""Fixtures of the deployment tests: two photos; a tiny core model (plain PyTorch) and a tiny
detectron2 model, each exported once per format (session scope: exporting is the slow part).
The core model's fixtures need no detectron2; the others import it when first used."""

from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deploy_helpers import TINY_DEPLOY
from skips import require
from tiny_core_model import build_tiny_core_model
from torch import Tensor

# the core model's input, as the detectron2 model's (TINY_DEPLOY): short side 96, ImageNet
# normalisation in RGB order, padding to a multiple of 32 (the backbone's largest stride)
CORE_SHORT_SIDE = 96
CORE_DIVISIBILITY = 32
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _generated_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A (H, W, 3) uint8 BGR stand-in for a photo: smooth random blobs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((16, 16, 1), np.float32))[:height, :width]
    return big.astype(np.uint8)


@pytest.fixture(scope="session")
def photos() -> List[np.ndarray]:
    """Two (H, W, 3) uint8 BGR photos of different aspect ratios: the two real COCO photos
    (640 x 427 and 640 x 360) where present, else generated images of those sizes."""
    from coco_panoptic_sample import REAL_SAMPLE
    from PIL import Image

    paths = sorted((REAL_SAMPLE / "images").glob("*.jpg"))
    if len(paths) >= 2:
        # RGB -> BGR, as detectron2's predictors take images
        return [
            np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:, :, ::-1])
            for p in paths[:2]
        ]
    return [_generated_photo(427, 640, 0), _generated_photo(360, 640, 1)]


def core_input(photo: np.ndarray) -> Tuple[Tensor, Tensor]:
    """A photo as the core model takes it: resized to a short side of 96, normalised, padded.

    Args:
        photo: (H, W, 3) uint8 BGR.

    Returns:
        (1, 3, Hp, Wp) float32 images and their (1, Hp, Wp) bool padding mask.
    """
    # (H, W, 3) BGR -> (1, 3, H, W) RGB
    rgb = torch.from_numpy(np.ascontiguousarray(photo[:, :, ::-1])).permute(2, 0, 1)[None]
    scale = CORE_SHORT_SIDE / min(photo.shape[:2])
    size = (round(photo.shape[0] * scale), round(photo.shape[1] * scale))
    resized = F.interpolate(rgb.float(), size=size, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    padded = [-(-side // CORE_DIVISIBILITY) * CORE_DIVISIBILITY for side in size]
    images = torch.zeros(1, 3, *padded)
    images[:, :, : size[0], : size[1]] = (resized - mean) / std
    padding_mask = torch.ones(1, *padded, dtype=torch.bool)
    padding_mask[:, : size[0], : size[1]] = False
    return images, padding_mask


@pytest.fixture(scope="session")
def core_model() -> torch.nn.Module:
    """The core model (no detectron2): ResNet-18, hidden 32, one layer per stack, 8 queries,
    3 thing and 2 stuff classes, random weights; eval mode."""
    from panoptic_segformer.modeling.inference import InferenceOptions

    return build_tiny_core_model(
        num_thing_classes=3,
        num_stuff_classes=2,
        n_heads=2,
        inference=InferenceOptions(max_detections=5),
    )


@pytest.fixture(scope="session")
def core_inputs(photos) -> List[Tuple[Tensor, Tensor]]:
    """The two photos as the core model takes them: (1, 3, 96, 160) and (1, 3, 96, 192) images
    with their padding masks."""
    return [core_input(photo) for photo in photos]


def _needs_onnx(fmt: str) -> None:
    if fmt == "onnx":
        require("onnxruntime", "ONNX needs the deploy extra (onnxruntime)")
        require("onnxscript", "ONNX needs the deploy extra (onnxscript)")


def _exporter(folder: Path, model, inputs: Tuple[Tensor, Tensor], **kwargs) -> Callable:
    """A function exporting ``model`` once per format (at the size of ``inputs``) and returning
    the file: batch 1 for ONNX and TorchScript, any batch for torch.export."""
    from panoptic_segformer.deploy import EXPORTERS, export_network

    files = {}

    def get(fmt: str) -> Path:
        _needs_onnx(fmt)
        if fmt not in files:
            images, padding_mask = inputs
            dynamic_batch = fmt == "torch_export"
            if dynamic_batch:  # torch.export specialises a batch of 1: trace with 2
                images, padding_mask = images.repeat(2, 1, 1, 1), padding_mask.repeat(2, 1, 1)
            path = folder / f"tiny{EXPORTERS[fmt][0]}"
            with torch.no_grad():
                export_network(
                    model,
                    images,
                    padding_mask,
                    fmt,
                    str(path),
                    dynamic_batch=dynamic_batch,
                    **kwargs,
                )
            files[fmt] = path
        return files[fmt]

    return get


@pytest.fixture(scope="session")
def core_exported(tmp_path_factory, core_model, core_inputs) -> Callable:
    """Per format, the core model exported at the first photo's size (:func:`_exporter`)."""
    folder = tmp_path_factory.mktemp("core_exported")
    return _exporter(folder, core_model, core_inputs[0], size_divisibility=CORE_DIVISIBILITY)


@pytest.fixture(scope="session")
def core_network(core_exported) -> Callable:
    """Per format, the core model's exported file loaded once (loading a program takes
    seconds): an :class:`~panoptic_segformer.deploy.ExportedNetwork`."""
    from panoptic_segformer.deploy import ExportedNetwork

    networks = {}

    def get(fmt: str):
        if fmt not in networks:
            networks[fmt] = ExportedNetwork(str(core_exported(fmt)), trust_code=True)
        return networks[fmt]

    return get


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny model's config, with thresholds that let an untrained model paint segments."""
    from d2_helpers import CONFIGS, PERMISSIVE_SCORES, make_cfg

    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml", *TINY_DEPLOY, *PERMISSIVE_SCORES)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="session")
def predictor(tiny_cfg):
    from panoptic_segformer.d2.predictor import Predictor

    torch.manual_seed(0)
    return Predictor(tiny_cfg)


@pytest.fixture(scope="session")
def network_inputs(predictor, photos):
    """The two photos as the network takes them: (1, 3, 96, 160) and (1, 3, 96, 192) images with
    their padding masks."""
    from panoptic_segformer.deploy.export import sample_inputs

    return [sample_inputs(predictor, photo) for photo in photos]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, predictor, network_inputs, tiny_cfg) -> Callable:
    """Per format, the detectron2 model exported at the first photo's size (:func:`_exporter`),
    with its config and class names."""
    from panoptic_segformer.d2.class_info import class_info_of_config

    folder = tmp_path_factory.mktemp("exported")
    return _exporter(
        folder,
        predictor.model,
        network_inputs[0],
        config_text=tiny_cfg.dump(),
        class_info=class_info_of_config(tiny_cfg),
    )
