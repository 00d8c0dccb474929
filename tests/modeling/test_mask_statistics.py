"""The fused CPU kernel of the merging's mask statistics (layers/csrc/mask_statistics.cpp)
against an independent re-derivation of its arithmetic, F.interpolate and the PyTorch path of
``_mask_quality``.

The kernel's resize is F.interpolate's bilinear formula as one fixed sequence of float32
operations; ``reference_resize`` below performs the same operations one PyTorch elementwise op at
a time (each rounded once, never fused), so the two must agree bit for bit on every CPU and with
every PyTorch release. F.interpolate itself rounds differently between releases and CPU
capabilities, so against it the kernel is held to a few ulps.

Skipped where the kernel cannot be built (no C++ compiler): post-processing then runs the
PyTorch path, which the rest of the post-processing tests cover.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from panoptic_segformer.layers import _extension
from panoptic_segformer.modeling import postprocessing
from panoptic_segformer.modeling.postprocessing import MASK_STATS_IMPL_ENV, _mask_quality

KERNEL, WHY_NOT = _extension.load_cpu_extension()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no CPU kernel: {WHY_NOT}")
ROOT = Path(__file__).resolve().parents[2]

# (h, w) -> (H, W): up, down and mixed, integer and non-integer scales, the paper's stride 8
# at 800x1333, small outputs (H + W <= 128, where F.interpolate switches kernels) and same size
SIZES = [
    ((100, 167), (800, 1333)),
    ((13, 17), (70, 90)),
    ((37, 51), (20, 110)),
    ((9, 60), (90, 45)),
    ((1, 5), (64, 80)),
    ((30, 41), (30, 41)),
    ((7, 9), (40, 50)),
    ((12, 5), (6, 3)),
]


def random_masks(num, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num, *size, generator=g) * 1.2


def _axis(size_in, size_out):
    """Source indices and weights along one axis, as the kernel's ``bilinear_axis``: every
    operation a float32 tensor operation."""
    f32 = torch.float32
    scale = torch.tensor(size_in, dtype=f32) / torch.tensor(size_out, dtype=f32)
    source = (scale * (torch.arange(size_out, dtype=f32) + 0.5) - 0.5).clamp(min=0.0)
    index0 = source.floor().long().clamp(max=size_in - 1)
    lambda1 = (source - index0.to(f32)).clamp(0.0, 1.0)
    index1 = index0 + (index0 < size_in - 1).long()
    return index0, index1, 1.0 - lambda1, lambda1


def reference_resize(masks, size_out):
    """(Q, h, w) float32 -> (Q, H, W): width first, then height, each output p * wp + q * wq."""
    x0, x1, wx0, wx1 = _axis(masks.shape[2], size_out[1])
    y0, y1, wy0, wy1 = _axis(masks.shape[1], size_out[0])
    widened = masks[:, :, x0] * wx0 + masks[:, :, x1] * wx1
    return widened[:, y0] * wy0[:, None] + widened[:, y1] * wy1[:, None]


@needs_kernel
@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_kernel_equals_reference_then_threshold(size_in, size_out):
    masks = random_masks(3 if size_in[0] < 100 else 1, size_in, seed=sum(size_in))
    resized = reference_resize(masks, size_out)
    quality = _mask_quality(masks, 0.5, size_out)
    binary = resized > 0.5
    assert torch.equal(quality.binary, binary)
    assert torch.equal(quality.areas, binary.flatten(1).sum(1))
    assert torch.equal(quality.rows, binary.any(dim=2))
    assert torch.equal(quality.cols, binary.any(dim=1))
    inside = (resized * binary).double().flatten(1).sum(1)
    expected = (inside / (binary.flatten(1).sum(1) + 1)).float()
    torch.testing.assert_close(quality.mask_scores, expected, rtol=2e-6, atol=0)


@needs_kernel
@pytest.mark.parametrize("size_in,size_out", SIZES[:3] + SIZES[6:])
def test_kernel_rounds_each_pixel_as_the_reference(size_in, size_out):
    # thresholds at the resized values themselves: a pixel one rounding step off would flip
    masks = random_masks(1, size_in, seed=7)
    resized = reference_resize(masks, size_out)
    picks = torch.randint(0, resized.numel(), (40,), generator=torch.Generator().manual_seed(0))
    for value in resized.flatten()[picks].tolist():
        quality = _mask_quality(masks, value, size_out)
        assert torch.equal(quality.binary, resized > value), value


def test_reference_is_bilinear_interpolation():
    # The arithmetic the kernel is held to is F.interpolate's resize up to rounding, whatever
    # this PyTorch release rounds like. PyTorch releases compute the source position i * in / out
    # in float32 differently; an error of one float32 ulp of the position (up to in * 2**-24)
    # moves a value by that much times its slope (at most 1.2 per pixel for these masks).
    for size_in, size_out in SIZES:
        masks = random_masks(2, size_in, seed=1)
        expected = F.interpolate(masks[None], size=size_out, mode="bilinear")[0]
        atol = 2 * max(size_in) * 2.0**-24 * 1.2 + 4 * 2.0**-24
        torch.testing.assert_close(reference_resize(masks, size_out), expected, rtol=0, atol=atol)


@needs_kernel
@pytest.mark.skipif(
    KERNEL is None or not KERNEL.avx2_supported(), reason="no AVX2 variant on this CPU or build"
)
def test_vector_variants_give_identical_results():
    # the AVX2 and baseline builds of the same operations: the same bits
    masks = random_masks(5, (37, 51), seed=3)
    for threshold in (0.3, 0.5, 0.9):
        wide = KERNEL.resized_mask_statistics(masks, 301, 413, threshold, True)
        narrow = KERNEL.resized_mask_statistics(masks, 301, 413, threshold, False)
        for a, b in zip(wide, narrow):
            assert torch.equal(a, b)


@needs_kernel
def test_kernel_and_pytorch_paths_agree(monkeypatch):
    masks = torch.randn(10, 12, 20, generator=torch.Generator().manual_seed(1)) * 0.4 + 0.4
    masks = masks.relu()
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "cpp")
    compiled = _mask_quality(masks, 0.5, (96, 160))
    resized = F.interpolate(masks[None], size=(96, 160), mode="bilinear")[0]
    at_size = _mask_quality(resized, 0.5)
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "pytorch")
    plain = _mask_quality(masks, 0.5, (96, 160))
    # F.interpolate's rounding may differ from the kernel's (see the test above): only pixels
    # that close to the threshold may land on the other side
    clear = (resized - 0.5).abs() > 1e-5
    for quality in (compiled, at_size):
        assert torch.equal(quality.binary[clear], plain.binary[clear])
        assert (quality.binary != plain.binary).sum() <= (~clear).sum()
        torch.testing.assert_close(quality.mask_scores, plain.mask_scores, rtol=1e-5, atol=0)
        # the PyTorch path's rows and columns may cover more (they only bound windows)
        assert torch.equal(quality.rows, quality.binary.any(2))
        assert torch.equal(quality.cols, quality.binary.any(1))
    assert torch.all(plain.rows >= plain.binary.any(2)) and torch.all(
        plain.cols >= plain.binary.any(1)
    )
    assert 0 < int(plain.areas.min()) and int(plain.areas.max()) < 96 * 160


@needs_kernel
def test_kernel_rejects_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="masks must be a float32 \\(Q, h, w\\) CPU tensor"):
        KERNEL.resized_mask_statistics(torch.zeros(1, 2, 2, dtype=torch.float64), 4, 4, 0.5, False)
    with pytest.raises(RuntimeError, match="the output size must be positive, got 0x4"):
        KERNEL.resized_mask_statistics(torch.zeros(1, 2, 2), 0, 4, 0.5, False)
    with pytest.raises(RuntimeError, match="masks must not be empty"):
        KERNEL.resized_mask_statistics(torch.zeros(1, 0, 2), 4, 4, 0.5, False)


def test_implementation_switch(monkeypatch):
    masks = torch.rand(2, 4, 5, dtype=torch.float64)
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=r"must be one of .* got 'fast'"):
        _mask_quality(masks, 0.5)
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "cpp")
    with pytest.raises(
        RuntimeError, match=r"=cpp was requested but masks are torch.float64 on cpu"
    ):
        _mask_quality(masks, 0.5)
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "auto")  # float64 masks: the PyTorch path
    assert torch.equal(_mask_quality(masks, 0.5).binary, masks > 0.5)


def test_jit_build(tmp_path):
    # the build users get on first use when the package was installed without the kernel; in
    # a fresh process, as the library defines the deformable-attention operator once per process
    script = f"""
import sys, torch
from panoptic_segformer.layers import _extension
try:
    module = _extension.build_cpu_extension(build_directory={str(tmp_path)!r})
except RuntimeError as e:
    print("cannot compile:", e)
    sys.exit(3)
masks = torch.rand(2, 13, 17, generator=torch.Generator().manual_seed(3)) * 1.2
binary, areas, inside, rows, cols = module.resized_mask_statistics(masks, 70, 90, 0.5, False)
assert binary.shape == (2, 70, 90) and binary.dtype == torch.bool
assert torch.equal(areas, binary.flatten(1).sum(1))
assert inside.dtype == torch.float64 and rows.shape == (2, 70) and cols.shape == (2, 90)
assert torch.ops.panoptic_segformer.ms_deform_attn.default is not None
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode == 3:  # no C++ compiler here: what the fallback is for
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]


def test_post_processing_uses_the_loaded_extension(monkeypatch):
    # post-processing picks up whatever load_cpu_extension gives
    masks = random_masks(2, (13, 17), seed=3)
    sentinel = object()
    monkeypatch.setitem(_extension._loaded, "panoptic_segformer._cpu", (sentinel, None))
    assert postprocessing._compiled_kernel(masks) is sentinel
