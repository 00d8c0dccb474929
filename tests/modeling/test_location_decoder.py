"""Location decoder: shapes, initial boxes, iterative refinement, gradients."""

import pytest
import torch

from panoptic_segformer.layers import MLP
from panoptic_segformer.modeling.location_decoder import (
    LocationDecoder,
    LocationDecoderLayer,
    inverse_sigmoid,
)

SHAPES = torch.tensor([[6, 8], [3, 4]])
STARTS = torch.tensor([0, 48])


def make_decoder(box_free=False, seed=0, num_layers=3):
    torch.manual_seed(seed)
    layer = LocationDecoderLayer(
        d_model=32, d_ffn=64, dropout=0.1, n_levels=2, n_heads=4, n_points=2
    )
    return LocationDecoder(
        layer, num_layers=num_layers, num_queries=7, num_classes=5, d_model=32, box_free=box_free
    ).eval()


def run(decoder, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(n, 60, 32, generator=g)
    return decoder(memory, SHAPES, STARTS, torch.ones(n, 2, 2))


@pytest.mark.parametrize("box_free, box_dim", [(False, 4), (True, 2)])
def test_shapes(box_free, box_dim):
    out = run(make_decoder(box_free))
    assert out["queries"].shape == (2, 7, 32)
    assert out["pred_logits"].shape == (3, 2, 7, 5)
    assert out["pred_boxes"].shape == (3, 2, 7, box_dim)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_initial_boxes_and_class_prior():
    # At initialisation the box heads predict zero deltas: every layer returns the initial
    # reference point as centre and sigmoid(-2) as size, and class scores sit at the prior.
    decoder = make_decoder()
    out = run(decoder)
    reference = decoder.reference_points(decoder.query_embed.weight[:, :32]).sigmoid()
    expected = torch.cat([reference, torch.full((7, 2), torch.sigmoid(torch.tensor(-2.0)))], -1)
    for layer_boxes in out["pred_boxes"]:
        torch.testing.assert_close(layer_boxes, expected.expand(2, 7, 4), rtol=1e-5, atol=1e-6)
    # Logits differ per query, but the bias is the prior.
    for head in decoder.class_heads:
        torch.testing.assert_close(head.bias.sigmoid(), torch.full((5,), 0.01))


def test_refinement_adds_deltas_in_logit_space_and_detaches():
    decoder = make_decoder()
    for head in decoder.box_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    out = run(decoder)
    boxes = out["pred_boxes"]
    # Layer 1's box is its own head's delta added to layer 0's box in logit space.
    # Recompute layer 1's delta from its output queries by running the layers by hand.
    memory = torch.randn(2, 60, 32, generator=torch.Generator().manual_seed(1))
    query_pos, tgt = decoder.query_embed.weight.split(32, dim=1)
    query_pos, tgt = query_pos[None].expand(2, -1, -1), tgt[None].expand(2, -1, -1)
    ref0 = decoder.reference_points(query_pos).sigmoid()
    tgt = decoder.layers[0](
        tgt, query_pos, ref0[:, :, None].expand(-1, -1, 2, -1), memory, SHAPES, STARTS
    )
    box0 = decoder.box_heads[0](tgt)
    box0 = torch.cat([box0[..., :2] + inverse_sigmoid(ref0), box0[..., 2:]], -1).sigmoid()
    torch.testing.assert_close(boxes[0], box0)
    tgt = decoder.layers[1](
        tgt, query_pos, box0[:, :, None].expand(-1, -1, 2, -1), memory, SHAPES, STARTS
    )
    torch.testing.assert_close(
        boxes[1], (decoder.box_heads[1](tgt) + inverse_sigmoid(box0)).sigmoid()
    )
    # Layer 1's box does not back-propagate into layer 0's box head (the reference is
    # detached), while layer 0's queries still receive gradient through the layer chain.
    decoder.zero_grad()
    run(decoder)["pred_boxes"][1].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in decoder.box_heads[0].parameters())
    assert decoder.layers[0].ffn.linear2.weight.grad.abs().sum() > 0


def test_gradients_reach_every_parameter():
    decoder = make_decoder(num_layers=2).train()
    for head in decoder.box_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    for layer in decoder.layers:
        torch.nn.init.normal_(layer.cross_attn.sampling_offsets.weight, std=0.1)
        torch.nn.init.normal_(layer.cross_attn.attention_weights.weight, std=0.1)
    out = run(decoder)
    (
        out["pred_logits"].square().mean()
        + out["pred_boxes"].square().mean()
        + out["queries"].square().mean()
    ).backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_errors():
    with pytest.raises(ValueError, match="num_queries and num_classes positive, got 6, 0, 80"):
        LocationDecoder(LocationDecoderLayer(), num_queries=0)
    with pytest.raises(ValueError, match="num_layers must be >= 0, .* got -1, 300, 80"):
        LocationDecoder(LocationDecoderLayer(), num_layers=-1)


@pytest.mark.parametrize("box_free, box_dim", [(False, 4), (True, 2)])
def test_zero_layers_pass_the_learned_queries_on(box_free, box_dim):
    # paper Table 6's "0": no location decoding, no predictions, no unused parameters
    decoder = make_decoder(box_free, num_layers=0)
    out = run(decoder)
    torch.testing.assert_close(out["queries"], decoder.query_embed.weight.expand(2, 7, 32))
    assert out["pred_logits"].shape == (0, 2, 7, 5)
    assert out["pred_boxes"].shape == (0, 2, 7, box_dim)
    assert [name for name, _ in decoder.named_parameters()] == ["query_embed.weight"]
    out["queries"].sum().backward()
    assert decoder.query_embed.weight.grad.abs().sum() > 0


def test_mlp_and_inverse_sigmoid():
    torch.manual_seed(0)
    mlp = MLP(3, 8, 2, num_layers=3)
    assert [layer.in_features for layer in mlp.layers] == [3, 8, 8]
    x = torch.randn(4, 3)
    expected = mlp.layers[2](mlp.layers[1](mlp.layers[0](x).relu()).relu())
    torch.testing.assert_close(mlp(x), expected)
    with pytest.raises(ValueError, match="num_layers must be positive, got 0"):
        MLP(3, 8, 2, num_layers=0)
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(inverse_sigmoid(p)[1:3], torch.logit(p[1:3]))
    assert torch.isfinite(inverse_sigmoid(p)).all()
