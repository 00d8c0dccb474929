"""Deployment: exporting the network (ONNX, TorchScript, torch.export) and running the exported
file. Exporting and :class:`ExportedNetwork` need no detectron2; :class:`ExportedPredictor`
(the PyTorch model's pre- and post-processing around the file) does, and is exported here where
detectron2 is installed. ONNX needs the ``deploy`` extra (onnx, onnxruntime, onnxscript)."""

import importlib.util

from panoptic_segformer.deploy.export import (
    EXPORTERS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportableNetwork,
    export_network,
    network_of,
)
from panoptic_segformer.deploy.runtime import ExportedNetwork, format_of, max_abs_differences

__all__ = [
    "EXPORTERS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportableNetwork",
    "ExportedNetwork",
    "export_network",
    "format_of",
    "max_abs_differences",
    "network_of",
]

if importlib.util.find_spec("detectron2") is not None:
    from panoptic_segformer.deploy.predictor import ExportedPredictor

    __all__ += ["ExportedPredictor"]
