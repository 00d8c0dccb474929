"""Running an exported network (ONNX Runtime, TorchScript, torch.export); no detectron2 needed.

:class:`ExportedNetwork` loads a file of :func:`panoptic_segformer.deploy.export_network` and
maps (N, 3, Hp, Wp) images and their padding mask to the network's output dict. ONNX files are
data; TorchScript and torch.export files are programs and load only with ``trust_code=True``.
:class:`panoptic_segformer.d2.exported_predictor.ExportedPredictor` runs it with the PyTorch model's
own pre- and post-processing.
"""

import json
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from panoptic_segformer.deploy import ort_ops
from panoptic_segformer.deploy.export import EXPORTERS, METADATA_KEY

__all__ = ["CODE_FORMATS", "ExportedNetwork", "UntrustedCode", "format_of", "max_abs_differences"]

# Formats whose files are programs: torch.jit.load runs the file's TorchScript (a scripted
# __setstate__ runs while loading, and may create and write files), torch.export.load unpickles
# weights the archive says are pickled. ONNX files are data: ONNX Runtime runs only its own
# operators (and ours, from the package's library).
CODE_FORMATS = ("torchscript", "torch_export")


class UntrustedCode(ValueError):
    """A TorchScript or torch.export file given without the caller's consent to run its code."""


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


def _check_consent(fmt: str, path: str, trust_code: bool) -> None:
    """Raises :class:`UntrustedCode` for a file of a code format without ``trust_code``."""
    if fmt in CODE_FORMATS and not trust_code:
        raise UntrustedCode(
            f"{path}: a {fmt} file is a program, and loading it runs code it holds (TorchScript, "
            "or pickled weights of torch.export); load it only from a source you trust, with "
            "trust_code=True (demo.py: --trust-exported-code). ONNX files are data and need no "
            "such consent."
        )


def _tensors(initializers, nodes) -> Iterator:
    """The tensors of a graph: its initializers and its nodes' attributes, subgraphs' included."""
    yield from initializers
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            graphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            for graph in graphs:
                yield from _tensors(graph.initializer, graph.node)


def _check_onnx_data(model) -> None:
    """Refuses what would make ONNX Runtime read other files or take settings from the file:
    tensors stored outside it (our exporter keeps the weights inside) and the ``ort_config``
    metadata (session options ONNX Runtime reads when ORT_LOAD_CONFIG_FROM_MODEL=1)."""
    from onnx.external_data_helper import uses_external_data

    if any(entry.key == "ort_config" for entry in model.metadata_props):
        raise ValueError(
            "refused: it holds ONNX Runtime session settings ('ort_config'), which exported "
            "files never hold"
        )
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    for tensor in _tensors(model.graph.initializer, nodes):
        if uses_external_data(tensor):
            raise ValueError(
                f"refused: its tensor {tensor.name!r} is stored in another file, and exported "
                "files keep their weights inside"
            )


def _load_onnx(path: str, threads: Optional[int]) -> Tuple[Callable, Optional[str]]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    model = onnx.load(path, load_external_data=False)
    _check_onnx_data(model)
    # a file exported with the custom operator needs our library, built from the package's own
    # source (nothing in the file names a library)
    if ort_ops.DOMAIN in {entry.domain for entry in model.opset_import}:
        ort_ops.register(options)
    del model
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
        trust_code: consent to load a TorchScript or torch.export file, which runs code the file
            holds (:data:`CODE_FORMATS`); ONNX files need none.

    Attributes:
        format: "onnx", "torchscript" or "torch_export".
        metadata: the dict saved with the file (output names, batch, size divisibility, config,
            class info).

    Raises:
        UntrustedCode: a TorchScript or torch.export file without ``trust_code``.
        FileNotFoundError: no such file.
        LibraryUnavailable: an ONNX file with the custom operator, whose library cannot be
            built here (:mod:`panoptic_segformer.deploy.ort_ops`).
        ValueError: an unknown suffix, or a file that cannot be loaded as its format (the message
            names the file and the cause).
    """

    def __init__(
        self, path: str, threads: Optional[int] = None, *, trust_code: bool = False
    ) -> None:
        self.format = format_of(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such exported model file")
        _check_consent(self.format, path, trust_code)
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
