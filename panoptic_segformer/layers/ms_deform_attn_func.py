"""Multi-scale deformable attention (Deformable DETR, Zhu et al. ICLR 2021): the op.

Shape shorthand: N batch, S flattened value tokens over all levels, M heads, D channels per head,
Q queries, L levels, P sampling points per level and head.

:func:`multi_scale_deformable_attention` validates its inputs, then dispatches: CPU and CUDA
tensors use the registered operator ``panoptic_segformer::ms_deform_attn`` (compiled kernels,
built at install time or on first use; see ``ms_deform_attn_op.py``) when it is available,
everything else uses :func:`ms_deform_attn_pytorch` (``ms_deform_attn_torch.py``). Which path
runs is logged once per path.

Under ``torch.compile`` and ``torch.export`` the level shapes are not read on the host (they are
data of a tensor there): the checks that need their values are left to the operator's kernels,
and the operator is traced as one node. The PyTorch path needs the shapes as Python integers,
so tracing it reads them (a graph break under ``torch.compile``).
"""

import contextlib
import logging
import math
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from panoptic_segformer.layers.ms_deform_attn_op import load_operator
from panoptic_segformer.layers.ms_deform_attn_torch import REDUCED_DTYPES, ms_deform_attn_pytorch

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "cpu", "cuda", "pytorch")
# Environment switch, e.g. PANOPTIC_SEGFORMER_MSDA_IMPL=pytorch to debug without the kernels.
IMPLEMENTATION_ENV = "PANOPTIC_SEGFORMER_MSDA_IMPL"
# Limits of the CUDA kernel (csrc/ms_deform_attn_cuda.cu); larger inputs use the PyTorch path.
CUDA_MAX_LEVELS = 16
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_TOKENS_X_CHANNELS = 2**31 - 1  # S * M * D, indexed with 32-bit integers

_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_logged_paths = set()


