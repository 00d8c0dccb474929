"""Test helpers for multi-scale deformable attention: an independent slow reference and inputs.

``reference_msda`` is the textbook formula, one sampling point at a time, written with scalar
tensor operations so that autograd differentiates it with respect to all three inputs: its
gradients are an independent reference for the kernels' backward passes, too.
"""

import itertools
import math

import torch


def reference_msda(value, shapes, locations, weights):
    """Explicit bilinear interpolation in float64, one sample at a time (differentiable).

    Pixel (i, j) of a level of size (H, W) has its centre at ((j + 0.5) / W, (i + 0.5) / H);
    pixels outside the map read zero. A NaN or infinite location samples NaN.
    """
    value, locations, weights = value.double(), locations.double(), weights.double()
    n_batch, _, n_heads, dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(n_levels)]
    zero = torch.zeros(dim, dtype=torch.float64)

    def pixel(n, level, row, col, head):
        h, w = shapes[level]
        if 0 <= row < h and 0 <= col < w:
            return value[n, starts[level] + row * w + col, head]
        return zero

    heads = []
    for n, q, m in itertools.product(range(n_batch), range(n_queries), range(n_heads)):
        total = zero
        for level, p in itertools.product(range(n_levels), range(n_points)):
            h, w = shapes[level]
            loc = locations[n, q, m, level, p]
            if not torch.isfinite(loc).all():
                sample = torch.full((dim,), math.nan, dtype=torch.float64)
            else:
                x = loc[0] * w - 0.5
                y = loc[1] * h - 0.5
                col, row = math.floor(x.item()), math.floor(y.item())
                fx, fy = x - col, y - row  # differentiable in the location
                sample = (
                    (1 - fy) * (1 - fx) * pixel(n, level, row, col, m)
                    + (1 - fy) * fx * pixel(n, level, row, col + 1, m)
                    + fy * (1 - fx) * pixel(n, level, row + 1, col, m)
                    + fy * fx * pixel(n, level, row + 1, col + 1, m)
                )
            total = total + weights[n, q, m, level, p] * sample
        heads.append(total)
    if not heads:
        return torch.zeros(n_batch, n_queries, n_heads * dim, dtype=torch.float64)
    return torch.stack(heads).view(n_batch, n_queries, n_heads * dim)


def level_tensors(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def off_pixel_boundaries(locations, shapes, margin=1e-3):
    """Moves every location at least ``margin`` pixels away from the pixel-centre grid lines of
    its level, where the bilinear interpolation has kinks: there two correct implementations may
    take different one-sided derivatives (and finite differences cross the kink)."""
    out = locations.clone()
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            coord = out[:, :, :, level, :, axis].double()
            pixels = coord * size - 0.5
            frac = pixels - pixels.floor()
            near_low, near_high = frac < margin, frac > 1 - margin
            pixels = torch.where(near_low, pixels + 2 * margin, pixels)
            pixels = torch.where(near_high, pixels - 2 * margin, pixels)
            out[:, :, :, level, :, axis] = ((pixels + 0.5) / size).to(out.dtype)
    return out


def make_inputs(
    shapes,
    n_batch=2,
    n_queries=5,
    n_heads=2,
    dim=3,
    n_points=2,
    dtype=torch.float64,
    seed=0,
    off_boundaries=False,
):
    """Random inputs; locations span [-0.25, 1.25] so some points fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    n_levels = len(shapes)
    n_tokens = sum(h * w for h, w in shapes)
    value = torch.randn(n_batch, n_tokens, n_heads, dim, generator=g, dtype=dtype)
    locations = torch.rand(n_batch, n_queries, n_heads, n_levels, n_points, 2, generator=g)
    locations = (locations * 1.5 - 0.25).to(torch.float64)
    if off_boundaries:
        locations = off_pixel_boundaries(locations, shapes)
    locations = locations.to(dtype)
    weights = torch.rand(n_batch, n_queries, n_heads, n_levels, n_points, generator=g, dtype=dtype)
    spatial_shapes, level_start_index = level_tensors(shapes)
    return value, spatial_shapes, level_start_index, locations, weights


def random_case(seed):
    """Random sizes: 1 to 4 non-square levels (single rows and columns included), batch 0, 1 or
    3, no queries sometimes, 1 to 3 heads, odd channel counts, 1 to 3 points."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    n_levels = pick([1, 2, 3, 4])
    shapes = [
        (int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g)))
        for _ in range(n_levels)
    ]
    return dict(
        shapes=shapes,
        n_batch=pick([0, 1, 3]),
        n_queries=pick([0, 1, 4, 7]),
        n_heads=pick([1, 2, 3]),
        dim=pick([1, 3, 8, 11]),
        n_points=pick([1, 2, 3]),
    )
