"""Exporting the network of Panoptic SegFormer: ONNX, TorchScript, torch.export.

What is exported is the network (:func:`network_of`) of the plain-PyTorch core model or of the
detectron2 meta-architecture, from the normalised, padded images and their padding mask to plain
tensors (:data:`OUTPUT_NAMES`), with dynamic height and width (multiples of the size
divisibility). Exporting does not need detectron2. Pre- and post-processing stay in Python
(:mod:`panoptic_segformer.d2.exported_predictor` runs them around the exported file with the
meta-architecture's own code).

* ``torch_export``: ``torch.export`` keeps deformable attention as the registered operator
  ``panoptic_segformer::ms_deform_attn`` (load this package before loading the program).
* ``onnx``: the same program, translated by ``torch.onnx`` with deformable attention written
  as ``GridSample`` ops (:mod:`panoptic_segformer.deploy.onnx_ops`), opset 18; or, with
  ``ort_custom_op``, as the ONNX Runtime custom operator ``panoptic_segformer::MSDeformAttn``
  (faster; runs where :mod:`panoptic_segformer.deploy.ort_ops` can register its library).
* ``torchscript``: ``torch.jit.trace`` of the network, keeping the registered operator. A trace
  records the level shapes as constants, so this file takes the sample's padded size only (the
  model reads its level shapes from tensors, which tracing cannot keep symbolic).

Every file carries a JSON metadata dict (:data:`METADATA_KEY`): input and output names, the
batch size it takes (None: any), the size divisibility, the custom operators it needs, and for
a meta-architecture the config and the class names (:mod:`panoptic_segformer.d2.class_info`).

Shape shorthand: N images, Hp x Wp padded input, k kept thing queries, Z stuff classes,
H1 x W1 = Hp / 8 x Wp / 8.
"""

import json
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from panoptic_segformer.deploy.ort_ops import DOMAIN as ORT_DOMAIN
from panoptic_segformer.deploy.ort_ops import OPERATOR as ORT_OPERATOR

__all__ = [
    "EXPORTERS",
    "INPUT_NAMES",
    "METADATA_KEY",
    "OUTPUT_NAMES",
    "ONNX_OPSET",
    "ExportableNetwork",
    "export_network",
    "network_of",
    "sample_inputs",
]

INPUT_NAMES = ("images", "padding_mask")
# thing_boxes only with location decoder layers
OUTPUT_NAMES = (
    "thing_masks",
    "thing_scores",
    "thing_labels",
    "thing_boxes",
    "stuff_masks",
    "stuff_scores",
)
METADATA_KEY = "panoptic_segformer"
# torch.onnx's exporter (its torchlib) writes opset 18 and nothing lower; deformable attention's
# GridSample needs >= 16 (onnx_ops.py)
ONNX_OPSET = 18
METADATA_VERSION = 1
# padded sides an exported model accepts, in pixels (and multiples of its size divisibility):
# from 96, so that the stride-64 level has 2 rows and columns (torch.export would fix a size of
# 1 as a constant) and every level is smaller than the one before, to 16384
MIN_SIDE = 96
MAX_SIDE = 16384


def network_of(model: nn.Module) -> Callable[[Tensor, Tensor], Dict[str, Tensor]]:
    """The network of a model: (N, 3, Hp, Wp) normalised, padded images and their (N, Hp, Wp)
    bool padding mask -> the raw inference outputs by name (:data:`OUTPUT_NAMES`).

    Args:
        model: the detectron2 meta-architecture (its ``network`` method) or the core model
            (``modeling.panoptic_segformer``, built with a backbone: its ``forward``).
    """
    return getattr(model, "network", model)


class ExportableNetwork(nn.Module):
    """A model's network (:func:`network_of`) with a tuple of tensors out.

    Args:
        model: the core model or the detectron2 meta-architecture, in eval mode.
        output_names: the outputs returned, in order (those of :data:`OUTPUT_NAMES` the model
            has: :func:`output_names_of`).
        size_divisibility: the padded heights and widths it takes are multiples of this.
    """

    def __init__(
        self, model: nn.Module, output_names: Tuple[str, ...], size_divisibility: int
    ) -> None:
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)
        self.size_divisibility = size_divisibility

    def forward(self, images: Tensor, padding_mask: Tensor) -> Tuple[Tensor, ...]:
        """
        Args:
            images (Tensor): (N, 3, Hp, Wp) normalised, padded images.
            padding_mask (Tensor): (N, Hp, Wp) bool, True at padding.

        Returns:
            ``thing_masks`` (N, k, H1, W1), ``thing_scores`` (N, k), ``thing_labels`` (N, k),
            ``thing_boxes`` (N, k, 4), ``stuff_masks`` (N, Z, H1, W1), ``stuff_scores`` (N, Z),
            in ``output_names`` order.
        """
        outputs = network_of(self.model)(images, padding_mask)
        return tuple(outputs[name] for name in self.output_names)


