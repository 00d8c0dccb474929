"""The mask decoder: masks from attention maps, deeply supervised (paper Sec. 3.3.3).

Each layer cross-attends from queries to the encoder memory of the first three levels (strides
8, 16, 32). Its scaled dot-product logits *before* the softmax are split per level, mapped per
level by Linear(heads, heads) + ReLU, upsampled to stride 8, concatenated and mapped by
Linear(3 * heads, 1) + ReLU into a mask (Eqs. (1)-(2); the authors' code uses these linear maps
and a ReLU output, thresholded at 0.5 downstream, not a sigmoid). A final "tail" attention
produces one more mask and no query. Things and stuff use separate stacks (query decoupling).

Shape shorthand: N batch, Q queries, S = H1*W1 + H2*W2 + H3*W3 memory tokens, C channels,
M heads, H1, W1 the stride-8 size.
"""

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panoptic_segformer.layers import FFN
from panoptic_segformer.layers.checkpointing import run_layer

MASK_LEVELS = 3


def _head_maps(queries: Tensor, level: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """ReLU(Linear(M, M)) over the heads of a level's attention logits: (N, M, Q*H*W).

    Args:
        queries (Tensor): (N, M, Q, C/M), scaled.
        level (Tensor): (N, M, H*W, C/M), the level's keys.
        weight (Tensor): (M, M); bias (Tensor): (M,), cast to the logits' dtype (as autocast
            casts them).
    """
    n, m, q, _ = queries.shape
    # (N, M, Q, H*W) logits of the level -> (N, M, Q*H*W)
    logits = (queries @ level.transpose(-2, -1)).view(n, m, q * level.shape[2])
    # Linear(M, M) over the heads, one batched product (a (N, M, Q*H*W) operand as it is)
    weight, bias = weight.to(logits.dtype), bias.to(logits.dtype)
    return torch.baddbmm(bias[:, None], weight.expand(n, m, m), logits).relu_()


class _HeadMapsRecomputingLogits(torch.autograd.Function):
    """:func:`_head_maps` that keeps its output but not the level's (N, M, Q*H*W) logits for the
    backward pass: they are recomputed there from the queries and keys, which the attention
    keeps anyway (one small product per level, Q*H*W*C multiply-adds). The gradients are
    autograd's for the same operations."""

    @staticmethod
    def forward(ctx, queries: Tensor, level: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        maps = _head_maps(queries, level, weight, bias)
        ctx.save_for_backward(queries, level, weight, maps)
        return maps

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        queries, level, weight, maps = ctx.saved_tensors
        n, m, q, _ = queries.shape
        hw = level.shape[2]
        grad = torch.ops.aten.threshold_backward(grad, maps, 0)  # through the ReLU
        logits = (queries @ level.transpose(-2, -1)).view(n, m, q * hw)
        grad_weight = torch.bmm(grad, logits.transpose(1, 2)).sum(0).to(weight.dtype)
        grad_bias = grad.sum((0, 2)).to(weight.dtype)
        # (N, M, Q*H*W) -> (N, M, Q, H*W)
        grad_logits = torch.bmm(weight.to(grad.dtype).t().expand(n, m, m), grad).view(n, m, q, hw)
        grad_queries = grad_logits @ level if ctx.needs_input_grad[0] else None
        grad_level = grad_logits.transpose(-2, -1) @ queries if ctx.needs_input_grad[1] else None
        return grad_queries, grad_level, grad_weight, grad_bias


class AttentionToMask(nn.Module):
    """Attention logits of three levels -> a mask (N, Q, H1, W1), from the (scaled) per-head
    queries and keys whose products the logits are.

    Eqs. (1)-(2) with the authors' head: per level Linear(M, M) + ReLU, bilinear upsampling to
    stride 8, concatenation, Linear(3M, 1) + ReLU. The fuse layer is linear and so is bilinear
    upsampling (a fixed weighted sum of pixels, the same for every channel), so the two commute:
    each level's M channels are fused into one at the level's own resolution, and only that one
    channel is upsampled and summed. The same function in exact arithmetic (within float
    rounding of the direct order, tested), without the (N, Q, H1 W1, 3M) concatenation and
    with 1/M of the upsampling. Each level's logits are computed on their own, (N, M, Q, H W)
    contiguous, so its Linear(M, M) is one matrix product over the heads, without a transposed
    copy. With gradients, the logits are not kept for the backward pass but recomputed there
    (:class:`_HeadMapsRecomputingLogits`).

    Args:
        n_heads: attention heads M.
    """

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.level_maps = nn.ModuleList(nn.Linear(n_heads, n_heads) for _ in range(MASK_LEVELS))
        self.fuse = nn.Linear(MASK_LEVELS * n_heads, 1)

    def forward(self, queries: Tensor, keys: Tensor, shapes: Sequence[Tuple[int, int]]) -> Tensor:
        """
        Args:
            queries (Tensor): (N, M, Q, C/M), scaled so that their products with the keys are
                the attention logits.
            keys (Tensor): (N, M, S, C/M).
            shapes: the three (H, W) of the key levels, finest first.
        """
        n, m, q, _ = queries.shape
        (h1, w1), *_ = shapes
        levels = keys.split([h * w for h, w in shapes], dim=2)
        fuse_weights = self.fuse.weight.view(len(shapes), 1, m)  # one (1, M) map per level
        mask = None
        for index, (level_map, fuse_weight, level, (h, w)) in enumerate(
            zip(self.level_maps, fuse_weights, levels, shapes)
        ):
            args = (queries, level, level_map.weight, level_map.bias)
            if torch.is_grad_enabled():
                x = _HeadMapsRecomputingLogits.apply(*args)
            else:
                x = _head_maps(*args)
            # fused to one channel: (N, Q, H*W), a batched product, which keeps its (N, M,
            # Q*H*W) operand for backward as it is (a matmul of (1, M) by it would keep a
            # transposed copy)
            x = torch.bmm(fuse_weight.expand(n, 1, m), x).view(n, q, h * w)
            if index:
                # one channel, bilinear to stride 8 (Eq. (2)); decided by the level, not by
                # comparing sizes, so that a tracer needs no guard on them
                x = F.interpolate(
                    x.view(n * q, 1, h, w), size=(h1, w1), mode="bilinear", align_corners=False
                ).view(n, q, h1 * w1)
            mask = x if mask is None else mask + x
        return (mask + self.fuse.bias).relu().view(n, q, h1, w1)


class MaskAttention(nn.Module):
    """Multi-head cross-attention that also returns a mask from its attention logits.

    Args:
        d_model: channels C.
        n_heads: heads M.
        tail: the last "tail" attention of a stack: only the mask is computed, so it has no
            value or output projection (the authors' AttentionTail).
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, tail: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.scale = (d_model // n_heads) ** -0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        if not tail:
            self.v_proj = nn.Linear(d_model, d_model)
            self.out_proj = nn.Linear(d_model, d_model)
        self.tail = tail
        self.to_mask = AttentionToMask(n_heads)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        shapes: Sequence[Tuple[int, int]],
        memory_padding_mask: Optional[Tensor] = None,
        with_mask: bool = True,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """
        Args:
            query (Tensor): (N, Q, C); memory (Tensor): (N, S, C).
            shapes: the three (H, W) of the memory levels.
            memory_padding_mask (Tensor, optional): (N, S) bool, True at padding; padded
                tokens get no attention (the mask logits there are left as they are).
            with_mask: compute the mask (False: None, for layers whose mask is not read).

        Returns:
            (N, Q, C) attended values (None for a tail) and the (N, Q, H1, W1) mask.
        """
        if not with_mask and self.tail:
            return None, None
        n, q, c = query.shape
        s = memory.shape[1]
        m = self.n_heads
        # (N, L, C) -> (N, M, L, C/M); the queries carry the 1/sqrt(C/M) of the logits. The
        # keys are copied into that layout once: each level's logits then multiply a view of
        # them, and the fused attention reads them as they are (a strided view would be copied
        # per level for the products, and kept twice for backward)
        queries = (self.q_proj(query) * self.scale).view(n, q, m, c // m).transpose(1, 2)
        keys = self.k_proj(memory).view(n, s, m, c // m).transpose(1, 2).contiguous()
        # the logits before the softmax carry the mask, computed level by level
        mask = self.to_mask(queries, keys, shapes) if with_mask else None
        if self.tail:
            return None, mask
        # Fused attention, which never materialises the (N, M, Q, S) logits (the same function
        # as the softmax written out within float rounding, tested).
        values = self.v_proj(memory).view(n, s, m, c // m).transpose(1, 2)
        keep = None if memory_padding_mask is None else ~memory_padding_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=keep, scale=1.0)
        # (N, M, Q, C/M) -> (N, Q, C)
        return self.out_proj(attended.transpose(1, 2).reshape(n, q, c)), mask


class MaskDecoderLayer(nn.Module):
    """[self-attention ->] mask cross-attention -> GELU MLP, each residual then LayerNorm
    (post-norm, eps 1e-6, no dropout: the authors' mask-head block).

    Args:
        d_model: channels C.
        n_heads: heads M.
        mlp_ratio: MLP hidden width / C.
        self_attn: start with self-attention among the queries (the stuff stack).
    """

    def __init__(
        self, d_model: int = 256, n_heads: int = 8, mlp_ratio: float = 4.0, self_attn: bool = False
    ) -> None:
        super().__init__()
        if self_attn:
            self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
            self.norm_self = nn.LayerNorm(d_model, eps=1e-6)
        else:
            self.self_attn = None
        self.cross_attn = MaskAttention(d_model, n_heads)
        self.norm_cross = nn.LayerNorm(d_model, eps=1e-6)
        self.ffn = FFN(d_model, int(d_model * mlp_ratio), activation=nn.GELU, eps=1e-6)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        shapes: Sequence[Tuple[int, int]],
        memory_padding_mask: Optional[Tensor] = None,
        with_mask: bool = True,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns the refined (N, Q, C) queries and this layer's (N, Q, H1, W1) mask (None
        without ``with_mask``)."""
        if self.self_attn is not None:
            query = self.norm_self(
                query + self.self_attn(query, query, query, need_weights=False)[0]
            )
        attended, mask = self.cross_attn(query, memory, shapes, memory_padding_mask, with_mask)
        query = self.norm_cross(query + attended)
        return self.ffn(query), mask


class MaskDecoder(nn.Module):
    """A stack of mask decoder layers and a tail attention.

    Args:
        layer: the layer to copy.
        num_layers: layers before the tail (things: 4 without self-attention; stuff: 6 with).
        d_model, n_heads: of the tail.
        checkpointing: in training with gradients, keep only each layer's (and the tail's)
            inputs and outputs for the backward pass and run it again there (activation
            checkpointing, ``torch.utils.checkpoint``), instead of keeping its activations.
    """

    def __init__(
        self,
        layer: MaskDecoderLayer,
        num_layers: int,
        d_model: int = 256,
        n_heads: int = 8,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.checkpointing = checkpointing
        self.tail = MaskAttention(d_model, n_heads, tail=True)
        for p in self.parameters():  # the authors' mask head: xavier on every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        shapes: Sequence[Tuple[int, int]],
        query_pos: Optional[Tensor] = None,
        memory_padding_mask: Optional[Tensor] = None,
        num_layers: Optional[int] = None,
        last_mask_only: bool = False,
    ) -> Dict[str, List[Tensor]]:
        """
        Args:
            query (Tensor): (N, Q, C).
            memory (Tensor): (N, S, C) encoder memory of the first three levels.
            shapes: their three (H, W), finest first.
            query_pos (Tensor, optional): (N, Q, C) added to the queries before every layer
                (the authors' code adds it inside the residual stream).
            memory_padding_mask (Tensor, optional): (N, S) bool, True at padding.
            num_layers: early exit (paper Table 10): with k below the number of layers, run
                only the first k layers and return their masks, without the tail. None (or
                all layers) runs every layer and the tail.
            last_mask_only: compute only the last mask (the tail's, or the last layer's on an
                early exit), all inference reads; the others (deep supervision) are skipped.

        Returns:
            dict with "masks": one (N, Q, H1, W1) mask per layer run, then the tail's (only
            the last with ``last_mask_only``); and "queries": the (N, Q, C) queries after each
            layer.
        """
        if len(shapes) != MASK_LEVELS or sum(h * w for h, w in shapes) != memory.shape[1]:
            raise ValueError(
                f"memory ({memory.shape[1]} tokens) must hold exactly the {MASK_LEVELS} levels "
                f"{list(shapes)}"
            )
        total = len(self.layers)
        if num_layers is not None and not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
        run = num_layers or total
        masks, queries = [], []
        for i, layer in enumerate(self.layers[:run]):
            if query_pos is not None:
                query = query + query_pos
            # on an early exit the last layer's mask is the result
            with_mask = not last_mask_only or (run < total and i == run - 1)
            query, mask = run_layer(
                layer,
                query,
                memory,
                shapes,
                memory_padding_mask,
                with_mask,
                checkpointing=self.checkpointing,
            )
            if with_mask:
                masks.append(mask)
            queries.append(query)
        if num_layers is None or num_layers == total:
            tail_query = query if query_pos is None else query + query_pos
            tail = run_layer(
                self.tail, tail_query, memory, shapes, checkpointing=self.checkpointing
            )
            masks.append(tail[1])
        return {"masks": masks, "queries": queries}
