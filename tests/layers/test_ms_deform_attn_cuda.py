"""The CUDA kernel against the PyTorch path and the CPU kernel (needs a GPU; skipped without one).

Tolerances: float32 relative error under 1e-5 (both paths accumulate in float32, in different
orders; test locations are kept off pixel boundaries, where the two may round loc * W - 0.5 to
different sides and take different one-sided derivatives); float16 and bfloat16 results are
compared with the float32 kernel on the same rounded inputs, so the only extra error is rounding
the output, 2**-10 and 2**-7 relative to the output scale respectively (documented in the
docs/model_core.md).
"""

import pytest
import torch
from msda_reference import off_pixel_boundaries

from panoptic_segformer.layers import ms_deform_attn_op
from panoptic_segformer.layers import multi_scale_deformable_attention as msda
from panoptic_segformer.layers.ms_deform_attn_op import load_operator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (shapes, N, Q, M, D, P): encoder-like, decoder-like, D not a power of two, D > 32, D < 32.
CASES = [
    ([(25, 42), (13, 21), (7, 11), (4, 6)], 2, 300, 8, 32, 4),
    ([(20, 30), (10, 15), (5, 8)], 3, 117, 4, 32, 2),
    ([(9, 7), (5, 4)], 5, 33, 2, 24, 3),
    ([(9, 7), (5, 4)], 1, 40, 2, 64, 4),
    ([(16, 3), (1, 1)], 3, 19, 3, 8, 5),
]


def make_inputs(shapes, n, q, m, d, p, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, device="cuda", generator=g, dtype=dtype)
    # Points span [-0.2, 1.2]: some fall outside the maps.
    loc = torch.rand(n, q, m, len(shapes), p, 2, device="cuda", generator=g) * 1.4 - 0.2
    loc = off_pixel_boundaries(loc.cpu(), shapes).cuda()
    attn = torch.rand(n, q, m, len(shapes), p, device="cuda", generator=g).softmax(-1)
    ss = torch.tensor(shapes, dtype=torch.int64)
    lsi = torch.cat([ss.new_zeros(1), ss.prod(1).cumsum(0)[:-1]])
    return value, ss, lsi, loc.to(dtype), attn.to(dtype)


def forward_backward(implementation, value, ss, lsi, loc, attn, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = msda(inputs[0], ss, lsi, inputs[1], inputs[2], implementation=implementation)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


def assert_relative_close(actual, expected, tol, name):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err < tol, f"{name}: relative error {err.item():.3g} >= {tol}"


def test_kernel_is_available():
    extension, reason = ms_deform_attn_op.load_extension()
    assert extension is not None, reason
    op, reason = load_operator("cuda")
    assert op is not None, reason
    for name in ("ms_deform_attn", "ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"panoptic_segformer::{name}", "CUDA")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", CASES[:3])
def test_cuda_and_cpu_kernels_agree(case, dtype, tol):
    # the two builds of ms_deform_attn_math.h: the same arithmetic, different reduction orders
    value, ss, lsi, loc, attn = make_inputs(*case, dtype=dtype)
    grad_out = torch.randn(
        value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device="cuda", dtype=dtype
    )
    out_g, grads_g = forward_backward("cuda", value, ss, lsi, loc, attn, grad_out)
    cpu = [t.cpu() for t in (value, loc, attn, grad_out)]
    out_c, grads_c = forward_backward("cpu", cpu[0], ss, lsi, cpu[1], cpu[2], cpu[3])
    assert_relative_close(out_g.cpu(), out_c, tol, "output")
    for name, gg, gc in zip(("value", "sampling_locations", "attention_weights"), grads_g, grads_c):
        assert_relative_close(gg.cpu(), gc, tol, f"grad {name}")


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_pytorch_path(case):
    value, ss, lsi, loc, attn = make_inputs(*case)
    grad_out = torch.randn(
        value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device="cuda"
    )
    out_k, grads_k = forward_backward("cuda", value, ss, lsi, loc, attn, grad_out)
    out_p, grads_p = forward_backward("pytorch", value, ss, lsi, loc, attn, grad_out)
    assert_relative_close(out_k, out_p, 1e-5, "output")
    for name, gk, gp in zip(("value", "sampling_locations", "attention_weights"), grads_k, grads_p):
        assert gk.dtype == gp.dtype and gk.shape == gp.shape
        assert_relative_close(gk, gp, 1e-5, f"grad {name}")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)])
@pytest.mark.parametrize("float32_coords", [False, True])
def test_reduced_precision_matches_float32(dtype, tol, float32_coords):
    value, ss, lsi, loc, attn = make_inputs(*CASES[0])
    coord_dtype = torch.float32 if float32_coords else dtype
    value_r, loc_r, attn_r = value.to(dtype), loc.to(coord_dtype), attn.to(coord_dtype)
    grad_out = torch.randn(2, 300, 256, device="cuda").to(dtype)
    out, grads = forward_backward("cuda", value_r, ss, lsi, loc_r, attn_r, grad_out)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == coord_dtype
    # Reference: the float32 kernel on the same rounded inputs.
    out_ref, grads_ref = forward_backward(
        "cuda", value_r.float(), ss, lsi, loc_r.float(), attn_r.float(), grad_out.float()
    )
    assert_relative_close(out, out_ref, tol, "output")
    for name, g, g_ref in zip(("value", "locations", "weights"), grads, grads_ref):
        # Gradients are rounded once at the end, like the output.
        assert_relative_close(g, g_ref, 2 * tol, f"grad {name}")