def _log_path_once(path: str, reason: str) -> None:
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("multi-scale deformable attention: using the %s path (%s)", path, reason)


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _is_tracing(*tensors: Tensor) -> bool:
    """Whether these tensors are traced rather than computed: torch.compile / torch.export, fake
    or meta tensors. Their values (the level shapes) cannot be read then."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return True
    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def _level_shapes(spatial_shapes: Tensor) -> List[Tuple[int, int]]:
    """(H, W) of every level as Python integers, read on the host."""
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def _check_levels(shapes: List[Tuple[int, int]], starts: Optional[List[int]], s: int) -> None:
    """Raises a ValueError unless the levels are non-empty, each within the S tokens value has
    left after the levels before it, start where those end (``starts``; None: not given) and
    cover S exactly; the kernels check the same (``csrc/ms_deform_attn_shapes.h``)."""
    tokens = 0
    for level, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes[{level}] = ({h}, {w}) must be positive")
        if starts is not None and starts[level] != tokens:
            raise ValueError(
                f"level_start_index[{level}] = {starts[level]} is inconsistent with "
                f"spatial_shapes: the levels before it hold {tokens} tokens (level_start_index "
                f"= {starts})"
            )
        if h * w > s - tokens:
            raise ValueError(
                f"spatial_shapes[{level}] = ({h}, {w}) holds more tokens than the {s - tokens} "
                f"value has left after the levels before it (S = {s})"
            )
        tokens += h * w
    if tokens != s:
        raise ValueError(f"spatial_shapes {shapes} cover {tokens} tokens but value has S = {s}")


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    read_shapes: bool = True,
) -> Optional[List[Tuple[int, int]]]:
    """Raises a ValueError/TypeError naming the bad argument; returns the level shapes, read on
    the host, or None when ``read_shapes`` is False (tracing: the operator checks them)."""
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got {_describe(value)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Q, M, L, P, 2), got {_describe(sampling_locations)}"
        )
    n, s, m, d = value.shape
    _, q, m_loc, num_levels, num_points, _ = sampling_locations.shape
    if m < 1 or d < 1:
        raise ValueError(f"value must have at least one head and channel, got {_describe(value)}")
    if num_levels < 1:
        raise ValueError(
            "sampling_locations must have at least one level (L >= 1), got "
            f"{_describe(sampling_locations)}"
        )
    if sampling_locations.shape[0] != n or m_loc != m:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} must have the batch size N={n} "
            f"and head count M={m} of value {tuple(value.shape)}"
        )
    if attention_weights.shape != (n, q, m, num_levels, num_points):
        raise ValueError(
            f"attention_weights must be (N, Q, M, L, P) = {(n, q, m, num_levels, num_points)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if spatial_shapes.shape != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes must be (L, 2) = ({num_levels}, 2) as (H, W) per level, got "
            f"{tuple(spatial_shapes.shape)}"
        )
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"level_start_index must be (L,) = ({num_levels},), got "
            f"{tuple(level_start_index.shape)}"
        )

    if value.dtype not in _VALUE_DTYPES:
        raise TypeError(f"value must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if sampling_locations.dtype != attention_weights.dtype:
        raise TypeError(
            f"sampling_locations ({sampling_locations.dtype}) and attention_weights "
            f"({attention_weights.dtype}) must have the same dtype"
        )
    coord_dtype = sampling_locations.dtype
    if coord_dtype != value.dtype and not (
        value.dtype in REDUCED_DTYPES and coord_dtype == torch.float32
    ):
        raise TypeError(
            f"sampling_locations/attention_weights are {coord_dtype} but value is {value.dtype}; "
            "they must match, or be float32 with a float16/bfloat16 value"
        )

    for name, t in (
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device.type != "cpu" and t.device != value.device:
            raise ValueError(f"{name} is on {t.device}; it must be on the CPU or on {value.device}")
    if not read_shapes:
        return None

    # Host copies (a GPU synchronisation when the caller keeps these on the GPU).
    shapes = _level_shapes(spatial_shapes)
    _check_levels(shapes, [int(i) for i in level_start_index.tolist()], s)
    return shapes


def _resolve_implementation(implementation: Optional[str]) -> str:
    if implementation is None:
        implementation = os.environ.get(IMPLEMENTATION_ENV, "auto") or "auto"
        source = f"environment variable {IMPLEMENTATION_ENV}"
    else:
        source = "implementation"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{source} must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


@torch.compiler.assume_constant_result
def _operator_unavailable(device_type: str) -> Optional[str]:
    """Why the operator has no kernel for ``device_type``, or None; loads (or builds) the
    extensions on first use. torch.compile runs this at trace time and keeps the answer, rather
    than tracing the import machinery."""
    return load_operator(device_type)[1]


def _use_operator(implementation: str, value: Tensor, num_levels: int, tracing: bool) -> bool:
    """Whether the registered operator (a compiled kernel) runs, else the PyTorch path. Raises
    when ``implementation`` names a kernel that cannot run these inputs."""
    if implementation == "pytorch":
        if not tracing:
            _log_path_once("pytorch", f"forced by implementation='pytorch' or {IMPLEMENTATION_ENV}")
        return False
    device_type = value.device.type
    # meta tensors run the operator's fake implementation, registered with its CPU kernels
    kernel = "cpu" if device_type == "meta" else device_type
    reason = None
    if device_type != "meta" and (
        device_type not in ("cpu", "cuda") or implementation not in ("auto", device_type)
    ):
        reason = f"inputs are on {value.device}"
    elif kernel == "cuda":
        if num_levels > CUDA_MAX_LEVELS:
            reason = f"{num_levels} levels exceed the CUDA kernel's {CUDA_MAX_LEVELS}"
        elif value.shape[-1] > CUDA_MAX_HEAD_DIM:
            reason = (
                f"D = {value.shape[-1]} exceeds the CUDA kernel's {CUDA_MAX_HEAD_DIM} channels "
                "per head"
            )
        # (traced, S may be symbolic: the kernel checks this one itself)
        elif not tracing and math.prod(value.shape[1:]) > CUDA_MAX_TOKENS_X_CHANNELS:
            reason = (
                f"S * M * D = {math.prod(value.shape[1:])} exceeds the CUDA kernel's 32-bit "
                "indexing"
            )
    if reason is None:
        reason = _operator_unavailable(kernel)
    if reason is None:
        if not tracing:
            _log_path_once(kernel, f"compiled {kernel.upper()} kernel")
        return True
    if implementation in ("cpu", "cuda"):
        raise RuntimeError(f"implementation={implementation!r} was requested but {reason}")
    if not tracing:
        _log_path_once("pytorch", reason)
    return False


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    implementation: Optional[str] = None,
) -> Tensor:
    """Multi-scale deformable attention with Deformable DETR's conventions.

    Each query samples P points per head and level by bilinear interpolation (zeros outside the
    map, ``align_corners=False``: (0, 0) and (1, 1) are the outer corners of the map) and sums
    them with its attention weights. A point with a NaN or infinite location makes its output
    NaN (never a silent zero), on every path and device.

    Args:
        value (Tensor): (N, S, M, D), float16/bfloat16/float32/float64.
        spatial_shapes (Tensor): (L, 2) integer, (H, W) per level. May live on the CPU (no GPU
            synchronisation) or on the value's device.
        level_start_index (Tensor): (L,) integer, first token of each level in S.
        sampling_locations (Tensor): (N, Q, M, L, P, 2), normalised (x, y); same dtype as value,
            or float32 with a float16/bfloat16 value.
        attention_weights (Tensor): (N, Q, M, L, P), same dtype as sampling_locations.
        implementation: "auto" (the compiled kernel of the inputs' device when available, else
            PyTorch), "cpu" or "cuda" (that kernel; raise if it cannot run) or "pytorch". None
            reads the environment variable ``PANOPTIC_SEGFORMER_MSDA_IMPL`` (default "auto").

    Under autocast the value is cast to the autocast dtype and the locations and weights to
    float32; arithmetic always accumulates in at least float32.

    Returns:
        Tensor: (N, Q, M * D) in the value's dtype.
    """
    implementation = _resolve_implementation(implementation)
    device_type = value.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    if autocast:
        # cast first, then check: what autocast hands over (a float16 value, float16 locations,
        # float32 weights, ...) is whatever produced it
        value = value.to(torch.get_autocast_dtype(device_type))
        sampling_locations = sampling_locations.float()
        attention_weights = attention_weights.float()
    tracing = _is_tracing(value, spatial_shapes, sampling_locations)
    shapes = _check_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        read_shapes=not tracing,
    )
    # the kernels and the PyTorch path take the dtypes as they are now
    context = torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
    with context:
        return _dispatch(
            implementation,
            value,
            spatial_shapes,
            level_start_index,
            shapes,
            sampling_locations,
            attention_weights,
            tracing,
        )


def _dispatch(
    implementation: str,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    shapes: Optional[List[Tuple[int, int]]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    tracing: bool,
) -> Tensor:
    if not _use_operator(implementation, value, sampling_locations.shape[3], tracing):
        if shapes is None:  # traced: the PyTorch path needs the level shapes as integers
            shapes = _level_shapes(spatial_shapes)
            _check_levels(shapes, None, value.shape[1])
        return ms_deform_attn_pytorch(value, shapes, sampling_locations, attention_weights)
    if shapes is not None and spatial_shapes.device.type != "cpu":
        # host copies of the validated shapes: the kernel then never reads a GPU tensor back
        sizes = [h * w for h, w in shapes]
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
        level_start_index = torch.tensor(
            [sum(sizes[:level]) for level in range(len(sizes))], dtype=torch.int64
        )
    return torch.ops.panoptic_segformer.ms_deform_attn(
        value.contiguous(),
        spatial_shapes,
        level_start_index,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
