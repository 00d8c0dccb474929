"""MSDeformAttn: shapes, Deformable DETR's initialisation, padding masks, reference boxes,
gradients and argument errors (CPU)."""

import math

import pytest
import torch

from panoptic_segformer.layers import MSDeformAttn, ms_deform_attn

SHAPES = [(12, 10), (6, 5)]


def level_tensors(shapes=SHAPES):
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def make_module(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_levels=2, n_heads=4, n_points=3)
    args.update(kwargs)
    return MSDeformAttn(**args).double()


def test_output_shape():
    module = make_module()
    ss, lsi = level_tensors()
    n_tokens = int(ss.prod(1).sum())
    query = torch.randn(3, 7, 32, dtype=torch.float64)
    ref = torch.rand(3, 7, 2, 2, dtype=torch.float64)
    out = module(query, ref, torch.randn(3, n_tokens, 32, dtype=torch.float64), ss, lsi)
    assert out.shape == (3, 7, 32)


def test_initialisation_follows_deformable_detr():
    module = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    bias = module.sampling_offsets.bias.view(8, 3, 4, 2)
    # Head h points along angle 2*pi*h/8, scaled so the larger coordinate is 1; point p sits at
    # p + 1 times that direction on every level.
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    expected = directions[:, None, None, :] * torch.arange(1, 5.0)[None, None, :, None]
    torch.testing.assert_close(bias, expected.expand(8, 3, 4, 2), atol=1e-5, rtol=1e-6)
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    for linear in (module.value_proj, module.output_proj):
        assert torch.count_nonzero(linear.bias) == 0
        bound = math.sqrt(6.0 / (64 + 64))  # xavier_uniform
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3


def test_constant_input_at_init_gives_projected_value():
    # At initialisation every point gets weight 1 / (L * P); with every sampling point inside
    # the maps (offsets reach 3 pixels from the centre pixel, so levels need 8 pixels per side)
    # and a constant input, attention returns the projected value unchanged.
    module = make_module()
    ss, lsi = level_tensors([(12, 10), (8, 8)])
    n_tokens = int(ss.prod(1).sum())
    token = torch.randn(32, dtype=torch.float64)
    inputs = token.expand(2, n_tokens, 32)
    query = torch.randn(2, 4, 32, dtype=torch.float64)
    ref = torch.full((2, 4, 2, 2), 0.5, dtype=torch.float64)
    out = module(query, ref, inputs, ss, lsi)
    expected = module.output_proj(module.value_proj(token))
    torch.testing.assert_close(out, expected.expand(2, 4, 32), rtol=1e-10, atol=1e-10)


def test_padding_mask_hides_padded_tokens():
    module = make_module(seed=1)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.5)
    ss, lsi = level_tensors()
    n_tokens = int(ss.prod(1).sum())
    inputs = torch.randn(2, n_tokens, 32, dtype=torch.float64)
    # Image 0 is padded on its right half (columns >= 5 of level 0, >= 3 of level 1).
    mask = torch.zeros(2, n_tokens, dtype=torch.bool)
    mask[0, :120] = torch.arange(120) % 10 >= 5
    mask[0, 120:] = torch.arange(30) % 5 >= 3
    query = torch.randn(2, 6, 32, dtype=torch.float64)
    ref = torch.rand(2, 6, 2, 2, dtype=torch.float64)
    out = module(query, ref, inputs, ss, lsi, mask)
    junk = inputs.clone()
    junk[mask] = 1e3 * torch.randn(int(mask.sum()), 32, dtype=torch.float64)
    out_junk = module(query, ref, junk, ss, lsi, mask)
    torch.testing.assert_close(out, out_junk, rtol=0, atol=0)
    # Without the mask the junk does leak in: the test above can fail.
    assert not torch.allclose(module(query, ref, junk, ss, lsi), out)


