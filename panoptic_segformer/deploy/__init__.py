"""Deployment: exporting the network (ONNX, TorchScript, torch.export) and running the exported
file. Exporting and :class:`ExportedNetwork` need no detectron2; :class:`ExportedPredictor`
(the PyTorch model's pre- and post-processing around the file) does, and is imported from
:mod:`panoptic_segformer.d2.exported_predictor` when first asked for. ONNX needs the ``deploy`` extra
(onnx, onnxruntime, onnxscript)."""

from typing import Any

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
    "ExportedPredictor",
    "export_network",
    "format_of",
    "max_abs_differences",
    "network_of",
]


def __getattr__(name: str) -> Any:
    # ExportedPredictor imports detectron2: only when asked for
    if name != "ExportedPredictor":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from panoptic_segformer.d2.exported_predictor import ExportedPredictor

    return ExportedPredictor
