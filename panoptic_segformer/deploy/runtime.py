"""Running an exported network (ONNX Runtime, TorchScript, torch.export) with the PyTorch
model's own pre- and post-processing.

:class:`ExportedNetwork` loads a file of :func:`panoptic_segformer.deploy.export_network` and
maps (N, 3, Hp, Wp) images and their padding mask to the network's output dict.
:class:`ExportedPredictor` is :class:`panoptic_segformer.predictor.Predictor` with that file in
place of the network: same resizing, normalisation and padding, same post-processing
(:meth:`PanopticSegFormer.inference` of the meta-architecture, built from the config the file
carries), same detectron2 outputs (``panoptic_seg``, ...).
"""

import json
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from panoptic_segformer.deploy import ort_ops
from panoptic_segformer.deploy.export import EXPORTERS, METADATA_KEY
from panoptic_segformer.predictor import Predictor

__all__ = ["ExportedNetwork", "ExportedPredictor", "format_of"]


def format_of(path: str) -> str:
    """The export format of a file, from its suffix (``.onnx``, ``.ts``, ``.pt2``).

    Raises:
        ValueError: naming the file and the suffixes known.
    """
    for fmt, (suffix, _) in EXPORTERS.items():
        if path.endswith(suffix):
            return fmt
    known = ", ".join(f"{suffix} ({fmt})" for fmt, (suffix, _) in EXPORTERS.items())
    raise ValueError(f"{path}: unknown exported model format; the known suffixes are {known}")


def _load_onnx(path: str, threads: Optional[int]) -> Tuple[Callable, Optional[str]]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # a file exported with the custom operator needs its library (built on first use)
    domains = {entry.domain for entry in onnx.load(path, load_external_data=False).opset_import}
    if ort_ops.DOMAIN in domains:
        ort_ops.register(options)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    names = [o.name for o in session.get_outputs()]

    def run(images: Tensor, padding_mask: Tensor) -> Dict[str, Tensor]:
        feed = {"images": images.cpu().numpy(), "padding_mask": padding_mask.cpu().numpy()}
        return {n: torch.from_numpy(v) for n, v in zip(names, session.run(names, feed))}

    return run, metadata


def _load_program(path: str, threads: Optional[int]) -> Tuple[Callable, Optional[str]]:
    from panoptic_segformer.layers.ms_deform_attn_op import load_operator

    load_operator("cpu")  # the program calls the registered operator
    files = {METADATA_KEY: ""}
    module = torch.export.load(path, extra_files=files).module()
    return _tuple_runner(module), files[METADATA_KEY]


def _load_torchscript(path: str, threads: Optional[int]) -> Tuple[Callable, Optional[str]]:
    from panoptic_segformer.layers.ms_deform_attn_op import load_operator

    load_operator("cpu")
    files = {METADATA_KEY: ""}
    module = torch.jit.load(path, _extra_files=files, map_location="cpu")
    return _tuple_runner(module), files[METADATA_KEY]


