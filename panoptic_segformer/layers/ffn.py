"""The transformer feed-forward sub-block shared by the encoder and both decoders."""

from typing import Type

from torch import Tensor, nn


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
        hidden = self.dropout1(self.activation(self.linear1(x)))
        return self.norm(x + self.dropout2(self.linear2(hidden)))
