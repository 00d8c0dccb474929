"""The compiled CPU kernel of multi-scale deformable attention (layers/csrc/ms_deform_attn_cpu.cpp)
and the registered operator ``panoptic_segformer::ms_deform_attn``.

The kernel against the independent float64 reference (outputs and all three gradients, 1e-12) on
shapes covering non-square levels, points outside the maps, 1 to 4 levels, batches of 0, 1 and 3
and no queries; reduced precision; bit-identical gradients with 1 and 2 threads; the non-finite
rule shared with the PyTorch path; the operator's own checks, fake implementation and autograd
registration (torch.library.opcheck); torch.compile(fullgraph=True) and torch.export of the
module and the encoder, equal to eager. Skipped where the kernel cannot be built (no compiler).
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from msda_reference import level_tensors, make_inputs, random_case, reference_msda

from panoptic_segformer.layers import MSDeformAttn, ms_deform_attn_op
from panoptic_segformer.layers import multi_scale_deformable_attention as msda
from panoptic_segformer.modeling.encoder import DeformableEncoder, DeformableEncoderLayer

ROOT = Path(__file__).resolve().parents[2]
KERNEL, WHY_NOT = ms_deform_attn_op.load_cpu_extension()
pytestmark = pytest.mark.skipif(KERNEL is None, reason=f"no CPU kernel: {WHY_NOT}")

CASES = [
    dict(shapes=[(3, 5)], n_batch=1, n_queries=4, n_heads=1, dim=1, n_points=1),
    dict(shapes=[(6, 4), (3, 2)], n_batch=3, n_queries=7, n_heads=2, dim=3, n_points=2),
    dict(shapes=[(1, 7), (5, 1), (2, 3)], n_batch=1, n_queries=5, n_heads=3, dim=11, n_points=3),
    dict(shapes=[(4, 9), (2, 5), (1, 3), (1, 1)], n_batch=3, n_queries=3, n_heads=2, dim=8),
    dict(shapes=[(4, 9), (2, 5)], n_batch=0, n_queries=4),
    dict(shapes=[(4, 9), (2, 5)], n_batch=3, n_queries=0),
] + [random_case(seed) for seed in range(4)]


def forward_backward(implementation, value, ss, lsi, loc, attn, grad=None):
    """Output and the gradients of value, locations and weights for an output gradient (by
    default a random one)."""
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = msda(inputs[0], ss, lsi, inputs[1], inputs[2], implementation=implementation)
    if grad is None:
        g = torch.Generator().manual_seed(0)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


def assert_bit_identical(result, expected):
    """Two (output, gradients) results of forward_backward hold the same bits."""
    for name, a, b in zip(
        ("output", "value", "locations", "weights"),
        [result[0], *result[1]],
        [expected[0], *expected[1]],
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference_float64(case):
    kwargs = CASES[case]
    value, ss, lsi, loc, attn = make_inputs(**kwargs, seed=case, off_boundaries=True)
    out, grads = forward_backward("cpu", value, ss, lsi, loc, attn)
    n, q = kwargs["n_batch"], kwargs["n_queries"]
    assert out.shape == (n, q, value.shape[2] * value.shape[3]) and out.dtype == torch.float64
    # the reference, differentiated by autograd: an independent backward pass
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    expected = reference_msda(inputs[0], kwargs["shapes"], inputs[1], inputs[2])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if expected.numel() == 0:
        for grad in grads:
            assert torch.count_nonzero(grad) == 0
        return
    g = torch.Generator().manual_seed(0)
    expected.backward(torch.randn(expected.shape, generator=g, dtype=torch.float64))
    for name, grad, t in zip(("value", "locations", "weights"), grads, inputs):
        assert grad.shape == t.shape and grad.dtype == torch.float64, name
        torch.testing.assert_close(grad, t.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_some_points_fall_outside_and_between_levels():
    # the cases above are not a no-op for the zero padding: some points sample nothing at all,
    # some only part of their corners
    value, ss, lsi, loc, attn = make_inputs(**CASES[1], seed=1)
    for level, (h, w) in enumerate(CASES[1]["shapes"]):
        x = loc[:, :, :, level, :, 0] * w - 0.5
        y = loc[:, :, :, level, :, 1] * h - 0.5
        outside = (x <= -1) | (y <= -1) | (x >= w) | (y >= h)
        partly = ~outside & ((x < 0) | (y < 0) | (x > w - 1) | (y > h - 1))
        assert outside.any() and partly.any() and (~outside & ~partly).any()


def test_gradcheck_float64_many_levels():
    case = CASES[3]
    value, ss, lsi, loc, attn = make_inputs(**case, seed=5, off_boundaries=True)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]

    def fn(v, sampling_locations, attention_weights):
        return msda(v, ss, lsi, sampling_locations, attention_weights, implementation="cpu")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)])
@pytest.mark.parametrize("float32_coords", [False, True])
def test_reduced_precision_gradients(dtype, tol, float32_coords):
    # float16/bfloat16 values are computed in float32 and rounded once at the end, so against
    # the float32 kernel on the same rounded inputs the error is one rounding of the result
    value, ss, lsi, loc, attn = make_inputs(
        **CASES[3], dtype=torch.float32, seed=3, off_boundaries=True
    )
    coord_dtype = torch.float32 if float32_coords else dtype
    value_r, loc_r, attn_r = value.to(dtype), loc.to(coord_dtype), attn.to(coord_dtype)
    grad = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    out, grads = forward_backward("cpu", value_r, ss, lsi, loc_r, attn_r, grad)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == coord_dtype
    out_ref, grads_ref = forward_backward(
        "cpu", value_r.float(), ss, lsi, loc_r.float(), attn_r.float(), grad.float()
    )
    for name, actual, expected in zip(
        ("output", "value", "locations", "weights"), [out, *grads], [out_ref, *grads_ref]
    ):
        scale = expected.abs().max()
        error = (actual.double() - expected.double()).abs().max() / scale
        assert error <= tol, f"{name}: relative error {error:.3g} > {tol}"


def test_backward_is_bit_identical_with_1_and_2_threads():
    # many queries on small maps: every value pixel receives hundreds of contributions, so the
    # order in which they are added shows in the last bits
    value, ss, lsi, loc, attn = make_inputs(
        [(5, 7), (3, 4)],
        n_batch=2,
        n_queries=300,
        n_heads=4,
        dim=32,
        n_points=4,
        dtype=torch.float32,
        seed=11,
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            results.append(forward_backward("cpu", value, ss, lsi, loc, attn))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_bit_identical(other, results[0])
    _, grads = results[0]
    # the inputs are sensitive to the order: another order of the same sums (the PyTorch path)
    # gives other bits, within float32 rounding
    _, pytorch_grads = forward_backward("pytorch", value, ss, lsi, loc, attn)
    assert not torch.equal(pytorch_grads[0], grads[0])
    torch.testing.assert_close(pytorch_grads[0], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    KERNEL is None or not KERNEL.avx2_supported(), reason="no AVX2 variant on this CPU or build"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_and_baseline_builds_give_identical_bits(dtype):
    value, ss, lsi, loc, attn = make_inputs(
        [(5, 7), (3, 4)],
        n_batch=2,
        n_queries=50,
        n_heads=2,
        dim=20,
        n_points=3,
        dtype=torch.float32,
        seed=12,
    )
    value = value.to(dtype)
    results = []
    try:
        for enabled in (True, False):
            KERNEL.set_msda_avx2(enabled)
            results.append(forward_backward("cpu", value, ss, lsi, loc, attn))
    finally:
        KERNEL.set_msda_avx2(True)
    assert_bit_identical(*results)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_rule_is_the_same_on_both_paths(dtype):
    # csrc/ms_deform_attn_math.h: a NaN or infinite location samples NaN (output and its
    # location and weight gradients NaN, nothing added to grad_value); a finite location outside
    # samples zero, however far (no overflow to NaN); a NaN or infinite weight poisons as a * 0
    value, ss, lsi, loc, attn = make_inputs(
        [(5, 7), (3, 4)], n_batch=1, n_queries=6, dtype=dtype, seed=2, off_boundaries=True
    )
    loc[0, 0, 0, 0, 0, 0] = math.nan
    loc[0, 1, 1, 1, 1, 1] = math.inf
    loc[0, 2, 0, 1, 0, 0] = -math.inf
    loc[0, 3, 1, 0, 1] = torch.tensor([1e30, 0.5], dtype=dtype)  # finite, far outside
    loc[0, 4, 0, 0, 0] = torch.tensor([5.0, 5.0], dtype=dtype)  # outside, with a NaN weight
    attn[0, 4, 0, 0, 0] = math.nan
    loc[0, 5, 1, 0, 0] = torch.tensor([0.3, 0.6], dtype=dtype)  # inside, with an infinite weight
    attn[0, 5, 1, 0, 0] = math.inf
    out_k, grads_k = forward_backward("cpu", value, ss, lsi, loc, attn)
    out_p, grads_p = forward_backward("pytorch", value, ss, lsi, loc, attn)
    heads = out_k.view(1, 6, 2, 3)
    for q, m in ((0, 0), (1, 1), (2, 0), (4, 0)):
        assert heads[0, q, m].isnan().all(), (q, m)
    assert torch.isfinite(heads[0, 3]).all()  # far outside: a zero sample, not NaN
    torch.testing.assert_close(out_k, out_p, equal_nan=True)
    grad_loc, grad_attn = grads_k[1], grads_k[2]
    for point in ((0, 0, 0, 0, 0), (0, 1, 1, 1, 1), (0, 2, 0, 1, 0)):
        assert grad_loc[point].isnan().all() and grad_attn[point].isnan(), point
    # far outside or outside with a NaN weight: zero gradients of the location and weight
    assert torch.equal(grad_loc[0, 3, 1, 0, 1], torch.zeros(2, dtype=dtype))
    assert grad_attn[0, 3, 1, 0, 1] == 0 and grad_attn[0, 4, 0, 0, 0] == 0
    # grad_value: NaN or infinite only where the infinite weight's corners are
    assert (~torch.isfinite(grads_k[0])).sum() > 0
    for name, gk, gp in zip(("value", "locations", "weights"), grads_k, grads_p):
        torch.testing.assert_close(gk, gp, equal_nan=True, msg=name)


def test_operator_checks_its_arguments():
    op = torch.ops.panoptic_segformer.ms_deform_attn
    backward = torch.ops.panoptic_segformer.ms_deform_attn_backward
    value, ss, lsi, loc, attn = make_inputs([(4, 6), (2, 3)], dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"level_start_index\[1\] = 23 but the levels before"):
        op(value, ss, torch.tensor([0, 23]), loc, attn)
    with pytest.raises(RuntimeError, match=r"spatial_shapes\[0\] = \(0, 6\) must be positive"):
        op(value, torch.tensor([[0, 6], [2, 3]]), lsi, loc, attn)
    with pytest.raises(
        RuntimeError, match=r"spatial_shapes\[1\] = \(3, 4\) holds more tokens than"
    ):
        op(value, torch.tensor([[4, 6], [3, 4]]), lsi, loc, attn)
    with pytest.raises(RuntimeError, match="spatial_shapes cover 28 tokens but value has S = 30"):
        op(value, torch.tensor([[4, 6], [2, 2]]), lsi, loc, attn)
    # a level of 2^32 x 2^32 wraps H * W to 0 in int64: the sum of the levels would match S = 30
    # while the kernel indexed a 2^64-token map
    with pytest.raises(RuntimeError, match=r"\(4294967296, 4294967296\) holds more tokens than"):
        op(value, torch.tensor([[2**32, 2**32], [5, 6]]), torch.tensor([0, 0]), loc, attn)
    # a zero batch hides nothing: N * S * M * D of the other sizes must still fit in int64
    huge = torch.zeros(1, 1, 1, 1).expand(0, 2**20, 2**22, 2**22)
    with pytest.raises(RuntimeError, match=r"N \* S \* M \* D overflows int64"):
        op(
            huge,
            torch.tensor([[2**10, 2**10]]),
            torch.tensor([0]),
            torch.zeros(1, 1, 1, 1, 1, 2).expand(0, 1, 2**22, 1, 1, 2),
            torch.zeros(1, 1, 1, 1, 1).expand(0, 1, 2**22, 1, 1),
        )
    with pytest.raises(RuntimeError, match="spatial_shapes must be an integer tensor"):
        op(value, ss.float(), lsi, loc, attn)
    with pytest.raises(RuntimeError, match=r"attention_weights must be \(N, Q, M, L, P\)"):
        op(value, ss, lsi, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="unsupported dtypes: value Double"):
        op(value.double(), ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match=r"grad_output must be \(N, Q, M \* D\) = \[2, 5, 6\]"):
        backward(value, ss, lsi, loc, attn, torch.zeros(2, 5, 7))
    # non-contiguous inputs are fine for a direct caller too
    out = op(value.transpose(0, 1).contiguous().transpose(0, 1), ss, lsi, loc, attn)
    torch.testing.assert_close(out, op(value, ss, lsi, loc, attn), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    # schema, fake (meta) implementation, autograd registration and AOT dispatch
    value, ss, lsi, loc, attn = make_inputs(**CASES[1], dtype=dtype, seed=4, off_boundaries=True)
    grad = torch.randn(3, 7, 6, dtype=dtype)
    for t in (value, loc, attn):
        t.requires_grad_()
    torch.library.opcheck(
        torch.ops.panoptic_segformer.ms_deform_attn.default, (value, ss, lsi, loc, attn)
    )
    torch.library.opcheck(
        torch.ops.panoptic_segformer.ms_deform_attn_backward.default,
        (value.detach(), ss, lsi, loc.detach(), attn.detach(), grad),
    )


def test_meta_tensors_get_shapes_only():
    value, ss, lsi, loc, attn = make_inputs(**CASES[3], dtype=torch.float32)
    out = msda(value.to("meta"), ss, lsi, loc.to("meta"), attn.to("meta"))
    assert out.device.type == "meta" and out.shape == (3, 3, 16) and out.dtype == torch.float32


def make_module(seed=0):
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    # move sampling away from its initialisation so that it depends on the queries
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.2)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.2)
    shapes = [(6, 10), (3, 5)]
    ss, lsi = level_tensors(shapes)
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 75, 32, generator=g)
    reference_points = torch.rand(2, 75, 2, 2, generator=g)
    src = torch.randn(2, 75, 32, generator=g)
    return attn, (query, reference_points, src, ss, lsi)


def _module_forward_backward(module, args):
    module.zero_grad()
    src = args[2].detach().clone().requires_grad_()
    out = module(args[0], args[1], src, *args[3:])
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in module.parameters()] + [src.grad]


def test_torch_compile_fullgraph_traces_the_operator_and_trains():
    torch._dynamo.reset()
    module, args = make_module()
    eager_out, eager_grads = _module_forward_backward(module, args)
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, recording the forward and backward graphs
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(graph, _):
            graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    compiled = torch.compile(module, fullgraph=True, backend=backend)
    out, grads = _module_forward_backward(compiled, args)
    targets = [str(n.target) for graph in graphs for n in graph.graph.nodes]
    assert "panoptic_segformer.ms_deform_attn.default" in targets
    assert "panoptic_segformer.ms_deform_attn_backward.default" in targets
    # the same kernels run: the same numbers
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_when_the_first_call_loads_the_extension():
    # in a fresh process the compiled model's first call is the one that loads the extension:
    # that must not be traced (fullgraph=True would fail on the import machinery)
    script = """
