"""One-image inference from a config: detectron2's ``DefaultPredictor`` with the weights check.

The same as ``detectron2.engine.DefaultPredictor`` (build the model, load ``MODEL.WEIGHTS``,
resize to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, return the outputs at the image's size)
but loading through :class:`PanopticSegFormerCheckpointer`, so wrong weights raise instead of
giving a random model, and an empty ``MODEL.WEIGHTS`` is said out loud.
"""

import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer

__all__ = ["Predictor"]

logger = logging.getLogger(__name__)


class Predictor:
    """Builds the model of ``cfg`` in eval mode and predicts one image at a time.

    Attributes:
        metadata: of ``cfg.DATASETS.TEST[0]`` (class names and colours for drawing).
    """

    def __init__(self, cfg) -> None:
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            PanopticSegFormerCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning(
                "MODEL.WEIGHTS is empty: the model is untrained and its predictions mean nothing"
            )
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
        self.resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")

    def __call__(self, original_image: np.ndarray) -> dict:
        """
        Args:
            original_image: (H, W, 3) uint8 image in BGR order (as ``cv2.imread`` gives).

        Returns:
            the model's outputs for the image, at its size (see the meta-architecture).
        """
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) BGR image, got shape {original_image.shape}")
        with torch.no_grad():
            image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
            height, width = image.shape[:2]
            image = self.resize.get_transform(image).apply_image(image)
            image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            return self.model([{"image": image, "height": height, "width": width}])[0]
