"""ONNX translations of the registered operator ``panoptic_segformer::ms_deform_attn``.

``torch.export`` keeps multi-scale deformable attention as one node of the registered operator;
ONNX has no such operator, so the ONNX exporter is handed this translation, which writes it with
standard ONNX ops: per level, one ``GridSample`` (bilinear, zero padding,
``align_corners=0``: Deformable DETR's conventions, the PyTorch path's formulation in
``layers/ms_deform_attn_func.py``). The level shapes stay tensors in the graph, so the exported
model keeps dynamic heights and widths. ``GridSample`` exists since opset 16; the exporter writes
opset 18, the lowest it supports (``export.ONNX_OPSET``). Points with non-finite locations get
ONNX Runtime's ``GridSample`` result, not the kernels' NaN rule.

With ``ort_custom_op``, the operator becomes one node of the ONNX Runtime custom operator
``panoptic_segformer::MSDeformAttn`` (:mod:`panoptic_segformer.deploy.ort_ops`): the kernel's
own loop, a few times faster than the ``GridSample`` form, but the file then runs only where
that library is registered.

Shape shorthand as in the operator: N batch, S value tokens, M heads, D channels per head,
Q queries, L levels, P points.
"""

from typing import Callable, Dict

import torch
from onnxscript import opset18 as op

__all__ = ["ms_deform_attn_grid_sample", "ms_deform_attn_ort_op", "onnx_translation_table"]


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def ms_deform_attn_grid_sample(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The operator as ONNX ops.

    Args:
        value: (N, S, M, D).
        spatial_shapes: (L, 2) int64, (H, W) per level.
        level_start_index: (L,) int64.
        sampling_locations: (N, Q, M, L, P, 2), normalised (x, y).
        attention_weights: (N, Q, M, L, P).

    Returns:
        (N, Q, M * D)
    """
    _, _, num_heads, head_dim = value.shape
    num_levels, num_points = sampling_locations.shape[3], sampling_locations.shape[4]
    batch = op.Shape(value, start=0, end=1)  # (1,) N
    queries = op.Shape(sampling_locations, start=1, end=2)  # (1,) Q
    one = _ints(1)
    # grid_sample's [-1, 1] from [0, 1]: (N, Q, M, L, P, 2) -> (N, M, Q, L, P, 2)
    grids = op.Transpose(
        op.Sub(
            op.Mul(sampling_locations, op.CastLike(2.0, sampling_locations)),
            op.CastLike(1.0, sampling_locations),
        ),
        perm=[0, 2, 1, 3, 4, 5],
    )
    # (N, Q, M, L, P) -> (N, M, Q, L, P)
    weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    nm = op.Mul(batch, _ints(num_heads))  # (1,) N*M
    output = None
    for level in range(num_levels):
        lvl = _ints(level)
        start = op.Gather(level_start_index, lvl, axis=0)  # (1,)
        hw = op.Reshape(op.Gather(spatial_shapes, lvl, axis=0), _ints(2))  # (2,) H, W
        size = op.ReduceProd(hw, keepdims=1)  # (1,) H*W
        # (N, H*W, M, D) -> (N, M, D, H*W) -> (N*M, D, H, W)
        value_l = op.Slice(value, start, op.Add(start, size), one)
        value_l = op.Reshape(
            op.Transpose(value_l, perm=[0, 2, 3, 1]), op.Concat(nm, _ints(head_dim), hw, axis=0)
        )
        # (N, M, Q, 1, P, 2) -> (N*M, Q, P, 2)
        grid_l = op.Slice(grids, lvl, op.Add(lvl, one), _ints(3))
        grid_l = op.Reshape(grid_l, op.Concat(nm, queries, _ints(num_points, 2), axis=0))
        # (N*M, D, Q, P)
        sampled = op.GridSample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=0
        )
        # (N, M, Q, 1, P) -> (N*M, 1, Q, P)
        weight_l = op.Slice(weights, lvl, op.Add(lvl, one), _ints(3))
        weight_l = op.Reshape(weight_l, op.Concat(nm, one, queries, _ints(num_points), axis=0))
        weighted = op.Mul(sampled, weight_l)
        output = weighted if output is None else op.Add(output, weighted)
    # sum over the points: (N*M, D, Q, P) -> (N*M, D, Q) -> (N, M*D, Q) -> (N, Q, M*D)
    summed = op.ReduceSum(output, _ints(-1), keepdims=0)
    summed = op.Reshape(summed, op.Concat(batch, _ints(num_heads * head_dim), queries, axis=0))
    return op.Transpose(summed, perm=[0, 2, 1])


def ms_deform_attn_ort_op(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The operator as one node of the ONNX Runtime custom operator (same arguments and result
    as :func:`ms_deform_attn_grid_sample`)."""
    from onnxscript import values

    from panoptic_segformer.deploy.ort_ops import DOMAIN

    custom = values.Opset(DOMAIN, 1)
    return custom.MSDeformAttn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def onnx_translation_table(ort_custom_op: bool = False) -> Dict[Callable, Callable]:
    """``custom_translation_table`` of ``torch.onnx.export`` for this package's operators.

    Args:
        ort_custom_op: write deformable attention as the ONNX Runtime custom operator rather
            than as ``GridSample`` ops.

    Raises:
        RuntimeError: ``ort_custom_op`` without the compiled operator, whose calls the custom
            node replaces.
    """
    from panoptic_segformer.layers.ms_deform_attn_op import load_operator

    operator, reason = load_operator("cpu")
    if operator is None:
        if ort_custom_op:
            raise RuntimeError(
                "exporting with the ONNX Runtime operator needs the compiled CPU operator: "
                f"{reason}"
            )
        return {}  # not built: a traced model then holds the PyTorch path, plain aten ops
    if ort_custom_op:
        from panoptic_segformer.deploy.ort_ops import register_schema

        register_schema()
        translation = ms_deform_attn_ort_op
    else:
        translation = ms_deform_attn_grid_sample
    return {torch.ops.panoptic_segformer.ms_deform_attn.default: translation}