def _tuple_runner(module: Callable) -> Callable:
    """The module called without autograd; it returns a tuple, which :class:`ExportedNetwork`
    names by the file's output names."""

    def run(images: Tensor, padding_mask: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            return module(images, padding_mask)

    return run


# format -> loader(path, threads) -> (run(images, padding_mask), the metadata JSON or None)
_LOADERS = {"onnx": _load_onnx, "torch_export": _load_program, "torchscript": _load_torchscript}


class ExportedNetwork:
    """An exported network, called like the meta-architecture's network on tensors.

    Args:
        path: a file written by :func:`~panoptic_segformer.deploy.export_network`; its format
            is read from its suffix.
        threads: CPU threads of ONNX Runtime (None: its default); the torch formats use torch's.

    Attributes:
        format: "onnx", "torchscript" or "torch_export".
        metadata: the dict saved with the file (output names, batch, size divisibility, config,
            class info).

    Raises:
        FileNotFoundError: no such file.
        LibraryUnavailable: an ONNX file with the custom operator, whose library cannot be
            built here (:mod:`panoptic_segformer.deploy.ort_ops`).
        ValueError: an unknown suffix, or a file that cannot be loaded as its format (the message
            names the file and the cause).
    """

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        self.format = format_of(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such exported model file")
        try:
            run, metadata = _LOADERS[self.format](path, threads)
        except ImportError as e:
            raise ImportError(
                f"{path}: running {self.format} files needs {e.name}: pip install "
                "'panoptic_segformer[deploy]' (or the README's install command)"
            ) from e
        except ort_ops.LibraryUnavailable as e:
            raise ort_ops.LibraryUnavailable(
                f"{path} holds nodes of the ONNX Runtime operator "
                f"{ort_ops.DOMAIN}::{ort_ops.OPERATOR}: {e}"
            ) from None
        except Exception as e:  # each runtime raises its own types for a corrupt file
            raise ValueError(f"{path}: cannot load it as a {self.format} model ({e})") from None
        if not metadata:
            raise ValueError(
                f"{path}: a {self.format} file without Panoptic SegFormer's metadata; export it "
                "with tools/deploy/export_model.py"
            )
        self.path = path
        self.metadata = json.loads(metadata)
        self._run = run

    def __call__(self, images: Tensor, padding_mask: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            images (Tensor): (N, 3, Hp, Wp) float32 normalised padded images.
            padding_mask (Tensor): (N, Hp, Wp) bool, True at padding.

        Returns:
            the network's outputs by name (see :data:`~panoptic_segformer.deploy.OUTPUT_NAMES`).

        Raises:
            ValueError: a batch size the file was not exported for, a size that is not a
                multiple of its size divisibility, or (TorchScript) not the exported size.
        """
        batch, divisibility = self.metadata["batch"], self.metadata["size_divisibility"]
        if batch is not None and images.shape[0] != batch:
            raise ValueError(
                f"{self.path} was exported for a batch of {batch} image(s) but got "
                f"{images.shape[0]}; export with --dynamic-batch, or run {batch} at a time"
            )
        height, width = images.shape[-2:]
        if height % divisibility or width % divisibility:
            raise ValueError(
                f"{self.path} takes heights and widths that are multiples of {divisibility}, got "
                f"{height} x {width}"
            )
        fixed = self.metadata.get("fixed_size")
        if fixed is not None and [height, width] != list(fixed):
            raise ValueError(
                f"{self.path} ({self.format}) takes only the size it was exported at, "
                f"{fixed[0]} x {fixed[1]}, got {height} x {width}; export an onnx or "
                "torch_export file for any size"
            )
        outputs = self._run(images.float(), padding_mask.bool())
        if isinstance(outputs, dict):
            return outputs
        return dict(zip(self.metadata["output_names"], outputs))


def _config_from_text(text: str):
    """The config saved in an exported file (``cfg.dump()``)."""
    from detectron2.config import CfgNode, get_cfg

    from panoptic_segformer.config import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_other_cfg(CfgNode.load_cfg(text))
    cfg.MODEL.WEIGHTS = ""
    return cfg


class _ExportedModel(nn.Module):
    """The meta-architecture's inference with an exported network in place of its own."""

    def __init__(self, model: nn.Module, network: ExportedNetwork) -> None:
        super().__init__()
        self.model = model
        self.network = network

    def forward(self, batched_inputs):
        return self.model.inference(batched_inputs, self.network)


class ExportedPredictor(Predictor):
    """:class:`~panoptic_segformer.predictor.Predictor` running an exported file: the same
    pre-processing, post-processing and outputs (detectron2's ``panoptic_seg``, ...).

    Args:
        path: the exported file (``.onnx``, ``.ts`` or ``.pt2``).
        cfg: the config for pre- and post-processing (test size, thresholds); None takes the
            one saved in the file. Its ``MODEL.WEIGHTS`` is not read: the weights are in the
            file.
        threads: as in :class:`ExportedNetwork`.
    """

    def __init__(self, path: str, cfg=None, threads: Optional[int] = None) -> None:
        network = ExportedNetwork(path, threads)
        cfg = _config_from_text(network.metadata["config"]) if cfg is None else cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"  # the exported network runs, and returns its outputs, there
        self.network = network
        super().__init__(cfg)
        self.model = _ExportedModel(self.model, network)

    def _load_weights(self) -> Optional[Dict[str, object]]:
        # the weights are in the exported file; the built model serves its pre- and
        # post-processing only
        return self.network.metadata.get("class_info")


def max_abs_differences(expected: Dict[str, Tensor], actual: Dict[str, Tensor]) -> Dict[str, float]:
    """Per output name, the largest absolute difference (integer outputs as floats).

    Raises:
        ValueError: the two have different names or shapes.
    """
    if set(expected) != set(actual):
        raise ValueError(f"outputs {sorted(actual)} differ from {sorted(expected)}")
    result = {}
    for name, value in expected.items():
        other = torch.as_tensor(np.asarray(actual[name]))
        if other.shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(other.shape)}, expected {tuple(value.shape)}")
        result[name] = (
            float((other.double() - value.double()).abs().max()) if value.numel() else 0.0
        )
    return result
