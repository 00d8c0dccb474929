"""The multi-scale deformable attention module (Deformable DETR's ``MSDeformAttn``).

Shape shorthand: N batch, Q queries, S flattened value tokens over all levels, C = d_model,
M heads, L levels, P points per level and head.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoptic_segformer.layers.ms_deform_attn_func import multi_scale_deformable_attention


class MSDeformAttn(nn.Module):
    """Each query attends to P learned offsets around its reference point on each of L levels.

    Args:
        d_model: channels C of queries and values.
        n_levels: feature levels L.
        n_heads: attention heads M; must divide d_model.
        n_points: sampling points P per head and level.
        implementation: forwarded to :func:`multi_scale_deformable_attention`.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        *,
        implementation: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("d_model", d_model),
            ("n_levels", n_levels),
            ("n_heads", n_heads),
            ("n_points", n_points),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.implementation = implementation

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: head h starts sampling along direction 2*pi*h/M,
        point p at distance p+1 (in pixels of the level), with uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        # (M, 2) directions scaled so the larger coordinate is 1.
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        # (M, L, P, 2): point p of every level at distance p + 1.
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query (Tensor): (N, Q, C).
            reference_points (Tensor): (N, Q, L, 2) normalised (x, y) points, or (N, Q, L, 4)
                normalised (cx, cy, w, h) boxes whose size scales the offsets.
            input_flatten (Tensor): (N, S, C) values of all levels, flattened.
            input_spatial_shapes (Tensor): (L, 2) integer (H, W) per level.
            input_level_start_index (Tensor): (L,) first token of each level in S.
            input_padding_mask (Tensor, optional): (N, S) bool, True at padding tokens, which
                then contribute nothing.

        Returns:
            Tensor: (N, Q, C).
        """
        n, q, _ = query.shape
        s = input_flatten.shape[1]
        m, num_levels, p = self.n_heads, self.n_levels, self.n_points
        if reference_points.dim() != 4 or reference_points.shape[:3] != (n, q, num_levels):
            raise ValueError(
                f"reference_points must be (N, Q, L, 2 or 4) = ({n}, {q}, {num_levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if input_spatial_shapes.shape != (num_levels, 2):
            raise ValueError(
                f"input_spatial_shapes must be ({num_levels}, 2) for n_levels={num_levels}, got "
                f"{tuple(input_spatial_shapes.shape)}"
            )

        # (N * S, C): the product itself, not a view of it, so that the masking in place below
        # costs the backward pass no copy of the gradient (an in-place change of a view does)
        value = self.value_proj(input_flatten.reshape(n * s, -1))
        if input_padding_mask is not None:
            if input_padding_mask.shape != (n, s):
                raise ValueError(
                    f"input_padding_mask must be (N, S) = ({n}, {s}), got "
                    f"{tuple(input_padding_mask.shape)}"
                )
            # in place: the projection's backward does not read its output
            value.masked_fill_(input_padding_mask.reshape(n * s, 1), 0.0)
        # (N * S, C) -> (N, S, M, C/M)
        value = value.view(n, s, m, self.d_model // m)
        # Softmax over the L*P points of each head: (N, Q, M, L*P) -> (N, Q, M, L, P)
        weights = self.attention_weights(query).view(n, q, m, num_levels * p)
        weights = weights.softmax(-1).view(n, q, m, num_levels, p)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: the division by the level's (W, H) is folded
            # into the projection, (L, 2) -> (M * L * P * 2,) in its output order.
            inverse = input_spatial_shapes.flip(-1).to(query).reciprocal()
            inverse = inverse[None, :, None, :].expand(m, num_levels, p, 2).reshape(-1)
            offsets = F.linear(
                query,
                self.sampling_offsets.weight * inverse[:, None],
                self.sampling_offsets.bias * inverse,
            )
            # (N, Q, L, 2) -> (N, Q, 1, L * P * 2): each level's point once per sampling point,
            # so the sum broadcasts over contiguous rows only (the (N, Q, M, L, P, 2) form
            # broadcasts over pairs, several times slower)
            points = reference_points[:, :, None, :, None, :].expand(n, q, 1, num_levels, p, 2)
            locations = offsets.view(n, q, m, -1) + points.reshape(n, q, 1, -1)
            locations = locations.view(n, q, m, num_levels, p, 2)
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box: P points span half its size. (N, Q, M, L, P, 2)
            offsets = self.sampling_offsets(query).view(n, q, m, num_levels, p, 2)
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                "reference_points must end in 2 (points) or 4 (boxes), got "
                f"{reference_points.shape[-1]}"
            )
        output = multi_scale_deformable_attention(
            value,
            input_spatial_shapes,
            input_level_start_index,
            locations,
            weights,
            implementation=self.implementation,
        )
        return self.output_proj(output)
