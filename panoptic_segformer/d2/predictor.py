"""One-image inference from a config: build the model, load ``MODEL.WEIGHTS`` once (through
:class:`PanopticSegFormerCheckpointer`, so wrong weights raise instead of giving a random model,
and an empty ``MODEL.WEIGHTS`` is said out loud), resize to ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``, return the outputs at the image's size, as detectron2's ``DefaultPredictor``.

Channel order: :func:`load_image` decodes to RGB (PIL's order, and what detectron2's
``Visualizer`` draws on), so a decoded image goes to the predictor and to the drawing as it is.
:class:`Predictor` takes an image in either order, BGR by default as ``DefaultPredictor`` (what
``cv2.imread`` and video frames give), or RGB with ``format="RGB"``; it converts to the model's
``INPUT.FORMAT`` once, only where the two differ.
"""

import logging
import os
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model

from panoptic_segformer.d2.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.d2.class_info import CLASS_INFO_KEY, drawing_metadata
from panoptic_segformer.d2.registration import register

__all__ = ["FORMATS", "Predictor", "load_image"]

FORMATS = ("RGB", "BGR")  # the channel orders images and INPUT.FORMAT may have

logger = logging.getLogger(__name__)


def load_image(path: str) -> np.ndarray:
    """Reads an image file as an (H, W, 3) uint8 RGB array, the way a user expects to see it
    (pass it to :class:`Predictor` with ``format="RGB"``, and to detectron2's ``Visualizer`` as
    it is).

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit
    images become 8-bit RGB (16-bit values are scaled, not clipped).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not an image PIL can decode, it is truncated or corrupt, or
            its header claims more pixels than PIL decodes safely (a decompression bomb:
            ``Image.MAX_IMAGE_PIXELS`` and twice that); the message names the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated or corrupt data fails here
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                values = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
                gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
                rgb = np.repeat(gray[..., None], 3, axis=2)
            elif image.mode == "F":
                gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
                rgb = np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
            else:
                rgb = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: refused, a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode the image ({e})") from None
    return np.ascontiguousarray(rgb)


class Predictor:
    """Builds the model of ``cfg``, loads its weights once, prepares it for inference
    (:meth:`~panoptic_segformer.d2.meta_arch.PanopticSegFormer.prepare_for_inference`) and predicts
    one image at a time, as detectron2's ``DefaultPredictor`` (whose attributes and call it
    keeps) with our checkpointer, input checks and a ``format`` argument.

    Attributes:
        cfg: a copy of the config.
        model: the meta-architecture, prepared for inference.
        aug: the test resizing (``INPUT.MIN_SIZE_TEST``, ``INPUT.MAX_SIZE_TEST``).
        input_format: ``INPUT.FORMAT``, the channel order the model takes.
        metadata: of ``cfg.DATASETS.TEST[0]`` (``cfg.DATASETS.TRAIN[0]`` when there is no test
            dataset): class names and colours for drawing, or the class names saved with the
            weights when that dataset is not registered.
        dataset_name: the dataset whose metadata is drawn with, or None.
        class_info: the class names saved with the weights, or None.
    """

    def __init__(self, cfg) -> None:
        self._setup(cfg)
        self.model = build_model(self.cfg)  # on MODEL.DEVICE
        self.class_info = self._load_weights()
        # eval mode; folds the backbone's frozen batch norms, channels-last weights (after
        # loading them)
        self.model.prepare_for_inference()

    def _setup(self, cfg) -> None:
        """What does not depend on the model: the config, the test resizing, the dataset."""
        register()
        if cfg.INPUT.FORMAT not in FORMATS:
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {cfg.INPUT.FORMAT!r}")
        self.cfg = cfg.clone()
        self.input_format = cfg.INPUT.FORMAT
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        datasets = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.dataset_name = datasets[0] if datasets else None

    def _load_weights(self) -> Optional[Dict[str, object]]:
        """Loads ``MODEL.WEIGHTS`` into the model; returns the class info saved with them."""
        if not self.cfg.MODEL.WEIGHTS:
            logger.warning(
                "MODEL.WEIGHTS is empty: the model is untrained and its predictions mean nothing"
            )
            return None
        checkpoint = PanopticSegFormerCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        return checkpoint.get(CLASS_INFO_KEY)

    @property
    def metadata(self) -> Metadata:
        """The class names and colours to draw with: the dataset's when it is registered, else
        those saved with the model.

        Raises:
            ValueError: neither has them (the message names the dataset and the fix).
        """
        return drawing_metadata(self.dataset_name, self.class_info)

    @metadata.setter
    def metadata(self, metadata: Metadata) -> None:
        # the getter draws with that dataset's, read when drawing (it may be registered after this)
        self.dataset_name = metadata.name

    def preprocess(self, image: np.ndarray, format: str = "BGR") -> Dict[str, object]:
        """The model's input dict of an image: in ``INPUT.FORMAT`` (flipped once, when
        ``format`` is not it), resized to the test size, with the image's height and width.

        Args:
            image: (H, W, 3) uint8 image.
            format: its channel order, "BGR" or "RGB".

        Raises:
            ValueError: a bad ``format``, shape or dtype, or an empty image.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be RGB or BGR, got {format!r}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) {format} image, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"the image is empty: shape {image.shape}")
        if format != self.input_format:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        # (H, W, 3) -> (3, H, W); the model moves it to its device
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}

    def __call__(self, original_image: np.ndarray, format: str = "BGR") -> dict:
        """
        Args:
            original_image: (H, W, 3) uint8 image, in BGR order by default (as ``cv2.imread``
                gives and ``DefaultPredictor`` takes).
            format: its channel order: "BGR", or "RGB" (as :func:`load_image` gives).

        Returns:
            the model's outputs for the image, at its size (see the meta-architecture).

        Raises:
            ValueError: as :meth:`preprocess`.
        """
        inputs = self.preprocess(original_image, format)
        with torch.no_grad():
            return self.model([inputs])[0]