def test_masking_in_place_copies_no_gradient():
    """The padding is masked in place on the value projection's own product: no CopySlices node
    (an in-place change of a view, whose backward copies the whole gradient)."""
    module = make_module()
    ss, lsi = level_tensors()
    n_tokens = int(ss.prod(1).sum())
    inputs = torch.randn(2, n_tokens, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, n_tokens, dtype=torch.bool)
    mask[1, -30:] = True
    query = torch.randn(2, 6, 32, dtype=torch.float64)
    out = module(query, torch.rand(2, 6, 2, 2, dtype=torch.float64), inputs, ss, lsi, mask)
    assert not any("CopySlices" in name for name in graph_node_names(out))
    out.sum().backward()
    assert inputs.grad[1, -30:].abs().sum() == 0 and inputs.grad[1, :-30].abs().sum() > 0


def graph_node_names(tensor: torch.Tensor) -> set:
    """Names of the autograd nodes ``tensor`` was computed by."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _captured_locations(module, monkeypatch, query, reference_points, inputs, ss, lsi):
    """The sampling_locations the module hands to the op."""
    captured = {}
    real_op = ms_deform_attn.multi_scale_deformable_attention

    def spy(value, spatial_shapes, level_start_index, sampling_locations, *args, **kwargs):
        captured["locations"] = sampling_locations
        return real_op(
            value, spatial_shapes, level_start_index, sampling_locations, *args, **kwargs
        )

    monkeypatch.setattr(ms_deform_attn, "multi_scale_deformable_attention", spy)
    module(query, reference_points, inputs, ss, lsi)
    return captured["locations"]


def test_sampling_locations_for_point_and_box_references(monkeypatch):
    module = make_module(seed=2)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    ss, lsi = level_tensors()
    n_tokens = int(ss.prod(1).sum())
    inputs = torch.randn(1, n_tokens, 32, dtype=torch.float64)
    query = torch.randn(1, 3, 32, dtype=torch.float64)
    centres = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    sizes = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    # (N, Q, M, L, P, 2) offsets in pixels of each level
    offsets = module.sampling_offsets(query).view(1, 3, 4, 2, 3, 2)

    points = _captured_locations(module, monkeypatch, query, centres, inputs, ss, lsi)
    for level, (h, w) in enumerate(SHAPES):
        expected = centres[:, :, None, level, None, :] + offsets[:, :, :, level] / torch.tensor(
            [w, h], dtype=torch.float64
        )
        torch.testing.assert_close(points[:, :, :, level], expected)

    boxes = torch.cat([centres, sizes], -1)
    in_boxes = _captured_locations(module, monkeypatch, query, boxes, inputs, ss, lsi)
    # P points span half the box: offset / P * (w, h) / 2, whatever the level size.
    expected = centres[:, :, None, :, None, :] + offsets / 3 * sizes[:, :, None, :, None, :] * 0.5
    torch.testing.assert_close(in_boxes, expected)


def test_gradients_reach_every_parameter():
    module = make_module(seed=3)
    # At initialisation the query projections are zero; move away from that point so the query
    # influences the output.
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    ss, lsi = level_tensors()
    n_tokens = int(ss.prod(1).sum())
    query = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(2, n_tokens, 32, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    module(query, ref, inputs, ss, lsi).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0 and inputs.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), r"d_model \(30\) must be divisible by n_heads \(4\)"),
        (dict(n_points=0), "n_points must be a positive integer, got 0"),
        (dict(n_levels=2.0), "n_levels must be a positive integer, got 2.0"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def test_bad_forward_arguments():
    module = make_module()
    ss, lsi = level_tensors()
    n_tokens = int(ss.prod(1).sum())
    query = torch.randn(2, 5, 32, dtype=torch.float64)
    inputs = torch.randn(2, n_tokens, 32, dtype=torch.float64)
    ref = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"reference_points must be \(N, Q, L, 2 or 4\)"):
        module(query, ref[:, :, :1], inputs, ss, lsi)
    with pytest.raises(ValueError, match="reference_points must end in 2 .* got 3"):
        module(query, torch.rand(2, 5, 2, 3, dtype=torch.float64), inputs, ss, lsi)
    with pytest.raises(ValueError, match=r"input_spatial_shapes must be \(2, 2\) for n_levels=2"):
        module(query, ref, inputs, ss[:1], lsi[:1])
    with pytest.raises(ValueError, match=r"input_padding_mask must be \(N, S\) = \(2, 150\)"):
        module(query, ref, inputs, ss, lsi, torch.zeros(2, 149, dtype=torch.bool))
