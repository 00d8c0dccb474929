"""Drawing Panoptic SegFormer's predictions with detectron2's Visualizer (images, videos).

Channel order: RGB throughout. Images come in RGB (``load_image`` of
:mod:`panoptic_segformer.d2.predictor` decodes to it), go to the predictor with ``format="RGB"``
(which converts to the model's ``INPUT.FORMAT`` once, only if that is BGR) and to the
Visualizer, which draws in RGB, as they are; drawings are RGB. OpenCV's BGR appears only at the
edges: :meth:`VisualizationDemo.run_on_video` converts the frames it reads, and the caller
converts what it shows or writes with OpenCV.
"""

import functools
from typing import Callable, Dict, Iterator, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from panoptic_segformer.d2.predictor import Predictor


def keep_confident(predictions: Dict, threshold: float) -> Dict:
    """The predictions without panoptic segments and instances scoring under ``threshold``
    (their pixels are drawn as void)."""
    kept = dict(predictions)
    if "panoptic_seg" in kept:
        seg, segments = kept["panoptic_seg"]
        kept["panoptic_seg"] = (seg, [s for s in segments if s.get("score", 1.0) >= threshold])
    if "instances" in kept:
        instances = kept["instances"]
        kept["instances"] = instances[instances.scores >= threshold]
    return kept


def draw(shown: Dict, panoptic: Callable, semantic: Callable, instances: Callable) -> VisImage:
    """Draws the panoptic result, else the semantic map, else the instances, with the given
    drawing functions of a Visualizer or VideoVisualizer (results moved to the CPU)."""
    cpu = torch.device("cpu")
    if "panoptic_seg" in shown:
        seg, segments = shown["panoptic_seg"]
        return panoptic(seg.to(cpu), segments)
    if "sem_seg" in shown:
        return semantic(shown["sem_seg"].argmax(dim=0).to(cpu))
    return instances(shown["instances"].to(cpu))


class VisualizationDemo:
    """Runs :class:`Predictor` (or, given ``exported``, an exported file through
    :class:`~panoptic_segformer.d2.ExportedPredictor`) and draws the panoptic segmentation
    (or, when the model returns no panoptic result, the semantic map or the instances).

    Args:
        cfg: the config; with ``exported`` it may be None (the file's own config is used).
        exported: an exported model file (``.onnx``, ``.ts``, ``.pt2``), or None.
        trust_exported_code: consent to load a ``.ts`` or ``.pt2`` file, which runs code it
            holds (``ExportedPredictor``'s ``trust_code``).

    Raises:
        ValueError: no class names to draw with (the dataset is not registered and the model
            carries none).
    """

    def __init__(
        self,
        cfg,
        confidence_threshold: float = 0.5,
        instance_mode=ColorMode.IMAGE,
        exported: Optional[str] = None,
        trust_exported_code: bool = False,
    ):
        if exported:
            from panoptic_segformer.d2 import ExportedPredictor

            self.predictor = ExportedPredictor(exported, cfg, trust_code=trust_exported_code)
        else:
            self.predictor = Predictor(cfg)
        self.metadata = self.predictor.metadata
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode

    def run_on_image(self, image: np.ndarray) -> Tuple[Dict, VisImage]:
        """
        Args:
            image: (H, W, 3) uint8 RGB image (as ``load_image`` gives).

        Returns:
            the raw predictions and the drawing (RGB).
        """
        predictions = self.predictor(image, format="RGB")
        shown = keep_confident(predictions, self.confidence_threshold)
        visualizer = Visualizer(image, self.metadata, instance_mode=self.instance_mode)
        drawing = draw(
            shown,
            visualizer.draw_panoptic_seg,
            visualizer.draw_sem_seg,
            visualizer.draw_instance_predictions,
        )
        return predictions, drawing

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Drawn (H, W, 3) uint8 RGB frames of a video or webcam stream, one per input frame (the
        BGR frames OpenCV reads are converted once, here)."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            success, frame = video.read()
            if not success:
                break
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            shown = keep_confident(self.predictor(rgb, format="RGB"), self.confidence_threshold)
            drawing = draw(
                shown,
                functools.partial(video_visualizer.draw_panoptic_seg_predictions, rgb),
                functools.partial(video_visualizer.draw_sem_seg, rgb),
                functools.partial(video_visualizer.draw_instance_predictions, rgb),
            )
            yield drawing.get_image()
