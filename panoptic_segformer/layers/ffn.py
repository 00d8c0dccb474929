"""The transformer feed-forward sub-block shared by the encoder and both decoders."""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ReLUDropout(torch.autograd.Function):
    """``dropout(relu(x), p)`` in training, keeping only its output for the backward pass.

    Autograd would keep three (..., d_ffn) tensors of the encoder's FFN, its largest: the ReLU's
    output, the dropout's noise (on the CPU a float tensor of 0 and 1 / (1 - p)) and the product.
    The output alone decides the gradient: an element of it is positive exactly where the ReLU
    passed it and the dropout kept it, and there the gradient is the incoming one times
    1 / (1 - p) (``torch.nn.Dropout``'s scaling); elsewhere it is 0. So this keeps only the
    output, which the next linear layer keeps anyway. The forward pass is ``F.relu`` then
    ``F.dropout`` themselves (the same values and the same random numbers), in place on ``x``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        F.dropout(F.relu(x, inplace=True), p, training=True, inplace=True)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        # the kept elements' factor, computed as dropout computes it: 1 divided by (1 - p) in
        # the tensor's dtype
        ctx.scale = torch.ones((), dtype=x.dtype).div_(1 - p).item()
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        # ReLU's own backward kernel (zero where the output is not positive), then the scale
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None


class FFN(nn.Module):
    """``norm(x + dropout(linear2(dropout(act(linear1(x))))))``: a two-layer MLP with residual
    and post-norm, as in Deformable DETR's layers (ReLU, dropout 0.1) and the authors' mask head
    (GELU, no dropout, LayerNorm eps 1e-6).

    Args:
        d_model: input and output channels.
        d_ffn: hidden channels.
        dropout: dropout after the activation and after the second linear layer.
        activation: the activation module class.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        dropout: float = 0.0,
        activation: Type[nn.Module] = nn.ReLU,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        # a ReLU in place: the hidden (..., d_ffn) activations are the encoder's largest tensor,
        # and linear1's backward does not read its output
        self.activation = nn.ReLU(inplace=True) if activation is nn.ReLU else activation()
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """x (Tensor): (..., d_model) -> (..., d_model)."""
        # (T, d_ffn) for the T = x.numel() / d_model tokens: the product itself, not a view of
        # it, so that the activation in place costs the backward pass no copy of the gradient
        # (an in-place change of a view does)
        hidden = self.linear1(x.reshape(-1, x.shape[-1]))
        p = self._fused_dropout()
        if p is None:
            hidden = self.dropout1(self.activation(hidden))
        else:
            hidden = _ReLUDropout.apply(hidden, p)
        # (T, d_model) -> (..., d_model)
        return self.norm(x + self.dropout2(self.linear2(hidden).view(x.shape)))

    def _fused_dropout(self) -> Optional[float]:
        """The dropout rate when a ReLU and an active dropout run fused (training with
        gradients), else None."""
        p = self.dropout1.p
        fused = self.training and 0 < p < 1 and isinstance(self.activation, nn.ReLU)
        return p if fused and torch.is_grad_enabled() else None
