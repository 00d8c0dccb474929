"""multi_scale_deformable_attention: the PyTorch path and the CPU kernel against a slow reference,
gradients, errors, dispatch, dtypes and autocast (all on the CPU). The CPU kernel's own tests
(random shapes, determinism, tracing) are in test_ms_deform_attn_cpu.py."""

import logging

import pytest
import torch
from msda_reference import make_inputs, reference_msda

from panoptic_segformer.layers import ms_deform_attn_func, ms_deform_attn_op
from panoptic_segformer.layers import multi_scale_deformable_attention as msda

CPU_KERNEL, WHY_NOT = ms_deform_attn_op.load_cpu_extension()
# the two CPU implementations, each tested against the same reference
IMPLEMENTATIONS = [
    "pytorch",
    pytest.param(
        "cpu", marks=pytest.mark.skipif(CPU_KERNEL is None, reason=f"no CPU kernel: {WHY_NOT}")
    ),
]


SHAPE_CASES = [
    [(6, 4), (3, 2), (2, 1)],  # non-square levels, one a single column
    [(5, 7), (3, 4)],
    [(1, 1)],
    [(4, 9), (2, 5), (1, 3), (1, 1)],
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shapes", SHAPE_CASES)
@pytest.mark.parametrize("n_batch", [1, 3])
def test_matches_reference_float64(shapes, n_batch, impl):
    value, ss, lsi, loc, attn = make_inputs(shapes, n_batch=n_batch, seed=n_batch)
    out = msda(value, ss, lsi, loc, attn, implementation=impl)
    expected = reference_msda(value, shapes, loc, attn)
    assert out.shape == (n_batch, loc.shape[1], value.shape[2] * value.shape[3])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_matches_reference_float32(impl):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[0], dtype=torch.float32, n_queries=9)
    out = msda(value, ss, lsi, loc, attn, implementation=impl)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), reference_msda(value, SHAPE_CASES[0], loc, attn), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_known_values_at_pixel_centres_and_outside(impl):
    # One 2x3 level holding 0..5; a point at a pixel centre reads exactly that pixel, a point at
    # the shared edge of two pixels reads their mean, and points beyond half a pixel outside
    # the map read zero.
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    ss = torch.tensor([[2, 3]])
    lsi = torch.tensor([0])
    points = [
        ((0.5 / 3, 0.5 / 2), 0.0),  # centre of pixel (0, 0)
        ((2.5 / 3, 1.5 / 2), 5.0),  # centre of pixel (1, 2)
        ((1.0 / 3, 0.5 / 2), 0.5),  # between pixels (0, 0) and (0, 1)
        ((1.5 / 3, 1.0 / 2), 2.5),  # between rows 0 and 1 of column 1
        ((0.0, 0.5 / 2), 0.0 * 0.5),  # left edge: half pixel (0, 0), half zero padding
        ((1.0, 1.5 / 2), 5.0 * 0.5),  # right edge
        ((-0.2, 0.5), 0.0),  # beyond half a pixel outside
        ((0.5, 1.3), 0.0),
    ]
    loc = torch.tensor([p for p, _ in points], dtype=torch.float64).view(1, len(points), 1, 1, 1, 2)
    attn = torch.ones(1, len(points), 1, 1, 1, dtype=torch.float64)
    out = msda(value, ss, lsi, loc, attn, implementation=impl)
    torch.testing.assert_close(
        out.flatten(), torch.tensor([e for _, e in points], dtype=torch.float64)
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("n_batch", [1, 3])
def test_gradcheck_float64(n_batch, impl):
    value, ss, lsi, loc, attn = make_inputs(
        SHAPE_CASES[0], n_batch=n_batch, n_queries=3, seed=7, off_boundaries=True
    )
    inputs = [t.requires_grad_() for t in (value, loc, attn)]

    def fn(v, sampling_locations, attention_weights):
        return msda(v, ss, lsi, sampling_locations, attention_weights, implementation=impl)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_batch_and_queries(impl):
    for n_batch, n_queries in ((0, 4), (2, 0)):
        value, ss, lsi, loc, attn = make_inputs(
            SHAPE_CASES[1], n_batch=n_batch, n_queries=n_queries
        )
        inputs = [t.requires_grad_() for t in (value, loc, attn)]
        out = msda(inputs[0], ss, lsi, inputs[1], inputs[2], implementation=impl)
        assert out.shape == (n_batch, n_queries, 6)
        out.sum().backward()
        for t in inputs:
            assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("float32_coords", [False, True])
def test_reduced_precision_value(dtype, float32_coords, impl):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[0], dtype=torch.float32, n_queries=8)
    coord_dtype = torch.float32 if float32_coords else dtype
    out = msda(
        value.to(dtype), ss, lsi, loc.to(coord_dtype), attn.to(coord_dtype), implementation=impl
    )
    assert out.dtype == dtype
    expected = reference_msda(
        value.to(dtype), SHAPE_CASES[0], loc.to(coord_dtype), attn.to(coord_dtype)
    )
    # The inputs are rounded to `dtype`; the arithmetic runs in float32, so the only further
    # error is rounding the output (8 mantissa bits for bfloat16, 11 for float16).
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_autocast_casts_value_and_keeps_float32_coordinates(impl):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[0], dtype=torch.float32)
    value.requires_grad_()
    loc.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = msda(value, ss, lsi, loc, attn, implementation=impl)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert value.grad.dtype == torch.float32 and loc.grad.dtype == torch.float32
    assert value.grad.abs().sum() > 0 and loc.grad.abs().sum() > 0
    expected = reference_msda(value.detach().bfloat16(), SHAPE_CASES[0], loc.detach(), attn)
    torch.testing.assert_close(out.double(), expected, rtol=2.0**-7, atol=2.0**-7)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_finite_locations_and_weights_give_nan_not_zero(impl):
    # A NaN location, an infinite one far outside the map, and a NaN weight on a point outside
    # the map: each query's output must be NaN, never a silent zero.
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[1], n_batch=1, n_queries=4)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1, 1] = float("inf")
    loc[0, 2, 0, 0, 0] = torch.tensor([5.0, 5.0], dtype=loc.dtype)
    attn[0, 2, 0, 0, 0] = float("nan")
    out = msda(value, ss, lsi, loc, attn, implementation=impl).view(1, 4, 2, 3)
    assert out[0, 0, 0].isnan().all() and out[0, 1, 1].isnan().all() and out[0, 2, 0].isnan().all()
    assert torch.isfinite(out[0, 3]).all() and torch.isfinite(out[0, 0, 1]).all()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_contiguous_inputs(impl):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[0])
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_t = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_t.is_contiguous() and not loc_t.is_contiguous()
    torch.testing.assert_close(
        msda(value_t, ss, lsi, loc_t, attn, implementation=impl),
        msda(value, ss, lsi, loc, attn, implementation=impl),
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_int32_spatial_shapes_accepted(impl):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[1])
    torch.testing.assert_close(
        msda(value, ss.int(), lsi.int(), loc, attn, implementation=impl),
        msda(value, ss, lsi, loc, attn, implementation=impl),
    )


