"""Multi-scale deformable attention (Deformable DETR, Zhu et al. ICLR 2021): the PyTorch path.

Bilinear sampling of every level with ``grid_sample``, weighted and summed: what
:func:`panoptic_segformer.layers.ms_deform_attn_func.multi_scale_deformable_attention` runs
where the compiled operator is not available or not chosen. Plain tensor operations, so
autograd, tracers and exporters need nothing more.

Shape shorthand: N batch, S flattened value tokens over all levels, M heads, D channels per head,
Q queries, L levels, P sampling points per level and head.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["REDUCED_DTYPES", "ms_deform_attn_pytorch"]

# value dtypes computed in float32 (as the kernels accumulate) and cast back
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def _non_finite_rule(
    sampling_locations: Tensor, attention_weights: Tensor
) -> Tuple[Tensor, Tensor]:
    """The rule for non-finite sampling locations (``csrc/ms_deform_attn_math.h``) in the PyTorch
    path: a point whose x or y is NaN or infinite samples NaN (its output is NaN), its location
    and weight gradients are NaN and it adds nothing to the value gradient.

    ``grid_sample`` alone gives NaN on the CPU but maps such coordinates to a zero sample on the
    GPU. So such a point samples at -1 instead (outside every map: a zero sample, zero gradients)
    and its weight becomes NaN through two terms that are exactly 1 and 0 at every other point:
    ``a * scale + poison`` with ``scale`` NaN at the point and ``poison`` NaN there and computed
    from its location. The output, ``a * scale * 0``, is NaN; in the backward pass the weight's
    gradient (0) reaches the weight and the location through those NaNs as NaN. Plain tensor
    operations, so tracers and exporters see no custom function.

    Returns:
        (locations with the non-finite points moved to -1, effective attention weights)
    """
    finite = torch.isfinite(sampling_locations)  # (N, Q, M, L, P, 2)
    bad = ~finite.all(-1)  # (N, Q, M, L, P)
    nan = torch.tensor(float("nan"), dtype=attention_weights.dtype, device=bad.device)
    one = torch.ones((), dtype=attention_weights.dtype, device=bad.device)
    safe = torch.where(bad[..., None], -one, sampling_locations)
    scale = torch.where(bad, nan, one)
    poison = (torch.where(bad[..., None], sampling_locations, 0.0) * scale[..., None]).sum(-1)
    return safe, attention_weights * scale + poison


def ms_deform_attn_pytorch(
    value: Tensor,
    shapes: List[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The PyTorch path: bilinear sampling per level with ``grid_sample``, weighted and summed.

    Float16/bfloat16 inputs are computed in float32 (as the kernels accumulate) and the result
    is cast back to the value's dtype. Inputs are assumed valid. Non-finite locations follow the
    kernels' rule on every device (see :func:`_non_finite_rule`).

    Args:
        value (Tensor): (N, S, M, D).
        shapes: (H, W) of each of the L levels, in the order they are flattened in S.
        sampling_locations (Tensor): (N, Q, M, L, P, 2), normalised (x, y).
        attention_weights (Tensor): (N, Q, M, L, P).

    Returns:
        Tensor: (N, Q, M * D).
    """
    n, _, m, d = value.shape
    q = sampling_locations.shape[1]
    dtype = torch.float32 if value.dtype in REDUCED_DTYPES else value.dtype
    value_levels = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    sampling_locations, attention_weights = _non_finite_rule(
        sampling_locations.to(dtype), attention_weights.to(dtype)
    )
    # Finite but huge locations would overflow grid_sample's pixel arithmetic; beyond [-1, 2] a
    # point is outside every map (zero sample, zero gradient) either way.
    sampling_locations = sampling_locations.clamp(-1.0, 2.0)
    # grid_sample takes (x, y) in [-1, 1]; with align_corners=False, [0, 1] maps onto it exactly
    # and points outside read zeros, which is Deformable DETR's convention.
    # (N, Q, M, L, P, 2) -> (N, M, Q, L, P, 2) -> L x (N*M, Q, P, 2)
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1).unbind(2)
    # (N, Q, M, L, P) -> L x (N*M, Q, P)
    weights = attention_weights.transpose(1, 2).flatten(0, 1).unbind(2)
    weighted = None
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N, M, H, W, D) -> (N*M, H, W, D) -> (N*M, D, H, W) with
        # channels-last strides: grid_sample then reads a pixel's D channels from one cache
        # line. The reshape is free for N = 1 and one copy of the level otherwise; the backward
        # gathers the levels' gradients into (N, S, M, D) in a single cat.
        value_l = (
            value_levels[level]
            .unflatten(1, (h, w))
            .permute(0, 3, 1, 2, 4)
            .reshape(n * m, h, w, d)
            .permute(0, 3, 1, 2)
        )
        # (N*M, D, Q, P)
        sampled = F.grid_sample(
            value_l, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # Weighted samples summed over levels in one (N*M, D, Q, P) buffer: fewer, larger ops
        # than a weighted sum per level, and less memory than stacking the levels.
        if weighted is None:
            weighted = sampled * weights[level][:, None]
        else:
            weighted.addcmul_(sampled, weights[level][:, None])
    # Sum over the points: (N*M, D, Q) -> (N, M*D, Q) -> (N, Q, M*D)
    output = weighted.sum(-1)
    return output.reshape(n, m * d, q).transpose(1, 2).contiguous().to(value.dtype)
