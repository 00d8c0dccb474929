"""The deformable transformer encoder (Deformable DETR's, as used by Panoptic SegFormer).

Shape shorthand: N batch, L levels, S = sum of H_l * W_l flattened tokens, C channels (d_model).
Level shapes are kept on the CPU so that deformable attention never synchronises with the GPU.
"""

import copy
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from panoptic_segformer.layers import FFN, MSDeformAttn
from panoptic_segformer.layers.checkpointing import run_layer


def valid_ratios(mask: Tensor) -> Tensor:
    """Fraction of each padded map that the image covers.

    Args:
        mask (Tensor): (N, H, W) bool, True at padding (padding is bottom/right).

    Returns:
        Tensor: (N, 2) float, (valid width / W, valid height / H).
    """
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def flatten_levels(
    features: Sequence[Tensor],
    masks: Sequence[Tensor],
    pos_embeds: Sequence[Tensor],
    level_embed: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flattens multi-scale maps into one token sequence.

    Args:
        features: L tensors (N, C, H_l, W_l).
        masks: L tensors (N, H_l, W_l) bool, True at padding.
        pos_embeds: L tensors (N, C, H_l, W_l).
        level_embed (Tensor): (L, C) learned level embedding, added to the positions.

    Returns:
        src (N, S, C), mask (N, S), pos (N, S, C), spatial_shapes (L, 2) int64 on the CPU,
        level_start_index (L,) int64 on the CPU, valid_ratios (N, L, 2).
    """
    shapes = [tuple(f.shape[-2:]) for f in features]
    # (N, C, H, W) -> (N, H*W, C) per level, concatenated over levels
    src = torch.cat([f.permute(0, 2, 3, 1).flatten(1, 2) for f in features], 1)
    mask = torch.cat([m.flatten(1) for m in masks], 1)
    pos = torch.cat(
        [p.permute(0, 2, 3, 1).flatten(1, 2) + level_embed[i] for i, p in enumerate(pos_embeds)],
        1,
    )
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    ratios = torch.stack([valid_ratios(m) for m in masks], 1)
    return src, mask, pos, spatial_shapes, level_start_index, ratios


def encoder_reference_points(
    spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]],
    ratios: Tensor,
    num_tokens: Optional[int] = None,
) -> Tensor:
    """The centre of every token, normalised for sampling on every level.

    Centres are normalised by the valid extent of their own level, then scaled by each level's
    valid ratio, so a point lands on the same image location on every level whatever the
    padding (Deformable DETR's ``get_reference_points``). Computed from the level shapes as a
    tensor, without reading them on the host, so ``torch.compile`` and ``torch.export`` trace it.

    Args:
        spatial_shapes: (L, 2) integer tensor or L pairs, (H_l, W_l) per level.
        ratios (Tensor): (N, L, 2) valid ratios (x, y).
        num_tokens: S = sum of H_l * W_l, e.g. ``src.shape[1]``; read from the shapes if None.

    Returns:
        Tensor: (N, S, L, 2) normalised (x, y).
    """
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64, device=ratios.device)
    sizes = shapes.prod(1)
    ends = sizes.cumsum(0)
    if num_tokens is None:
        num_tokens = int(ends[-1])
    # level, row and column of every token of the flattened levels
    token = torch.arange(num_tokens, device=ratios.device)
    level = torch.bucketize(token, ends, right=True)  # ends[l - 1] <= token < ends[l]
    local = token - (ends - sizes)[level]
    heights, widths = shapes[level, 0], shapes[level, 1]
    row = torch.div(local, widths, rounding_mode="floor")
    col = local - row * widths
    # pixel centres (exact in floating point), over the valid extent of the token's level: (N, S)
    ref_y = (row.to(ratios.dtype) + 0.5) / (ratios[:, level, 1] * heights.to(ratios.dtype))
    ref_x = (col.to(ratios.dtype) + 0.5) / (ratios[:, level, 0] * widths.to(ratios.dtype))
    # (N, S, 2) -> (N, S, L, 2)
    return torch.stack((ref_x, ref_y), -1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention then a ReLU FFN, each with residual, dropout and post-norm.

    Args:
        d_model: channels C.
        d_ffn: FFN hidden channels.
        dropout: dropout after attention and in the FFN.
        n_levels, n_heads, n_points: of the deformable attention.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            src (Tensor): (N, S, C); pos (Tensor): (N, S, C).
            reference_points (Tensor): (N, S, L, 2).
            spatial_shapes (Tensor): (L, 2); level_start_index (Tensor): (L,).
            padding_mask (Tensor, optional): (N, S) bool, True at padding.

        Returns:
            Tensor: (N, S, C).
        """
        attn = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm1(src + self.dropout1(attn)))


class DeformableEncoder(nn.Module):
    """A stack of identical deformable encoder layers.

    Args:
        layer: the layer to copy.
        num_layers: how many copies.
        checkpointing: in training with gradients, keep only each layer's input for the
            backward pass and run the layer again there (activation checkpointing,
            ``torch.utils.checkpoint``; the same random dropout), instead of keeping its
            activations: less memory, one more forward pass of the encoder.
    """

    def __init__(
        self, layer: DeformableEncoderLayer, num_layers: int = 6, checkpointing: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.checkpointing = checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform on every matrix, then deformable attention's own initialisation
        (Deformable DETR's ``_reset_parameters``)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            src (Tensor): (N, S, C) flattened features; pos (Tensor): (N, S, C).
            spatial_shapes (Tensor): (L, 2) int64, best kept on the CPU.
            level_start_index (Tensor): (L,) int64.
            valid_ratios (Tensor): (N, L, 2).
            padding_mask (Tensor, optional): (N, S) bool, True at padding.

        Returns:
            Tensor: (N, S, C) the encoder memory.
        """
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios, src.shape[1])
        for layer in self.layers:
            src = run_layer(
                layer,
                src,
                pos,
                reference_points,
                spatial_shapes,
                level_start_index,
                padding_mask,
                checkpointing=self.checkpointing,
            )
        return src