def _bad_inputs():
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[0], dtype=torch.float32)
    ok = dict(
        value=value,
        spatial_shapes=ss,
        level_start_index=lsi,
        sampling_locations=loc,
        attention_weights=attn,
    )
    cases = {
        "value rank": (dict(value=value[0]), ValueError, r"value must be \(N, S, M, D\)"),
        "locations rank": (
            dict(sampling_locations=loc[..., 0]),
            ValueError,
            r"sampling_locations must be \(N, Q, M, L, P, 2\)",
        ),
        "locations batch": (dict(sampling_locations=loc[:1]), ValueError, "batch size N=2"),
        "weights shape": (
            dict(attention_weights=attn[..., :1]),
            ValueError,
            r"attention_weights must be \(N, Q, M, L, P\) = \(2, 5, 2, 3, 2\)",
        ),
        "shapes rows": (
            dict(spatial_shapes=ss[:2]),
            ValueError,
            r"spatial_shapes must be \(L, 2\)",
        ),
        "shapes float": (
            dict(spatial_shapes=ss.float()),
            TypeError,
            "spatial_shapes must be an integer tensor, got torch.float32",
        ),
        "start index len": (
            dict(level_start_index=lsi[:2]),
            ValueError,
            r"level_start_index must be \(L,\) = \(3,\)",
        ),
        "start index wrong": (
            dict(level_start_index=torch.tensor([0, 24, 31])),
            ValueError,
            r"level_start_index\[2\] = 31 is inconsistent",
        ),
        "level past the tokens": (
            dict(spatial_shapes=torch.tensor([[6, 4], [3, 2], [2, 2]])),
            ValueError,
            r"spatial_shapes\[2\] = \(2, 2\) holds more tokens than the 2 value has left",
        ),
        "tokens mismatch": (
            dict(spatial_shapes=torch.tensor([[6, 4], [3, 2], [1, 1]])),
            ValueError,
            r"cover 31 tokens but value has S = 32",
        ),
        "level sizes wrapping int64": (
            dict(
                spatial_shapes=torch.tensor([[2**32, 2**32], [6, 4], [2, 4]]),
                level_start_index=torch.tensor([0, 0, 24]),
            ),
            ValueError,
            r"spatial_shapes\[0\] = \(4294967296, 4294967296\) holds more tokens",
        ),
        "zero size level": (
            dict(spatial_shapes=torch.tensor([[6, 4], [0, 2], [8, 1]])),
            ValueError,
            r"spatial_shapes\[1\] = \(0, 2\) must be positive",
        ),
        "no levels": (
            dict(
                sampling_locations=loc[:, :, :, :0],
                attention_weights=attn[:, :, :, :0],
                spatial_shapes=ss[:0],
                level_start_index=lsi[:0],
            ),
            ValueError,
            r"at least one level \(L >= 1\)",
        ),
        "no channels": (
            dict(value=value[..., :0]),
            ValueError,
            "value must have at least one head and channel",
        ),
        "int value": (dict(value=value.long()), TypeError, "got torch.int64"),
        "mixed coords": (
            dict(attention_weights=attn.double()),
            TypeError,
            r"sampling_locations \(torch.float32\) and attention_weights " r"\(torch.float64\)",
        ),
        "coords vs value": (
            dict(sampling_locations=loc.half(), attention_weights=attn.half()),
            TypeError,
            "are torch.float16 but value is torch.float32",
        ),
        "device": (
            dict(sampling_locations=loc.to("meta")),
            ValueError,
            "sampling_locations is on meta but value is on cpu",
        ),
        "shapes device": (
            dict(spatial_shapes=ss.to("meta")),
            ValueError,
            "spatial_shapes is on meta; it must be on the CPU or on cpu",
        ),
    }
    return ok, cases


