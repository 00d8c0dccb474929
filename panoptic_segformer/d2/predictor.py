"""One-image inference from a config: detectron2's ``DefaultPredictor`` with the weights check.

A ``detectron2.engine.DefaultPredictor`` (build the model, load ``MODEL.WEIGHTS``, resize to
``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, return the outputs at the image's size) loading
through :class:`PanopticSegFormerCheckpointer`, so wrong weights raise instead of
giving a random model, and an empty ``MODEL.WEIGHTS`` is said out loud.
"""

import logging
import os
from typing import Dict, Optional

import numpy as np
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor

from panoptic_segformer.d2.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.d2.class_info import CLASS_INFO_KEY, drawing_metadata
from panoptic_segformer.d2.registration import register

__all__ = ["Predictor", "load_image"]

logger = logging.getLogger(__name__)


def load_image(path: str) -> np.ndarray:
    """Reads an image file as an (H, W, 3) uint8 BGR array, the way a user expects to see it.

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
    return np.ascontiguousarray(rgb[:, :, ::-1])


class Predictor(DefaultPredictor):
    """Builds the model of ``cfg``, loads its weights, prepares it for inference
    (:meth:`~panoptic_segformer.d2.meta_arch.PanopticSegFormer.prepare_for_inference`) and predicts
    one image at a time: detectron2's ``DefaultPredictor`` with our checkpointer and input checks.

    Attributes:
        metadata: of ``cfg.DATASETS.TEST[0]`` (``cfg.DATASETS.TRAIN[0]`` when there is no test
            dataset): class names and colours for drawing, or the class names saved with the
            weights when that dataset is not registered.
        dataset_name: the dataset whose metadata is drawn with, or None.
        class_info: the class names saved with the weights, or None.
    """

    def __init__(self, cfg) -> None:
        register()
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {cfg.INPUT.FORMAT!r}")
        datasets = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.dataset_name = datasets[0] if datasets else None
        # DefaultPredictor.__init__ builds the model in eval mode, the test resizing and the
        # metadata; it would also load MODEL.WEIGHTS with detectron2's checkpointer, which reads
        # .pkl files with pickle.load and leaves missing weights random, so it is given the
        # config without weights (fvcore then logs "No checkpoint found") and _load_weights
        # loads them
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""
        super().__init__(unloaded)
        self.cfg = cfg.clone()
        self.class_info = self._load_weights()
        # folds the backbone's frozen batch norms, channels-last weights (after loading them)
        self.model.prepare_for_inference()

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
        # DefaultPredictor.__init__ sets MetadataCatalog's entry of DATASETS.TEST[0]: the getter
        # draws with that dataset's, read when drawing (it may be registered after this)
        self.dataset_name = metadata.name

    def __call__(self, original_image: np.ndarray) -> dict:
        """
        Args:
            original_image: (H, W, 3) uint8 image in BGR order (as ``cv2.imread`` gives).

        Returns:
            the model's outputs for the image, at its size (see the meta-architecture).
        """
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) BGR image, got shape {original_image.shape}")
        if original_image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {original_image.dtype}")
        if min(original_image.shape[:2]) < 1:
            raise ValueError(f"the image is empty: shape {original_image.shape}")
        return super().__call__(original_image)
