"""Mask decoder: masks from attention logits (known values), padding, early exit, gradients, what
training keeps for backward."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from panoptic_segformer.modeling.mask_decoder import (
    AttentionToMask,
    MaskAttention,
    MaskDecoder,
    MaskDecoderLayer,
    _head_maps,
    _HeadMapsRecomputingLogits,
)

SHAPES = [(4, 6), (2, 3), (1, 2)]
TOKENS = 24 + 6 + 2


def set_identity_projections(attn: MaskAttention) -> None:
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.copy_(torch.eye(proj.in_features))
            proj.bias.zero_()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_mask_is_relu_of_attention_logits_of_the_chosen_level(level):
    # One head of 4 channels, identity projections: the logits are query . token / 2. With
    # identity level maps and a fuse layer that reads one level, the mask is that level's
    # ReLU'd logits, bilinearly upsampled to the stride-8 size (Eqs. (1)-(2)).
    attn = MaskAttention(d_model=4, n_heads=1, tail=True)
    set_identity_projections(attn)
    with torch.no_grad():
        for level_map in attn.to_mask.level_maps:
            level_map.weight.fill_(1.0)
            level_map.bias.zero_()
        attn.to_mask.fuse.weight.zero_()
        attn.to_mask.fuse.weight[0, level] = 1.0
        attn.to_mask.fuse.bias.zero_()
    g = torch.Generator().manual_seed(level)
    memory = torch.randn(1, TOKENS, 4, generator=g)
    query = torch.randn(1, 2, 4, generator=g)
    _, mask = attn(query, memory, SHAPES)
    assert mask.shape == (1, 2, 4, 6)
    start = sum(h * w for h, w in SHAPES[:level])
    h, w = SHAPES[level]
    logits = (query @ memory[0, start : start + h * w].T / 2.0).relu().view(1, 2, h, w)
    expected = F.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mask, expected.relu())


def test_attention_output_is_softmax_attention_and_ignores_padding():
    torch.manual_seed(0)
    attn = MaskAttention(d_model=8, n_heads=2)
    memory = torch.randn(2, TOKENS, 8)
    query = torch.randn(2, 3, 8)
    pad = torch.zeros(2, TOKENS, dtype=torch.bool)
    pad[1, 20:24] = True
    out, mask = attn(query, memory, SHAPES, pad)
    # without the mask, fused attention: the same values within float rounding, no mask
    fused, no_mask = attn(query, memory, SHAPES, pad, with_mask=False)
    assert mask.shape == (2, 3, 4, 6) and no_mask is None
    # Reference: softmax attention written out, per image and head, padded tokens dropped.
    q = attn.q_proj(query).view(2, 3, 2, 4).transpose(1, 2)
    k = attn.k_proj(memory).view(2, TOKENS, 2, 4).transpose(1, 2)
    v = attn.v_proj(memory).view(2, TOKENS, 2, 4).transpose(1, 2)
    ref = torch.stack(
        [((q[i] @ k[i, :, ~pad[i]].mT) / 2.0).softmax(-1) @ v[i, :, ~pad[i]] for i in range(2)]
    )
    ref = attn.out_proj(ref.transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fused, ref)
    junk = memory.clone()
    junk[pad] = 1e3
    torch.testing.assert_close(attn(query, junk, SHAPES, pad)[0], out)
    torch.testing.assert_close(attn(query, junk, SHAPES, pad, with_mask=False)[0], fused)
    # a tail without its mask computes nothing
    assert (
        MaskAttention(d_model=8, n_heads=2, tail=True)(query, memory, SHAPES, with_mask=False)[0]
        is None
    )


def test_training_keeps_the_keys_once_and_each_level_map_once():
    """Of a mask attention, autograd keeps the keys once, in the layout that both the level
    products and the fused attention read (no per-level copy), and per level only the ReLU'd
    head maps: no transposed copy for the fusing product, and not the logits, which the
    backward pass recomputes."""
    torch.manual_seed(0)
    n, q, c, m = 2, 3, 8, 2
    shapes = [(6, 8), (3, 4), (2, 3)]
    tokens = sum(h * w for h, w in shapes)
    attn = MaskAttention(d_model=c, n_heads=m)
    memory = torch.randn(n, tokens, c, requires_grad=True)
    query = torch.randn(n, q, c, requires_grad=True)
    parameters = {p.untyped_storage().data_ptr() for p in attn.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(query, memory, shapes)
    sizes = Counter(kept.values())
    assert sizes[n * tokens * c] == 3  # the memory (both projections read it), keys, values
    assert [sizes[n * m * q * h * w] for h, w in shapes] == [1, 1, 1]
    assert [sizes[n * h * w * c] for h, w in shapes] == [0, 0, 0]  # a level's keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_maps_recomputing_logits_have_autograds_gradients(dtype):
    """The custom backward (logits recomputed) against autograd through the same operations,
    also under bfloat16 autocast, where the weights are cast as autocast casts them."""
    torch.manual_seed(0)
    queries = torch.randn(2, 4, 5, 3, requires_grad=True)
    level = torch.randn(2, 4, 12, 3, requires_grad=True)
    weight = torch.randn(4, 4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    inputs = (queries, level, weight, bias)
    upstream = torch.randn(2, 4, 60)
    results = []
    for function in (_HeadMapsRecomputingLogits.apply, _head_maps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            maps = function(queries.to(dtype), level.to(dtype), weight, bias)
        assert maps.dtype == dtype and 0 < int((maps == 0).sum()) < maps.numel()
        results.append((maps, torch.autograd.grad((maps * upstream).sum(), inputs)))
    (fast, fast_grads), (plain, plain_grads) = results
    assert torch.equal(fast, plain)
    for a, b in zip(fast_grads, plain_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=0)


def make_decoder(self_attn, num_layers=2, seed=0):
    torch.manual_seed(seed)
    layer = MaskDecoderLayer(d_model=16, n_heads=2, mlp_ratio=2.0, self_attn=self_attn)
    return MaskDecoder(layer, num_layers=num_layers, d_model=16, n_heads=2)


@pytest.mark.parametrize("self_attn", [False, True])
def test_decoder_shapes_and_early_exit(self_attn):
    decoder = make_decoder(self_attn, num_layers=3)
    assert (decoder.layers[0].self_attn is not None) == self_attn
    memory, query = torch.randn(2, TOKENS, 16), torch.randn(2, 5, 16)
    out = decoder(query, memory, SHAPES)
    assert [tuple(m.shape) for m in out["masks"]] == [(2, 5, 4, 6)] * 4  # 3 layers + tail
    assert [tuple(q.shape) for q in out["queries"]] == [(2, 5, 16)] * 3
    assert all((m >= 0).all() for m in out["masks"])  # ReLU outputs
    early = decoder(query, memory, SHAPES, num_layers=2)
    assert len(early["masks"]) == 2 and len(early["queries"]) == 2
    for a, b in zip(early["masks"], out["masks"][:2]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 3\], got 4"):
        decoder(query, memory, SHAPES, num_layers=4)
    with pytest.raises(ValueError, match="must hold exactly the 3 levels"):
        decoder(query, memory[:, :-1], SHAPES)


def test_query_pos_is_added_before_every_layer():
    decoder = make_decoder(self_attn=True)
    memory, query, pos = torch.randn(1, TOKENS, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    out = decoder(query, memory, SHAPES, query_pos=pos)
    # By hand: layer inputs are the previous output plus the position.
    q = query
    for layer, expected in zip(decoder.layers, out["queries"]):
        q, _ = layer(q + pos, memory, SHAPES)
        torch.testing.assert_close(q, expected)
    torch.testing.assert_close(decoder.tail(q + pos, memory, SHAPES)[1], out["masks"][-1])


@pytest.mark.parametrize("self_attn", [False, True])
def test_an_unpadded_image_gives_identical_outputs_with_and_without_the_padding_mask(self_attn):
    # The authors' mask decoder never reads its key padding mask; ours masks padded keys. With
    # nothing padded (a single image, size divisibility 1) the two must be the same function.
    decoder = make_decoder(self_attn)
    memory, query = torch.randn(1, TOKENS, 16), torch.randn(1, 4, 16)
    without = decoder(query, memory, SHAPES)
    nothing_padded = decoder(
        query, memory, SHAPES, memory_padding_mask=torch.zeros(1, TOKENS, dtype=torch.bool)
    )
    for key in ("masks", "queries"):
        assert all(torch.equal(a, b) for a, b in zip(without[key], nothing_padded[key]))
    # ... while a padded key does change them (the mask is read)
    pad = torch.zeros(1, TOKENS, dtype=torch.bool)
    pad[0, -2:] = True
    padded = decoder(query, memory, SHAPES, memory_padding_mask=pad)
    assert not torch.equal(padded["queries"][-1], without["queries"][-1])


def test_padding_does_not_reach_the_queries():
    decoder = make_decoder(self_attn=True)
    memory, query = torch.randn(2, TOKENS, 16), torch.randn(2, 4, 16)
    pad = torch.zeros(2, TOKENS, dtype=torch.bool)
    pad[0, 18:24] = True
    pad[0, 28:30] = True
    out = decoder(query, memory, SHAPES, memory_padding_mask=pad)
    junk = memory.clone()
    junk[pad] = 50 * torch.randn(int(pad.sum()), 16)
    out_junk = decoder(query, junk, SHAPES, memory_padding_mask=pad)
    for a, b in zip(out["queries"], out_junk["queries"]):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(decoder(query, junk, SHAPES)["queries"][-1], out["queries"][-1])


def test_gradients_reach_every_parameter():
    decoder = make_decoder(self_attn=True)
    memory = torch.randn(2, TOKENS, 16, requires_grad=True)
    out = decoder(torch.randn(2, 4, 16), memory, SHAPES, query_pos=torch.randn(2, 4, 16))
    (sum(m.sum() for m in out["masks"]) + sum(q.square().sum() for q in out["queries"])).backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert memory.grad.abs().sum() > 0


def direct_attention_to_mask(head, logits, shapes):
    """Eqs. (1)-(2) in the written order, as the authors compute them: per level
    Linear(M, M) + ReLU, every channel upsampled to stride 8, concatenated, Linear(3M, 1) + ReLU.
    logits (N, M, Q, S) -> (N, Q, H1, W1)."""
    n, m, q, _ = logits.shape
    (h1, w1), *_ = shapes
    levels = logits.split([h * w for h, w in shapes], dim=3)
    upsampled = []
    for level_map, level, (h, w) in zip(head.level_maps, levels, shapes):
        x = level_map(level.permute(0, 2, 3, 1)).relu()  # (N, Q, h*w, M)
        x = x.permute(0, 1, 3, 2).reshape(n * q, m, h, w)
        x = F.interpolate(x, size=(h1, w1), mode="bilinear", align_corners=False)
        upsampled.append(x.reshape(n, q, m, h1, w1).permute(0, 1, 3, 4, 2))
    return head.fuse(torch.cat(upsampled, -1)).relu().squeeze(-1)


@pytest.mark.parametrize("shapes", [SHAPES, [(10, 13), (5, 7), (3, 4)]])
def test_attention_to_mask_fuses_each_level_before_upsampling_as_the_direct_order(shapes):
    # the fuse layer and the bilinear upsampling are both linear, so fusing each level's heads
    # at its own resolution first is the same function, and so is computing each level's logits
    # on their own: values and gradients agree with the written order on the full logits to float
    # rounding (random weights, 8 heads, odd sizes)
    torch.manual_seed(0)
    head = AttentionToMask(n_heads=8)
    for p in head.parameters():
        torch.nn.init.normal_(p)
    torch.nn.init.constant_(head.fuse.bias, 10.0)  # masks partly positive, partly cut by the ReLU
    tokens = sum(h * w for h, w in shapes)
    queries = (torch.randn(2, 8, 5, 4) / 2).requires_grad_()  # logits of unit variance
    keys = torch.randn(2, 8, tokens, 4, requires_grad=True)
    fast = head(queries, keys, shapes)
    slow = direct_attention_to_mask(head, queries @ keys.transpose(-2, -1), shapes)
    assert fast.shape == slow.shape == (2, 5, *shapes[0])
    assert 0.1 < (slow > 0).float().mean() < 0.9
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(fast)
    grads = [
        torch.autograd.grad((out * weights).sum(), [queries, keys, *head.parameters()])
        for out in (fast, slow)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fc_head_is_tiny_and_errors():
    # The paper's "ultra-light FC head": per-level (M x M) maps and one (3M -> 1) fuse layer.
    head = AttentionToMask(n_heads=8)
    assert sum(p.numel() for p in head.parameters()) == 3 * (8 * 8 + 8) + 3 * 8 + 1
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_heads \(4\)"):
        MaskAttention(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="num_layers must be positive, got 0"):
        MaskDecoder(MaskDecoderLayer(16, 2), num_layers=0, d_model=16, n_heads=2)


def test_decoupled_decoder_shapes_and_gather():
    from panoptic_segformer.modeling.decoupled_mask_decoder import (
        DecoupledMaskDecoder,
        gather_queries,
    )

    torch.manual_seed(0)
    decoder = DecoupledMaskDecoder(3, 2, d_model=16, n_heads=2, num_thing_layers=1)
    shapes = [(4, 6), (2, 3), (1, 2)]
    memory = torch.randn(2, 24 + 6 + 2, 16)
    queries = torch.randn(2, 5, 16)
    gathered, valid = gather_queries(queries, [torch.tensor([4, 0, 4]), torch.tensor([1])])
    assert gathered.shape == (2, 3, 16) and valid.tolist() == [[True] * 3, [True, False, False]]
    torch.testing.assert_close(gathered[0], queries[0, [4, 0, 4]])
    assert not gathered[1, 1:].any()
    things = decoder.forward_things(gathered, memory, shapes)
    assert [m.shape for m in things["masks"]] == [(2, 3, 4, 6)] * 2  # one layer + the tail
    assert [x.shape for x in things["logits"]] == [(2, 3, 3)]
    # padding rows do not change the real ones: the thing stack has no self-attention
    alone = decoder.forward_things(gathered[1:, :1], memory[1:], shapes)
    torch.testing.assert_close(alone["masks"][-1][0, 0], things["masks"][-1][1, 0])
    stuff = decoder.forward_stuff(memory, shapes, num_layers=3)
    assert [m.shape for m in stuff["masks"]] == [(2, 2, 4, 6)] * 3  # early exit: no tail
    assert [x.shape for x in stuff["logits"]] == [(2, 2)] * 3
    with pytest.raises(ValueError, match="queries hold 2 images but indices hold 1"):
        gather_queries(queries, [torch.tensor([0])])
