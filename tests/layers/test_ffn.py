"""The FFN's fused ReLU + dropout against the written-out ``dropout(relu(x))`` of autograd."""

import pytest
import torch
from test_ms_deform_attn_module import graph_node_names
from torch import nn

from panoptic_segformer.layers import FFN


def _outputs_and_grads(ffn: FFN, x: torch.Tensor, seed: int):
    x = x.clone().requires_grad_()
    ffn.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = ffn(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in ffn.named_parameters()}


def _written_out(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    """The FFN as its docstring writes it, through autograd's own relu and dropout."""
    hidden = ffn.dropout1(torch.relu(ffn.linear1(x)))
    return ffn.norm(x + ffn.dropout2(ffn.linear2(hidden)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_relu_dropout_is_the_written_out_function(dtype):
    torch.manual_seed(0)
    ffn = FFN(16, 64, dropout=0.3).to(dtype).train()
    x = torch.randn(2, 50, 16, dtype=dtype)
    assert ffn._fused_dropout() == 0.3
    fused = _outputs_and_grads(ffn, x, seed=7)
    ffn.forward = lambda x: _written_out(ffn, x)
    written = _outputs_and_grads(ffn, x, seed=7)
    # the same random numbers, the same values and gradients: the only arithmetic is the same
    # products in the same order
    assert torch.equal(fused[0], written[0])
    assert torch.equal(fused[1], written[1])
    for name, grad in written[2].items():
        assert torch.equal(fused[2][name], grad), name
    # the dropout did drop, and the ReLU did cut: both masks were exercised
    hidden = torch.relu(ffn.linear1(x))
    assert 0 < int((hidden == 0).sum()) < hidden.numel()


def test_fused_only_in_training_with_relu_dropout_and_gradients():
    ffn = FFN(8, 16, dropout=0.1)
    assert ffn.train()._fused_dropout() == 0.1
    assert ffn.eval()._fused_dropout() is None
    assert FFN(8, 16, dropout=0.0).train()._fused_dropout() is None
    assert FFN(8, 16, dropout=0.1, activation=nn.GELU).train()._fused_dropout() is None
    with torch.no_grad():
        assert ffn.train()._fused_dropout() is None


def test_fused_keeps_only_its_output_for_backward():
    """Of the (..., d_ffn) tensors, autograd keeps one (the output, also linear2's input)
    instead of three (ReLU output, dropout noise, product)."""
    ffn = FFN(8, 32, dropout=0.1).train()
    x = torch.randn(4, 10, 8, requires_grad=True)
    wide = set()

    def pack(t):
        if t.shape[-1] == 32 and t.numel() == 4 * 10 * 32:
            wide.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ffn(x).sum().backward()
    assert len(wide) == 1
    wide.clear()
    ffn.forward = lambda x: _written_out(ffn, x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ffn(x).sum().backward()
    assert len(wide) == 3


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_in_place_copies_no_gradient(dropout):
    """The ReLU (fused with the dropout or not) runs in place on linear1's own product, not on a
    view of it: no CopySlices node, whose backward copies the whole (..., d_ffn) gradient."""
    ffn = FFN(8, 32, dropout=dropout).train()
    out = ffn(torch.randn(4, 10, 8, requires_grad=True))
    names = graph_node_names(out)
    assert not any("CopySlices" in name for name in names)
    assert ("_ReLUDropoutBackward" in names) == (dropout > 0)
