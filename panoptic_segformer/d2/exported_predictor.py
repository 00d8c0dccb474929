"""Running an exported network with the PyTorch model's own pre- and post-processing (needs
detectron2).

:class:`ExportedPredictor` is :class:`panoptic_segformer.d2.predictor.Predictor` with an exported
file (:class:`~panoptic_segformer.deploy.runtime.ExportedNetwork`) in place of the network:
same resizing, normalisation and padding, same post-processing
(:meth:`PanopticSegFormer.inference` of the meta-architecture, built from the config the file
carries), same detectron2 outputs (``panoptic_seg``, ...), same channel-order convention
(BGR by default, ``format="RGB"`` for :func:`~panoptic_segformer.d2.predictor.load_image`'s
images). The PyTorch network is not built: only the meta-architecture's pre- and
post-processing (:meth:`PanopticSegFormer.processing_only`).
"""

from typing import Optional

from detectron2.config import CfgNode, get_cfg
from torch import nn

from panoptic_segformer.d2.config import add_panoptic_segformer_config
from panoptic_segformer.d2.meta_arch import PanopticSegFormer
from panoptic_segformer.d2.predictor import Predictor
from panoptic_segformer.deploy.runtime import ExportedNetwork

__all__ = ["ExportedPredictor"]


def _config_from_text(text: str):
    """The config saved in an exported file (``cfg.dump()``)."""
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_other_cfg(CfgNode.load_cfg(text))
    cfg.MODEL.WEIGHTS = ""
    return cfg


class _ExportedModel(nn.Module):
    """The meta-architecture's inference with an exported network: ``processing`` is the
    meta-architecture without a network of its own (:meth:`PanopticSegFormer.processing_only`:
    no parameters)."""

    def __init__(self, processing: PanopticSegFormer, network: ExportedNetwork) -> None:
        super().__init__()
        self.processing = processing
        self.network = network

    def forward(self, batched_inputs):
        return self.processing.inference(batched_inputs, self.network)


class ExportedPredictor(Predictor):
    """:class:`~panoptic_segformer.d2.predictor.Predictor` running an exported file: the same
    pre-processing, post-processing, call and outputs (detectron2's ``panoptic_seg``, ...). No
    PyTorch network is built: ``model`` holds the file and the meta-architecture's pre- and
    post-processing only, without parameters.

    Args:
        path: the exported file (``.onnx``, ``.ts`` or ``.pt2``).
        cfg: the config for pre- and post-processing (test size, thresholds); None takes the
            one saved in the file. Its ``MODEL.WEIGHTS`` is not read: the weights are in the
            file.
        threads, trust_code: as in :class:`ExportedNetwork` (TorchScript and torch.export
            files run code they hold, and load only with ``trust_code=True``).

    Raises:
        ValueError: as :class:`ExportedNetwork` (:class:`UntrustedCode` included), or no ``cfg``
            for a file without one.
    """

    def __init__(
        self, path: str, cfg=None, threads: Optional[int] = None, *, trust_code: bool = False
    ) -> None:
        network = ExportedNetwork(path, threads, trust_code=trust_code)
        if cfg is None and not network.metadata["config"]:
            raise ValueError(
                f"{path} holds no config (exported from the core model, not the "
                "meta-architecture): pass the model's cfg"
            )
        cfg = _config_from_text(network.metadata["config"]) if cfg is None else cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"  # the exported network runs, and returns its outputs, there
        self._setup(cfg)
        self.network = network
        # the weights and class names are in the file
        self.class_info = network.metadata.get("class_info")
        # padded to the multiples the file takes (the backbone's, for the full model)
        processing = PanopticSegFormer.processing_only(
            self.cfg, network.metadata["size_divisibility"]
        )
        self.model = _ExportedModel(processing, network).eval()
