"""Deployment: exporting the network (ONNX, TorchScript, torch.export) and running the exported
file with the PyTorch model's pre- and post-processing. Needs detectron2; ONNX needs the
``deploy`` extra (onnx, onnxruntime, onnxscript)."""

from panoptic_segformer.deploy.export import (
    EXPORTERS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportableNetwork,
    export_network,
)
from panoptic_segformer.deploy.runtime import (
    ExportedNetwork,
    ExportedPredictor,
    format_of,
    max_abs_differences,
)

__all__ = [
    "EXPORTERS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportableNetwork",
    "ExportedNetwork",
    "ExportedPredictor",
    "export_network",
    "format_of",
    "max_abs_differences",
]
