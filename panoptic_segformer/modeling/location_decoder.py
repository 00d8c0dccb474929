"""The location decoder: thing queries become location-aware queries (paper Sec. 3.3.2).

Deformable DETR's decoder with iterative box refinement (not two-stage). Each layer's class and
box heads are the auxiliary detection branch; the last layer's class scores also rank things at
inference (authors' code). With ``box_free`` the box head predicts mass centres (x, y) instead
of boxes (paper Table 6). With no layers (Table 6's "0") the learned thing queries go to the mask
decoder unchanged, and there are no class or box predictions.

Shape shorthand: N batch, Q thing queries, S memory tokens, L levels, C channels, K thing
classes, B box size (4 for (cx, cy, w, h), 2 for mass centres), D decoder layers.
"""

import copy
import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from panoptic_segformer.layers import FFN, MLP, MSDeformAttn


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps]."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class LocationDecoderLayer(nn.Module):
    """Self-attention over queries, deformable cross-attention into the memory, then a FFN;
    each with residual, dropout and post-norm (Deformable DETR's decoder layer).

    Args:
        d_model: channels C.
        d_ffn: FFN hidden channels.
        dropout: dropout rate.
        n_levels, n_heads, n_points: of the attention.
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
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        memory_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt (Tensor): (N, Q, C) queries; query_pos (Tensor): (N, Q, C).
            reference_points (Tensor): (N, Q, L, 2 or 4), already scaled by valid ratios.
            memory (Tensor): (N, S, C); spatial_shapes (L, 2); level_start_index (L,).
            memory_padding_mask (Tensor, optional): (N, S) bool, True at padding.

        Returns:
            Tensor: (N, Q, C).
        """
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        return self.ffn(self.norm2(tgt + self.dropout2(attn)))


class LocationDecoder(nn.Module):
    """Learned thing queries refined by D layers, with per-layer class and box heads.

    Args:
        layer: the decoder layer to copy D times.
        num_layers: D; 0 (paper Table 6) returns the learned queries themselves, with empty
            (0, N, Q, ...) predictions.
        num_queries: Q thing queries.
        num_classes: K thing classes (sigmoid scores, no "no object" class).
        d_model: channels C.
        box_free: predict mass centres (B = 2) instead of boxes (B = 4).
        prior_prob: initial class probability (focal-loss prior, Deformable DETR's 0.01).
    """

    def __init__(
        self,
        layer: LocationDecoderLayer,
        num_layers: int = 6,
        num_queries: int = 300,
        num_classes: int = 80,
        d_model: int = 256,
        box_free: bool = False,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if num_layers < 0 or num_queries < 1 or num_classes < 1:
            raise ValueError(
                "num_layers must be >= 0, num_queries and num_classes positive, got "
                f"{num_layers}, {num_queries}, {num_classes}"
            )
        self.d_model = d_model
        self.box_free = box_free
        self.num_classes = num_classes
        self.box_dim = 2 if box_free else 4
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        # Each query embedding holds its positional part and its content part (2C); without
        # layers only the content part is used, so only it exists.
        self.query_embed = nn.Embedding(num_queries, (2 if num_layers else 1) * d_model)
        self.reference_points = nn.Linear(d_model, 2) if num_layers else None
        self.class_heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(
            MLP(d_model, d_model, self.box_dim, 3) for _ in range(num_layers)
        )
        self.reset_parameters(prior_prob)

    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """Deformable DETR's initialisation: xavier matrices in the layers, attention's own
        init, zero box deltas with a small initial size (sigmoid(-2)), class prior 0.01."""
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.layers.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if self.reference_points is not None:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        for head in self.class_heads:
            nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if self.box_heads and not self.box_free:
            # Only the first layer sets the initial size; later layers start with zero deltas
            # and so keep it (Deformable DETR's box-refinement initialisation).
            nn.init.constant_(self.box_heads[0].layers[-1].bias[2:], -2.0)

    def forward(
        self,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        memory_padding_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """
        Args:
            memory (Tensor): (N, S, C) encoder output.
            spatial_shapes (Tensor): (L, 2); level_start_index (Tensor): (L,).
            valid_ratios (Tensor): (N, L, 2).
            memory_padding_mask (Tensor, optional): (N, S) bool, True at padding.

        Returns:
            dict with
            - "queries" (Tensor): (N, Q, C) location-aware thing queries of the last layer.
            - "pred_logits" (Tensor): (D, N, Q, K) class logits of every layer.
            - "pred_boxes" (Tensor): (D, N, Q, B) normalised boxes (cx, cy, w, h) or centres.
        """
        n = memory.shape[0]
        if not self.layers:
            queries = self.query_embed.weight[None].expand(n, -1, -1)
            empty = queries.new_zeros((0, *queries.shape[:2]))
            return {
                "queries": queries,
                "pred_logits": empty[..., None].expand(-1, -1, -1, self.num_classes),
                "pred_boxes": empty[..., None].expand(-1, -1, -1, self.box_dim),
            }
        # (Q, 2C) -> 2 x (N, Q, C)
        query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=1)
        query_pos = query_pos[None].expand(n, -1, -1)
        tgt = tgt[None].expand(n, -1, -1)
        # (N, Q, 2) initial reference points, refined into boxes (or centres) layer by layer.
        reference = self.reference_points(query_pos).sigmoid()
        logits, boxes = [], []
        for layer, class_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            # Normalised over the valid image, mapped onto each padded level: (N, Q, L, 2 or 4)
            ratios = valid_ratios if reference.shape[-1] == 2 else valid_ratios.repeat(1, 1, 2)
            tgt = layer(
                tgt,
                query_pos,
                reference[:, :, None] * ratios[:, None],
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
            )
            # Iterative refinement: the head predicts a delta in logit space.
            delta = box_head(tgt)
            centre = delta[..., :2] + inverse_sigmoid(reference[..., :2])
            if reference.shape[-1] == 4:
                size = delta[..., 2:] + inverse_sigmoid(reference[..., 2:])
            else:
                size = delta[..., 2:]
            box = torch.cat([centre, size], -1).sigmoid()
            logits.append(class_head(tgt))
            boxes.append(box)
            # Each layer refines the previous box without back-propagating into it.
            reference = box.detach()
        return {
            "queries": tgt,
            "pred_logits": torch.stack(logits),
            "pred_boxes": torch.stack(boxes),
        }