import torch
from panoptic_segformer.layers import MSDeformAttn, ms_deform_attn_op
assert "panoptic_segformer._cpu" not in ms_deform_attn_op._loaded
attn = MSDeformAttn(32, 2, 4, 2).eval()
args = (torch.randn(2, 75, 32), torch.rand(2, 75, 2, 2), torch.randn(2, 75, 32),
        torch.tensor([(6, 10), (3, 5)]), torch.tensor([0, 60]))
out = torch.compile(attn, fullgraph=True, backend="aot_eager")(*args)
assert "panoptic_segformer._cpu" in ms_deform_attn_op._loaded
torch.testing.assert_close(out, attn(*args), rtol=0, atol=0)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torch_compile_inductor_equals_eager():
    torch._dynamo.reset()
    module, args = make_module(1)
    module.eval()
    with torch.no_grad():
        expected = module(*args)
        out = torch.compile(module, fullgraph=True)(*args)
    # inductor fuses the projections around the operator: float32 rounding only
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_torch_export_of_the_module_and_the_encoder():
    module, args = make_module(2)
    module.eval()
    program = torch.export.export(module, args)
    targets = [str(n.target) for n in program.graph.nodes]
    assert targets.count("panoptic_segformer.ms_deform_attn.default") == 1
    _, other = make_module(3)  # other values of the same shapes
    for inputs in (args, other):
        torch.testing.assert_close(program.module()(*inputs), module(*inputs), rtol=0, atol=0)

    torch.manual_seed(0)
    layer = DeformableEncoderLayer(d_model=32, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4)
    encoder = DeformableEncoder(layer, num_layers=2).eval()
    query, _, src, ss, lsi = args
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.8, 0.5], [0.8, 0.6]]])
    mask = torch.zeros(2, 75, dtype=torch.bool)
    encoder_args = (src, query, ss, lsi, ratios, mask)
    program = torch.export.export(encoder, encoder_args)
    targets = [str(n.target) for n in program.graph.nodes]
    assert targets.count("panoptic_segformer.ms_deform_attn.default") == 2
    torch.testing.assert_close(
        program.module()(*encoder_args), encoder(*encoder_args), rtol=0, atol=0
    )