@pytest.mark.parametrize("case", list(_bad_inputs()[1]))
def test_bad_inputs_raise_clear_errors(case):
    ok, cases = _bad_inputs()
    override, error, message = cases[case]
    with pytest.raises(error, match=message):
        msda(**{**ok, **override})


def test_explicit_implementation_switches(monkeypatch, caplog):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[1])
    with pytest.raises(
        RuntimeError, match="implementation='cuda' was requested but inputs are on cpu"
    ):
        msda(value, ss, lsi, loc, attn, implementation="cuda")
    with pytest.raises(ValueError, match="implementation must be one of .* got 'fast'"):
        msda(value, ss, lsi, loc, attn, implementation="fast")
    monkeypatch.setenv("PANOPTIC_SEGFORMER_MSDA_IMPL", "gpu")
    with pytest.raises(ValueError, match="PANOPTIC_SEGFORMER_MSDA_IMPL must be one of .* 'gpu'"):
        msda(value, ss, lsi, loc, attn)
    monkeypatch.setenv("PANOPTIC_SEGFORMER_MSDA_IMPL", "cuda")
    with pytest.raises(RuntimeError, match="implementation='cuda' was requested"):
        msda(value, ss, lsi, loc, attn)
    monkeypatch.setenv("PANOPTIC_SEGFORMER_MSDA_IMPL", "pytorch")
    monkeypatch.setattr(ms_deform_attn_func, "_logged_paths", set())
    with caplog.at_level(logging.INFO, logger=ms_deform_attn_func.__name__):
        for _ in range(3):
            msda(value, ss, lsi, loc, attn)
    assert _path_messages(caplog) == [
        "multi-scale deformable attention: using the pytorch path (forced by "
        "implementation='pytorch' or PANOPTIC_SEGFORMER_MSDA_IMPL)"
    ]


