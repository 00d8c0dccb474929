"""Sine positional encoding of feature maps (DETR's, with the offset of the authors' code).

Shape shorthand: N batch, H, W feature-map height and width, C = 2 * num_feats channels.
"""

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of each pixel's (y, x), counted over the valid (unpadded) pixels.

    With ``normalize``, coordinates are ``(cumsum + offset) / (valid extent + eps) * scale``; the
    authors' code (mmdet's SinePositionalEncoding) uses offset -0.5, so a pixel is encoded at
    its centre rather than its far edge.

    Args:
        num_feats: channels per axis; the output has 2 * num_feats channels (y first, then x).
        temperature: base of the frequencies.
        normalize: scale coordinates to [0, scale] over the valid region.
        scale: the range of normalised coordinates (2 * pi by default).
        offset: added to the 1-based pixel counts before normalising.
        eps: avoids division by zero for an all-padding row or column.
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = -0.5,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_feats < 2 or num_feats % 2:
            raise ValueError(f"num_feats must be a positive even number, got {num_feats}")
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        """
        Args:
            mask (Tensor): (N, H, W) bool, True at padding.

        Returns:
            Tensor: (N, 2 * num_feats, H, W) float32.
        """
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be (N, H, W) bool, got {tuple(mask.shape)} {mask.dtype}")
        not_mask = (~mask).float()
        # 1-based pixel counts along each axis, counting valid pixels only: (N, H, W)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        # (N, H, W, num_feats), sin on even and cos on odd channels, interleaved
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        # (N, H, W, 2 * num_feats) -> (N, 2 * num_feats, H, W)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
