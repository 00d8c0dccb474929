"""Deployment: exporting the network (ONNX, TorchScript, torch.export) and running the exported
file, without detectron2. The detectron2 predictor around an exported file (the model's pre- and
post-processing) is :class:`panoptic_segformer.d2.ExportedPredictor`. ONNX needs the ``deploy``
extra (onnx, onnxruntime, onnxscript)."""

from panoptic_segformer.deploy.export import (
    EXPORTERS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportableNetwork,
    export_network,
    network_of,
)
from panoptic_segformer.deploy.runtime import (
    CODE_FORMATS,
    ExportedNetwork,
    UntrustedCode,
    format_of,
    max_abs_differences,
)

__all__ = [
    "CODE_FORMATS",
    "EXPORTERS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "UntrustedCode",
    "ExportableNetwork",
    "ExportedNetwork",
    "export_network",
    "format_of",
    "max_abs_differences",
    "network_of",
]