def _path_messages(caplog):
    return [r.getMessage() for r in caplog.records if "deformable attention" in r.getMessage()]


@pytest.mark.skipif(CPU_KERNEL is None, reason=f"no CPU kernel: {WHY_NOT}")
def test_cpu_inputs_use_and_log_the_cpu_kernel_once(monkeypatch, caplog):
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[1])
    monkeypatch.delenv("PANOPTIC_SEGFORMER_MSDA_IMPL", raising=False)
    monkeypatch.setattr(ms_deform_attn_func, "_logged_paths", set())
    calls = []
    real = torch.ops.panoptic_segformer.ms_deform_attn
    monkeypatch.setattr(
        ms_deform_attn_func.torch.ops.panoptic_segformer,
        "ms_deform_attn",
        lambda *args: calls.append(args) or real(*args),
    )
    with caplog.at_level(logging.INFO, logger=ms_deform_attn_func.__name__):
        msda(value, ss, lsi, loc, attn)
        msda(value, ss, lsi, loc, attn, implementation="cpu")
    assert len(calls) == 2
    assert _path_messages(caplog) == [
        "multi-scale deformable attention: using the cpu path (compiled CPU kernel)"
    ]


def test_without_the_cpu_kernel_the_pytorch_path_runs(monkeypatch, caplog):
    # what a user without a C++ compiler gets: the PyTorch path, and one line saying why
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[1])
    monkeypatch.delenv("PANOPTIC_SEGFORMER_MSDA_IMPL", raising=False)
    monkeypatch.setattr(ms_deform_attn_func, "_logged_paths", set())
    monkeypatch.setitem(
        ms_deform_attn_op._loaded, "panoptic_segformer._cpu", (None, "no C++ compiler (test)")
    )
    with caplog.at_level(logging.INFO, logger=ms_deform_attn_func.__name__):
        out = msda(value, ss, lsi, loc, attn)
        msda(value, ss, lsi, loc, attn)
    assert _path_messages(caplog) == [
        "multi-scale deformable attention: using the pytorch path (no C++ compiler (test))"
    ]
    torch.testing.assert_close(out, reference_msda(value, SHAPE_CASES[1], loc, attn))
    with pytest.raises(
        RuntimeError, match=r"implementation='cpu' was requested but no C\+\+ compiler"
    ):
        msda(value, ss, lsi, loc, attn, implementation="cpu")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("location_dtype", [torch.bfloat16, torch.float32])
def test_autocast_takes_mixed_location_and_weight_dtypes(impl, location_dtype):
    # Under autocast, locations often come out of autocast ops (bfloat16) while the weights come
    # out of a softmax (float32): cast first, then check.
    value, ss, lsi, loc, attn = make_inputs(SHAPE_CASES[0], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = msda(value, ss, lsi, loc.to(location_dtype), attn, implementation=impl)
    assert out.dtype == torch.bfloat16
    expected = reference_msda(value.bfloat16(), SHAPE_CASES[0], loc.to(location_dtype), attn)
    torch.testing.assert_close(out.double(), expected, rtol=2.0**-7, atol=2.0**-7)
