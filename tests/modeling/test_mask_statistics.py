"""The fused CPU kernel of the merging's mask statistics (layers/csrc/mask_statistics.cpp)
against PyTorch's F.interpolate and the PyTorch path of ``_mask_quality``.

Skipped where the kernel cannot be built (no C++ compiler): post-processing then runs the
PyTorch path, which the rest of the post-processing tests cover.
"""

import pytest
import torch
import torch.nn.functional as F

from panoptic_segformer.layers import _extension
from panoptic_segformer.modeling import postprocessing
from panoptic_segformer.modeling.postprocessing import MASK_STATS_IMPL_ENV, _mask_quality

KERNEL, WHY_NOT = _extension.load_cpu_extension()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no CPU kernel: {WHY_NOT}")

# (h, w) -> (H, W): up, down and mixed, integer and non-integer scales, the paper's stride 8
# at 800x1333; all with H + W > 128, where F.interpolate uses the kernel the C++ reproduces
SIZES = [
    ((100, 167), (800, 1333)),
    ((13, 17), (70, 90)),
    ((37, 51), (20, 110)),
    ((9, 60), (90, 45)),
    ((1, 5), (64, 80)),
    ((30, 41), (30, 41)),
]


def random_masks(num, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num, *size, generator=g) * 1.2


@needs_kernel
@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_kernel_equals_interpolate_then_threshold(size_in, size_out):
    masks = random_masks(3 if size_in[0] < 100 else 1, size_in, seed=sum(size_in))
    resized = F.interpolate(masks[None], size=size_out, mode="bilinear")[0]
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
@pytest.mark.parametrize("size_in,size_out", SIZES[:3])
def test_kernel_rounds_each_pixel_as_interpolate(size_in, size_out):
    # thresholds at the resized values themselves: a pixel one rounding step off would flip
    masks = random_masks(1, size_in, seed=7)
    resized = F.interpolate(masks[None], size=size_out, mode="bilinear")[0]
    picks = torch.randint(0, resized.numel(), (40,), generator=torch.Generator().manual_seed(0))
    for value in resized.flatten()[picks].tolist():
        quality = _mask_quality(masks, value, size_out)
        assert torch.equal(quality.binary, resized > value), value


@needs_kernel
def test_kernel_and_pytorch_paths_agree(monkeypatch):
    masks = torch.randn(10, 12, 20, generator=torch.Generator().manual_seed(1)) * 0.4 + 0.4
    masks = masks.relu()
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "cpp")
    compiled = _mask_quality(masks, 0.5, (96, 160))
    at_size = _mask_quality(F.interpolate(masks[None], size=(96, 160), mode="bilinear")[0], 0.5)
    monkeypatch.setenv(MASK_STATS_IMPL_ENV, "pytorch")
    plain = _mask_quality(masks, 0.5, (96, 160))
    for quality in (compiled, at_size):
        assert torch.equal(quality.binary, plain.binary)
        assert torch.equal(quality.areas, plain.areas)
        torch.testing.assert_close(quality.mask_scores, plain.mask_scores, rtol=1e-6, atol=0)
        # the PyTorch path's rows and columns may cover more (they only bound windows)
        assert torch.all(plain.rows >= quality.rows) and torch.all(plain.cols >= quality.cols)
        assert torch.equal(quality.rows, quality.binary.any(2))
    assert 0 < int(plain.areas.min()) and int(plain.areas.max()) < 96 * 160


@needs_kernel
def test_kernel_rejects_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="masks must be a float32 \\(Q, h, w\\) CPU tensor"):
        KERNEL.resized_mask_statistics(torch.zeros(1, 2, 2, dtype=torch.float64), 4, 4, 0.5, False)
    with pytest.raises(RuntimeError, match="the output size must be positive, got 0x4"):
        KERNEL.resized_mask_statistics(torch.zeros(1, 2, 2), 0, 4, 0.5, False)


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


def test_jit_build(tmp_path, monkeypatch):
    # the build users get on first use when the package was installed without the kernel
    try:
        module = _extension.build_cpu_extension(build_directory=str(tmp_path))
    except RuntimeError as e:  # no C++ compiler here: what the fallback is for
        pytest.skip(f"cannot compile the CPU kernel here: {e}")
    masks = random_masks(2, (13, 17), seed=3)
    binary, areas, inside, rows, cols = module.resized_mask_statistics(masks, 70, 90, 0.5, False)
    assert binary.shape == (2, 70, 90) and binary.dtype == torch.bool
    assert torch.equal(areas, binary.flatten(1).sum(1))
    assert inside.dtype == torch.float64 and rows.shape == (2, 70) and cols.shape == (2, 90)
    # and post-processing picks up whatever load_cpu_extension gives
    monkeypatch.setitem(_extension._loaded, "panoptic_segformer._cpu", (module, None))
    assert postprocessing._compiled_kernel(masks) is module
