"""Positional encoding, neck and deformable encoder: known values, shapes, padding."""

import math

import pytest
import torch

from panoptic_segformer.modeling.encoder import (
    DeformableEncoder,
    DeformableEncoderLayer,
    encoder_reference_points,
    flatten_levels,
    valid_ratios,
)
from panoptic_segformer.modeling.neck import ChannelMapper
from panoptic_segformer.modeling.position_encoding import PositionEmbeddingSine


def test_sine_encoding_known_values():
    # num_feats=2: one frequency (1); y and x are (count - 0.5) / extent * 2*pi.
    pe = PositionEmbeddingSine(num_feats=2, eps=0.0)
    out = pe(torch.zeros(1, 1, 2, dtype=torch.bool))
    assert out.shape == (1, 4, 1, 2)
    y = math.pi  # (1 - 0.5) / 1 * 2pi
    xs = [math.pi / 2, 3 * math.pi / 2]  # (1 - 0.5) / 2 * 2pi, (2 - 0.5) / 2 * 2pi
    expected = torch.tensor(
        [[math.sin(y)] * 2, [math.cos(y)] * 2, [math.sin(x) for x in xs], [math.cos(x) for x in xs]]
    )
    torch.testing.assert_close(out[0, :, 0], expected, atol=1e-6, rtol=0)


def test_sine_encoding_counts_valid_pixels_only():
    pe = PositionEmbeddingSine(num_feats=8)
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    mask[:, 3:] = True
    mask[:, :, 4:] = True
    padded = pe(mask)
    small = pe(torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(padded[..., :3, :4], small)


def test_sine_encoding_rejects_bad_input():
    with pytest.raises(ValueError, match="num_feats must be a positive even number, got 3"):
        PositionEmbeddingSine(num_feats=3)
    with pytest.raises(ValueError, match=r"mask must be \(N, H, W\) bool"):
        PositionEmbeddingSine()(torch.zeros(1, 4, 4))


def test_channel_mapper_shapes_and_extra_level_from_c5():
    torch.manual_seed(0)
    neck = ChannelMapper([16, 32, 64], out_channels=32, num_outs=5, num_groups=8)
    feats = [torch.randn(2, c, s, s) for c, s in [(16, 32), (32, 16), (64, 8)]]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [
        (2, 32, 32, 32),
        (2, 32, 16, 16),
        (2, 32, 8, 8),
        (2, 32, 4, 4),
        (2, 32, 2, 2),
    ]
    # The first extra level is computed from C5 alone, not from the projected C5.
    assert neck.extra_convs[0][0].in_channels == 64 and neck.extra_convs[1][0].in_channels == 32
    feats2 = [torch.randn_like(feats[0]), torch.randn_like(feats[1]), feats[2]]
    outs2 = neck(feats2)
    torch.testing.assert_close(outs2[3], outs[3])
    assert not torch.allclose(outs2[0], outs[0])


def test_channel_mapper_errors():
    with pytest.raises(ValueError, match=r"num_outs \(2\) must be at least the number of inputs"):
        ChannelMapper([8, 16, 32], 32, num_outs=2, num_groups=8)
    with pytest.raises(ValueError, match=r"out_channels \(30\) must be divisible by num_groups"):
        ChannelMapper([8], 30, num_outs=1, num_groups=8)
    neck = ChannelMapper([8, 16], 32, num_outs=3, num_groups=8)
    with pytest.raises(ValueError, match="expected 2 feature levels, got 1"):
        neck([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"feature level 1 must be \(N, 16, H, W\)"):
        neck([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])


def test_valid_ratios_and_reference_points():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, 3:] = True  # 3 of 4 rows valid
    mask[:, :, 6:] = True  # 6 of 8 columns valid
    ratios = valid_ratios(mask)
    torch.testing.assert_close(ratios, torch.tensor([[6 / 8, 3 / 4]]))
    # Two levels with the same padding; the first token's centre is pixel (0.5, 0.5) of its
    # level: normalised over the valid extent, then mapped onto each level.
    both = torch.stack([ratios, ratios], 1)
    ref = encoder_reference_points([(4, 8), (2, 4)], both)
    assert ref.shape == (1, 4 * 8 + 2 * 4, 2, 2)
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 8, 0.5 / 4]))
    torch.testing.assert_close(ref[0, 32, 1], torch.tensor([0.5 / 4, 0.5 / 2]))