def output_names_of(outputs: Dict[str, Tensor]) -> Tuple[str, ...]:
    """The names of :data:`OUTPUT_NAMES` present in the network's outputs, in order."""
    return tuple(name for name in OUTPUT_NAMES if name in outputs)


def _dynamic_shapes(size_divisibility: int, dynamic_batch: bool) -> Dict[str, Dict[int, object]]:
    """torch.export's dynamic dimensions: height and width from :data:`MIN_SIDE` to
    :data:`MAX_SIDE` px (multiples of the divisibility when it is over 1), and the batch when
    asked."""
    Dim = torch.export.Dim
    units = dict(min=-(-MIN_SIDE // size_divisibility), max=MAX_SIDE // size_divisibility)
    h, w = Dim("h", **units), Dim("w", **units)
    if size_divisibility > 1:
        h, w = size_divisibility * h, size_divisibility * w
    image_dims, mask_dims = {2: h, 3: w}, {1: h, 2: w}
    if dynamic_batch:
        batch = Dim("batch", min=1, max=64)
        image_dims[0] = mask_dims[0] = batch
    return {"images": image_dims, "padding_mask": mask_dims}


def _program(
    network: ExportableNetwork, args: Tuple[Tensor, Tensor], dynamic_batch: bool
) -> torch.export.ExportedProgram:
    divisibility = network.size_divisibility
    with torch.no_grad():
        return torch.export.export(
            network, args, dynamic_shapes=_dynamic_shapes(divisibility, dynamic_batch)
        )


def _save_onnx(
    network: ExportableNetwork,
    args: Tuple[Tensor, Tensor],
    path: str,
    dynamic_batch: bool,
    metadata: Dict[str, object],
) -> None:
    from panoptic_segformer.deploy.onnx_ops import onnx_translation_table

    program = _program(network, args, dynamic_batch)
    onnx_program = torch.onnx.export(
        program,
        args,
        custom_translation_table=onnx_translation_table(bool(metadata["custom_ops"])),
        opset_version=ONNX_OPSET,
        input_names=list(INPUT_NAMES),
        output_names=list(network.output_names),
        verbose=False,
    )
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    # one self-contained file (R50: ~190 MB, far under protobuf's 2 GB)
    onnx_program.save(path, external_data=False)


def _save_torch_export(
    network: ExportableNetwork,
    args: Tuple[Tensor, Tensor],
    path: str,
    dynamic_batch: bool,
    metadata: Dict[str, object],
) -> None:
    program = _program(network, args, dynamic_batch)
    torch.export.save(program, path, extra_files={METADATA_KEY: json.dumps(metadata)})


def _save_torchscript(
    network: ExportableNetwork,
    args: Tuple[Tensor, Tensor],
    path: str,
    dynamic_batch: bool,
    metadata: Dict[str, object],
) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(network, args, check_trace=False)
    torch.jit.save(traced, path, _extra_files={METADATA_KEY: json.dumps(metadata)})


# formats that take only the size they were exported at
FIXED_SIZE_FORMATS = ("torchscript",)
# format -> (file suffix, writer(network, (images, padding_mask), path, dynamic_batch, metadata))
EXPORTERS: Dict[str, Tuple[str, Callable[..., None]]] = {
    "onnx": (".onnx", _save_onnx),
    "torchscript": (".ts", _save_torchscript),
    "torch_export": (".pt2", _save_torch_export),
}


def export_network(
    model: nn.Module,
    images: Tensor,
    padding_mask: Tensor,
    fmt: str,
    path: str,
    config_text: str = "",
    class_info: Optional[Dict[str, object]] = None,
    dynamic_batch: bool = False,
    ort_custom_op: bool = False,
    size_divisibility: Optional[int] = None,
) -> Dict[str, object]:
    """Exports a model's network (:func:`network_of`) to ``path`` in format ``fmt``.

    Args:
        model: the core model (with a backbone) or the detectron2 meta-architecture, in eval
            mode, on the CPU.
        images (Tensor): (N, 3, Hp, Wp) normalised, padded sample images (N = 1, or N >= 2
            with ``dynamic_batch``).
        padding_mask (Tensor): (N, Hp, Wp) bool.
        fmt: one of :data:`EXPORTERS`.
        path: the file to write.
        config_text: the model's config (``cfg.dump()``), saved in the file.
        class_info: the class names to save
            (:func:`panoptic_segformer.d2.class_info.class_info_of`).
        dynamic_batch: export any batch size, else the sample's batch size only.
        ort_custom_op: (onnx) write deformable attention as the ONNX Runtime custom operator
            ``panoptic_segformer::MSDeformAttn`` instead of ``GridSample`` ops.
        size_divisibility: the exported file takes padded sides that are multiples of this;
            None takes the model's ``size_divisibility`` (the meta-architecture's,
            ``INPUT.SIZE_DIVISIBILITY``, 1 by default: any size; the core model has none: give
            1, or a multiple of the backbone's largest stride to take only padded sizes).

    Returns:
        the metadata saved with the file.

    Raises:
        ValueError: an unknown format, no size divisibility, or a sample whose size is not a
            multiple of the size divisibility or is under :data:`MIN_SIDE` px.
    """
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(EXPORTERS)}")
    if ort_custom_op and fmt != "onnx":
        raise ValueError(
            f"ort_custom_op is an ONNX Runtime operator: export format 'onnx', not {fmt!r}"
        )
    divisibility = size_divisibility or getattr(model, "size_divisibility", None)
    if not divisibility:
        raise ValueError(
            f"{type(model).__name__} has no size_divisibility: pass size_divisibility (1 for any "
            "size, as the meta-architecture's default, or a multiple of the backbone's stride)"
        )
    smallest = -(-MIN_SIDE // divisibility) * divisibility
    if images.shape[-2] % divisibility or images.shape[-1] % divisibility:
        raise ValueError(
            f"sample images of {tuple(images.shape[-2:])} px: height and width must be "
            f"multiples of the size divisibility {divisibility}"
        )
    if min(images.shape[-2:]) < smallest:
        raise ValueError(
            f"sample images of {tuple(images.shape[-2:])} px: export with images of at least "
            f"{smallest} x {smallest} (INPUT.MIN_SIZE_TEST), the smallest an exported model takes"
        )
    with torch.no_grad():
        names = output_names_of(network_of(model)(images, padding_mask))
    network = ExportableNetwork(model, names, divisibility).eval()
    metadata = {
        "version": METADATA_VERSION,
        "format": fmt,
        "input_names": list(INPUT_NAMES),
        "output_names": list(names),
        "batch": None if dynamic_batch else int(images.shape[0]),
        # a trace (TorchScript) holds the sample's size as constants
        "fixed_size": list(images.shape[-2:]) if fmt in FIXED_SIZE_FORMATS else None,
        "size_divisibility": int(divisibility),
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        # "domain::operator" of the custom operators the runtime must register
        "custom_ops": [f"{ORT_DOMAIN}::{ORT_OPERATOR}"] if ort_custom_op else [],
        "torch": torch.__version__,
        "config": config_text,
        "class_info": class_info,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    EXPORTERS[fmt][1](network, (images, padding_mask), path, dynamic_batch, metadata)
    return metadata


def sample_inputs(predictor, image: np.ndarray, format: str = "BGR") -> Tuple[Tensor, Tensor]:
    """An image as the predictor feeds it to the network: resized to the test size, normalised,
    padded (its ``preprocess``, then the meta-architecture's ``preprocess_images``).

    Args:
        predictor: a :class:`panoptic_segformer.d2.predictor.Predictor`.
        image: (H, W, 3) uint8.
        format: its channel order, "BGR" or "RGB" (as the predictor's call).

    Returns:
        (1, 3, Hp, Wp) images and their (1, Hp, Wp) bool padding mask.
    """
    tensor = predictor.preprocess(image, format)["image"]
    batch, padding_mask = predictor.model.preprocess_images([tensor])
    return batch.tensor, padding_mask