def test_gradcheck_float64():
    value, ss, lsi, loc, attn = make_inputs([(6, 5), (3, 3)], 2, 4, 2, 5, 2, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]

    def fn(v, sampling_locations, attention_weights):
        return msda(v, ss, lsi, sampling_locations, attention_weights, implementation="cuda")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_outputs_fully_written():
    # The kernels' outputs are allocated uninitialised. Free NaN-filled blocks of exactly their
    # sizes just before the call, so that the caching allocator hands those very blocks back
    # (checked by address), and any element a kernel leaves unwritten shows up as NaN.
    value, ss, lsi, loc, attn = make_inputs(*CASES[1])
    grad_out = torch.randn(3, 117, 128, device="cuda")
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    torch.cuda.synchronize()
    poison = [torch.full_like(t, float("nan")) for t in (grad_out, loc, attn)]
    poisoned = {t.data_ptr() for t in poison}
    del poison
    out = msda(inputs[0], ss, lsi, inputs[1], inputs[2], implementation="cuda")
    out.backward(grad_out)
    for name, t in (
        ("output", out),
        ("grad locations", inputs[1].grad),
        ("grad weights", inputs[2].grad),
    ):
        assert t.data_ptr() in poisoned, f"{name} did not reuse a poisoned block"
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    # grad_value is accumulated in a zeroed buffer
    assert torch.isfinite(inputs[0].grad).all()


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_any_batch_size(n):
    # The original kernel required the batch to divide im2col_step (64).
    value, ss, lsi, loc, attn = make_inputs([(7, 9), (4, 5)], n, 10, 2, 16, 2)
    torch.testing.assert_close(
        msda(value, ss, lsi, loc, attn, implementation="cuda"),
        msda(value, ss, lsi, loc, attn, implementation="pytorch"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_empty_inputs():
    value, ss, lsi, loc, attn = make_inputs([(7, 9)], 2, 0, 2, 16, 2)
    out = msda(value.requires_grad_(), ss, lsi, loc, attn, implementation="cuda")
    assert out.shape == (2, 0, 32)
    out.sum().backward()
    assert torch.count_nonzero(value.grad) == 0


def test_autocast():
    value, ss, lsi, loc, attn = make_inputs(*CASES[0])
    value.requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        out = msda(value, ss, lsi, loc, attn, implementation="cuda")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert value.grad.dtype == torch.float32 and torch.isfinite(value.grad).all()
    expected = msda(value.detach().half(), ss, lsi, loc, attn, implementation="cuda")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_non_finite_inputs_propagate_like_the_pytorch_path():
    # one rule on every path and device (csrc/ms_deform_attn_math.h); CUDA grid_sample alone
    # would map a non-finite coordinate to a zero sample
    value, ss, lsi, loc, attn = make_inputs(*CASES[2])
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[1, 1, 1, 1, 1, 1] = float("inf")
    loc[2, 2, 0, 0, 0] = 5.0
    attn[2, 2, 0, 0, 0] = float("nan")
    loc[3, 3, 1, 0, 1, 0] = 1e30  # finite, far outside: a zero sample
    grad_out = torch.randn(5, 33, 48, device="cuda")
    out_k, grads_k = forward_backward("cuda", value, ss, lsi, loc, attn, grad_out)
    out_p, grads_p = forward_backward("pytorch", value, ss, lsi, loc, attn, grad_out)
    assert out_k.isnan().any() and torch.equal(out_k.isnan(), out_p.isnan())
    torch.testing.assert_close(out_k, out_p, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert grads_k[1][0, 0, 0, 0, 0].isnan().all() and grads_k[2][0, 0, 0, 0, 0].isnan()
    for name, gk, gp in zip(("value", "locations", "weights"), grads_k, grads_p):
        torch.testing.assert_close(gk, gp, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


def test_backward_alerts_under_deterministic_algorithms():
    # grad_value is accumulated with atomics: like CUDA grid_sample, refuse (or warn) when the
    # user asked for deterministic algorithms
    value, ss, lsi, loc, attn = make_inputs(*CASES[2])
    value.requires_grad_()
    out = msda(value, ss, lsi, loc, attn, implementation="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda does not have a"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_spatial_shapes_on_gpu_accepted():
    value, ss, lsi, loc, attn = make_inputs(*CASES[2])
    torch.testing.assert_close(
        msda(value, ss.cuda(), lsi.cuda(), loc, attn, implementation="cuda"),
        msda(value, ss, lsi, loc, attn, implementation="cuda"),
        rtol=0,
        atol=0,
    )


def test_operator_checks_direct_calls():
    op = torch.ops.panoptic_segformer.ms_deform_attn
    value, ss, lsi, loc, attn = make_inputs(*CASES[2])
    with pytest.raises(
        RuntimeError, match=r"level_start_index\[0\] = 1 but the levels before it hold 0"
    ):
        op(value, ss, lsi + 1, loc, attn)
    with pytest.raises(RuntimeError, match="value must be a CUDA tensor, got one on cpu"):
        op(value.cpu(), ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match="takes at most 16 levels"):
        shapes = [(1, 1)] * 17
        many = make_inputs(shapes, 1, 2, 1, 4, 1)
        op(*many)
    # non-contiguous inputs and level shapes on the GPU are accepted
    expected = op(value, ss, lsi, loc, attn)
    strided = value.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(op(strided, ss.cuda(), lsi.cuda(), loc, attn), expected)