def make_encoder(seed=0):
    torch.manual_seed(seed)
    layer = DeformableEncoderLayer(
        d_model=32, d_ffn=64, dropout=0.1, n_levels=2, n_heads=4, n_points=2
    )
    encoder = DeformableEncoder(layer, num_layers=2).eval()
    # Move the query projections away from their zero initialisation so that sampling depends
    # on the input, as after training.
    for layer in encoder.layers:
        torch.nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.2)
        torch.nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.2)
    return encoder


def encode(encoder, feats, masks, level_embed):
    pe = PositionEmbeddingSine(num_feats=16)
    src, mask, pos, ss, lsi, ratios = flatten_levels(
        feats, masks, [pe(m) for m in masks], level_embed
    )
    assert ss.device.type == "cpu" and lsi.device.type == "cpu"
    return encoder(src, pos, ss, lsi, ratios, mask)


def test_encoder_shapes_and_padding_invariance():
    # The same maps, alone and padded (with junk in the padding) into a larger batch canvas,
    # give the same encoder output at every valid token: padding never leaks into valid tokens,
    # and reference points and positions follow the image, not the canvas.
    encoder = make_encoder()
    level_embed = torch.randn(2, 32)
    feats = [torch.randn(1, 32, 6, 10), torch.randn(1, 32, 3, 5)]
    masks = [torch.zeros(1, 6, 10, dtype=torch.bool), torch.zeros(1, 3, 5, dtype=torch.bool)]
    alone = encode(encoder, feats, masks, level_embed)
    assert alone.shape == (1, 60 + 15, 32)

    padded_feats = [1e3 * torch.randn(1, 32, 8, 14), 1e3 * torch.randn(1, 32, 4, 7)]
    padded_masks = [torch.ones(1, 8, 14, dtype=torch.bool), torch.ones(1, 4, 7, dtype=torch.bool)]
    for f, pf, pm in zip(feats, padded_feats, padded_masks):
        h, w = f.shape[-2:]
        pf[..., :h, :w] = f
        pm[:, :h, :w] = False
    padded = encode(encoder, padded_feats, padded_masks, level_embed)
    valid = torch.cat([m.flatten(1) for m in padded_masks], 1)[0].logical_not()
    torch.testing.assert_close(padded[0, valid], alone[0], rtol=1e-4, atol=1e-4)


def test_encoder_gradients_reach_every_parameter():
    encoder = make_encoder(1).train()
    level_embed = torch.randn(2, 32, requires_grad=True)
    feats = [torch.randn(2, 32, 6, 8, requires_grad=True), torch.randn(2, 32, 3, 4)]
    masks = [torch.zeros(2, 6, 8, dtype=torch.bool), torch.zeros(2, 3, 4, dtype=torch.bool)]
    encode(encoder, feats, masks, level_embed).square().mean().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert level_embed.grad.abs().sum() > 0 and feats[0].grad.abs().sum() > 0


def test_encoder_initialisation():
    encoder = DeformableEncoder(
        DeformableEncoderLayer(d_model=32, d_ffn=64, n_levels=2, n_heads=4, n_points=2),
        num_layers=2,
    )
    attn = encoder.layers[0].self_attn
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    bound = math.sqrt(6 / (32 + 64))  # xavier-uniform on the FFN
    assert encoder.layers[1].ffn.linear1.weight.abs().max() <= bound
    # The layers are independent copies.
    assert (
        encoder.layers[0].ffn.linear1.weight.data_ptr()
        != encoder.layers[1].ffn.linear1.weight.data_ptr()
    )
    with pytest.raises(ValueError, match="num_layers must be positive, got 0"):
        DeformableEncoder(DeformableEncoderLayer(), num_layers=0)
