"""The ONNX Runtime custom operator panoptic_segformer::MSDeformAttn: built from the CPU kernel's
loop, it gives the registered PyTorch operator's bits; a model exported with it equals eager; a
file that needs it, where it cannot be built, gets one clear error.

Building the library needs ONNX Runtime's C header (ORT_INCLUDE_DIR, see
panoptic_segformer/deploy/ort_ops.py); the tests that run it skip without it.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from skips import require

ort = require("onnxruntime", "the deploy extra (onnxruntime) is not installed")
onnx = require("onnx", "the deploy extra (onnx) is not installed")

from onnx import TensorProto, helper  # noqa: E402

from panoptic_segformer.deploy import ort_ops  # noqa: E402
from panoptic_segformer.layers.ms_deform_attn_op import load_operator  # noqa: E402

INPUTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
INPUT_TYPES = (
    TensorProto.FLOAT,
    TensorProto.INT64,
    TensorProto.INT64,
    TensorProto.FLOAT,
    TensorProto.FLOAT,
)


def operator_model() -> bytes:
    """An ONNX model of one MSDeformAttn node."""
    node = helper.make_node(ort_ops.OPERATOR, list(INPUTS), ["output"], domain=ort_ops.DOMAIN)
    graph = helper.make_graph(
        [node],
        "msda",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(INPUTS, INPUT_TYPES)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def random_inputs(level_shapes, batch=2, heads=2, channels=8, queries=37, points=3, seed=0):
    """Inputs of the operator, a quarter of the locations off the map."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(level_shapes)
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * 1.5
    locations -= 0.25
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator)
    return [value, shapes, starts, locations, weights]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The operator's library, built into a temporary cache."""
    try:
        ort_ops.find_headers()
    except ort_ops.LibraryUnavailable as e:
        pytest.skip(f"needs ONNX Runtime's C header: {e}")
    os.environ["PANOPTIC_SEGFORMER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return ort_ops.build_library()
    finally:
        del os.environ["PANOPTIC_SEGFORMER_CACHE"]


@pytest.fixture(scope="module")
def kernel():
    operator, reason = load_operator("cpu")
    if operator is None:
        pytest.skip(f"the compiled CPU operator is not available: {reason}")
    return operator


def session(library, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(library)
    return ort.InferenceSession(operator_model(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "level_shapes", [[(10, 12), (5, 6), (3, 3)], [(7, 1)], [(16, 20), (8, 10), (4, 5), (2, 3)]]
)
def test_gives_the_bits_of_the_pytorch_operator(library, kernel, level_shapes, threads):
    inputs = random_inputs(level_shapes)
    expected = torch.ops.panoptic_segformer.ms_deform_attn(*inputs).numpy()
    feed = {name: x.numpy() for name, x in zip(INPUTS, inputs)}
    (actual,) = session(library, threads).run(None, feed)
    assert actual.shape == expected.shape == (2, 37, 16)
    assert np.array_equal(actual, expected)
    assert np.abs(expected).max() > 0.1  # the points sample values, not just zeros


def test_follows_the_kernels_nan_rule(library, kernel):
    """A NaN location poisons its query's head; a point off the map with a finite location adds
    nothing: the same outputs as the PyTorch operator, NaNs in the same places."""
    inputs = random_inputs([(6, 5), (3, 3)], queries=5)
    inputs[3][0, 1, 0, 0, 0, 0] = float("nan")
    inputs[3][1, 2, 1, 1, 2] = torch.tensor([7.0, -3.0])
    expected = torch.ops.panoptic_segformer.ms_deform_attn(*inputs).numpy()
    feed = {name: x.numpy() for name, x in zip(INPUTS, inputs)}
    (actual,) = session(library, 2).run(None, feed)
    assert np.isnan(actual[0, 1, :8]).all() and not np.isnan(actual[0, 1, 8:]).any()
    assert np.array_equal(actual, expected, equal_nan=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x[2].add_(1), "level_start_index[0] = 1 but the levels before it hold 0"),
        (
            lambda x: x.__setitem__(0, x[0][:, :100]),
            "spatial_shapes[0] = (10, 12) holds more tokens than the 100 value has left",
        ),
        (lambda x: x.__setitem__(4, x[4][:, :, :1]), "attention_weights of shape (2, 37, 1, 3, 3)"),
        (lambda x: x.__setitem__(3, x[3][0]), "sampling_locations of shape (37, 2, 3, 3, 2)"),
    ],
)
def test_bad_shapes_get_an_error_naming_them(library, change, message):
    inputs = random_inputs([(10, 12), (5, 6), (3, 3)])
    change(inputs)
    feed = {name: x.numpy() for name, x in zip(INPUTS, inputs)}
    with pytest.raises(Exception, match="panoptic_segformer::MSDeformAttn") as error:
        session(library, 1).run(None, feed)
    assert message in str(error.value)


def test_builds_once_per_source(library, tmp_path, monkeypatch):
    """A second build of the same sources and header reuses the library; another header
    builds another."""
    monkeypatch.setenv("PANOPTIC_SEGFORMER_CACHE", str(tmp_path))
    first = ort_ops.build_library()
    modified = os.path.getmtime(first)
    assert ort_ops.build_library() == first and os.path.getmtime(first) == modified
    headers = tmp_path / "include"
    shutil.copytree(ort_ops.find_headers(), headers)
    with open(headers / ort_ops.HEADER, "a") as f:
        f.write("\n// changed\n")
    other = ort_ops.build_library(str(headers))
    assert other != first and os.path.isfile(other)


def test_no_header_names_the_variable_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(ort_ops.INCLUDE_ENV, raising=False)
    with pytest.raises(ort_ops.LibraryUnavailable, match="ORT_INCLUDE_DIR"):
        ort_ops.build_library()
    with pytest.raises(ort_ops.LibraryUnavailable, match=f"{tmp_path}: no onnxruntime_c_api.h"):
        ort_ops.build_library(str(tmp_path))


def test_a_failed_build_reports_the_compiler_and_leaves_nothing(tmp_path, monkeypatch):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    (tmp_path / ort_ops.HEADER).write_text("#error not ONNX Runtime's header\n")
    monkeypatch.setenv("PANOPTIC_SEGFORMER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ort_ops.LibraryUnavailable, match="not ONNX Runtime's header"):
        ort_ops.build_library(str(tmp_path))
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_a_file_needing_the_operator_names_it_where_it_cannot_be_built(tmp_path, monkeypatch):
    from panoptic_segformer.deploy import ExportedNetwork

    monkeypatch.delenv(ort_ops.INCLUDE_ENV, raising=False)
    path = tmp_path / "model.onnx"
    path.write_bytes(operator_model())
    with pytest.raises(ort_ops.LibraryUnavailable) as error:
        ExportedNetwork(str(path))
    message = str(error.value)
    assert str(path) in message and "panoptic_segformer::MSDeformAttn" in message
    assert "ORT_INCLUDE_DIR" in message


def test_a_model_exported_with_it_equals_eager_at_two_sizes(
    library, kernel, core_model, core_inputs, tmp_path, monkeypatch
):
    """Deformable attention becomes one MSDeformAttn node per attention layer and no GridSample;
    the file, run where the library is registered, gives the eager network's outputs."""
    from panoptic_segformer.deploy import ExportedNetwork, export_network, max_abs_differences

    monkeypatch.setenv("PANOPTIC_SEGFORMER_CACHE", os.path.dirname(os.path.dirname(library)))
    path = str(tmp_path / "tiny.onnx")
    images, padding_mask = core_inputs[0]
    metadata = export_network(
        core_model, images, padding_mask, "onnx", path, ort_custom_op=True, size_divisibility=32
    )
    assert metadata["custom_ops"] == ["panoptic_segformer::MSDeformAttn"]
    op_types = [node.op_type for node in onnx.load(path).graph.node]
    # the tiny model: one encoder layer and one location-decoder layer
    assert op_types.count("MSDeformAttn") == 2 and "GridSample" not in op_types
    network = ExportedNetwork(path)
    for images, padding_mask in core_inputs:
        with torch.no_grad():
            expected = core_model(images, padding_mask)
        differences = max_abs_differences(expected, network(images, padding_mask))
        assert max(differences.values()) <= 1e-4, differences


def test_only_onnx_files_take_it(core_model, core_inputs, tmp_path):
    from panoptic_segformer.deploy import export_network

    images, padding_mask = core_inputs[0]
    with pytest.raises(ValueError, match="export format 'onnx', not 'torch_export'"):
        export_network(
            core_model, images, padding_mask, "torch_export", str(tmp_path / "m.pt2"),
            ort_custom_op=True, size_divisibility=32,
        )  # fmt: skip
    assert not list(tmp_path.iterdir())
