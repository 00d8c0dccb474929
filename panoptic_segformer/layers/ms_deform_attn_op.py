"""The registered operator ``panoptic_segformer::ms_deform_attn``: loading it, and the parts of it
written in Python.

The operator and its backward (``panoptic_segformer::ms_deform_attn_backward``) are defined in C++
by the CPU extension (``layers/csrc/ms_deform_attn_op.cpp``), which also registers their CPU
kernels; the CUDA extension adds CUDA kernels. Here, once the CPU extension is loaded, the
operator gets

* a fake (meta) implementation, so that FakeTensor tracing (``torch.compile``, ``torch.export``)
  and the meta device know its output shapes without running it, and
* its autograd formula (the backward operator), so that it trains and that AOTAutograd traces a
  forward graph with ``ms_deform_attn`` and a backward graph with ``ms_deform_attn_backward``.

Most callers want :func:`~panoptic_segformer.layers.multi_scale_deformable_attention`, which checks
its inputs and picks this operator or the PyTorch path. Call :func:`load_operator` before loading a
``torch.export`` program that contains the operator in a fresh process.
"""

import importlib
import logging
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from panoptic_segformer.layers import _extension

__all__ = [
    "OPERATOR",
    "BACKWARD_OPERATOR",
    "load_cpu_extension",
    "load_extension",
    "load_operator",
]

logger = logging.getLogger(__name__)

OPERATOR = "panoptic_segformer::ms_deform_attn"
BACKWARD_OPERATOR = "panoptic_segformer::ms_deform_attn_backward"

_registered = False
# extension name -> (module, None) or (None, why it is unavailable), once tried
_loaded: Dict[str, Tuple[Optional[ModuleType], Optional[str]]] = {}


def _fake(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    grad_output: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    # the kernels return contiguous gradients, whatever the inputs' strides
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_locations, grad_weights = torch.ops.panoptic_segformer.ms_deform_attn_backward(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        grad_output.contiguous(),
    )
    return grad_value, None, None, grad_locations, grad_weights


def register_python_parts() -> None:
    """Registers the fake implementations and the autograd formula, once per process; called by
    the loader right after the CPU extension (which defines the operator) is imported."""
    global _registered
    if _registered:
        return
    torch.library.register_fake(OPERATOR)(_fake)
    torch.library.register_fake(BACKWARD_OPERATOR)(_fake_backward)
    torch.library.register_autograd(OPERATOR, _backward, setup_context=_setup_context)
    _registered = True


def _load_once(
    installed: str,
    build: Callable[[], ModuleType],
    what: str,
    after_load: Optional[Callable[[], None]] = None,
) -> Tuple[Optional[ModuleType], Optional[str]]:
    """The extension built at install time, else a JIT build; the outcome is cached, so a failed
    build is attempted once per process. ``after_load`` runs once, after a successful load."""
    if installed in _loaded:
        return _loaded[installed]
    try:
        module = importlib.import_module(installed)
    except ImportError as e:
        logger.info("%s not built at install time (%s); building it now (JIT)", what, e)
        try:
            module = build()
        except (ImportError, OSError, RuntimeError) as e:
            reason = f"the {what} could not be built: {e}"
            logger.warning("%s", reason)
            _loaded[installed] = None, reason
            return _loaded[installed]
    if after_load is not None:
        try:
            after_load()
        except (AttributeError, RuntimeError) as e:  # e.g. a PyTorch without these APIs
            reason = f"the {what} loaded but could not be set up: {e}"
            logger.warning("%s", reason)
            _loaded[installed] = None, reason
            return _loaded[installed]
    _loaded[installed] = module, None
    return _loaded[installed]


def load_cpu_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CPU extension (the
    deformable-attention operator and its CPU kernels) is unavailable. Tries the
    extension built at install time, then a JIT build, once per process."""
    return _load_once(
        "panoptic_segformer._cpu",
        _extension.build_cpu_extension,
        "CPU extension (deformable-attention operator)",
        after_load=register_python_parts,
    )


def load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Returns ``(extension, None)``, or ``(None, reason)`` when the CUDA kernels of multi-scale
    deformable attention are unavailable. Loads the CPU extension first (it defines the operator
    the CUDA kernels are registered for), then the CUDA extension built at install time, then a
    JIT build, once per process."""
    cpu, reason = load_cpu_extension()
    if cpu is None:
        return None, f"the operator is not defined: {reason}"
    return _load_once(
        "panoptic_segformer._C", _extension.build_extension, "CUDA deformable-attention kernel"
    )


def load_operator(device_type: str = "cpu") -> Tuple[Optional[object], Optional[str]]:
    """``(torch.ops.panoptic_segformer.ms_deform_attn, None)`` when the operator has a compiled
    kernel for ``device_type`` ("cpu" or "cuda"), else ``(None, why not)``. Loads (or builds, on
    first use) the CPU extension, and for "cuda" the CUDA extension too."""
    if device_type == "cuda":
        extension, reason = load_extension()
    elif device_type == "cpu":
        extension, reason = load_cpu_extension()
    else:
        return None, f"the operator has no kernel for {device_type} tensors"
    if extension is None:
        return None, reason
    return torch.ops.panoptic_segformer.ms_deform_attn, None
