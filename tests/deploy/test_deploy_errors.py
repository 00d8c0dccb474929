"""Bad input to exporting and to exported models gets an error naming the bad value (the tiny
core model: no detectron2 needed)."""

import importlib.util

import pytest
from skips import require

from panoptic_segformer.deploy import ExportedNetwork, export_network


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_batch_1_model_given_two_images_says_so(fmt, core_network, core_inputs):
    network = core_network(fmt)
    images, padding_mask = core_inputs[0]
    with pytest.raises(
        ValueError, match=r"tiny\.\w+ was exported for a batch of 1 image\(s\) but got 2"
    ):
        network(images.repeat(2, 1, 1, 1), padding_mask.repeat(2, 1, 1))


def test_a_size_not_a_multiple_of_the_divisibility_says_so(core_network, core_inputs):
    program = core_network("torch_export")
    images, padding_mask = core_inputs[0]
    with pytest.raises(
        ValueError, match="tiny.pt2 takes heights and widths that are multiples of 32, got 96 x 150"
    ):
        program(images[..., :150], padding_mask[..., :150])


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt2: no such exported model file"):
        ExportedNetwork(str(tmp_path / "nothing.pt2"))
    with pytest.raises(ValueError, match=r"model.tflite: unknown exported model format.*\.onnx"):
        ExportedNetwork(str(tmp_path / "model.tflite"))
    has_onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    for name in ("corrupt.pt2", "corrupt.ts") + (("corrupt.onnx",) if has_onnxruntime else ()):
        path = tmp_path / name
        path.write_bytes(b"not a model at all")
        with pytest.raises(ValueError, match=f"{name}: cannot load it as a"):
            ExportedNetwork(str(path), trust_code=True)


def test_export_network_refuses_bad_formats_and_sample_sizes(tmp_path, core_model, core_inputs):
    images, padding_mask = core_inputs[0]
    path = str(tmp_path / "x.pt2")

    def export(images, padding_mask, fmt="torch_export", size_divisibility=32):
        export_network(
            core_model, images, padding_mask, fmt, path, size_divisibility=size_divisibility
        )

    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of"):
        export(images, padding_mask, "tflite")
    with pytest.raises(
        ValueError,
        match=r"\(96, 150\) px: height and width must be multiples of the size divisibility 32",
    ):
        export(images[..., :150], padding_mask[..., :150])
    with pytest.raises(ValueError, match=r"\(64, 160\) px: export with images of at least 96 x 96"):
        export(images[..., :64, :], padding_mask[..., :64, :])
    with pytest.raises(ValueError, match="has no size_divisibility: pass size_divisibility"):
        export(images, padding_mask, size_divisibility=None)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("name", ["model.pt2", "model.ts"])
def test_a_program_loads_only_with_consent(tmp_path, name):
    from panoptic_segformer.deploy import UntrustedCode

    path = tmp_path / name
    path.write_bytes(b"never read without trust_code")
    with pytest.raises(UntrustedCode, match=f"{name}: a \\w+ file is a program.*trust_code=True"):
        ExportedNetwork(str(path))


def _identity_model():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_onnx_files_read_no_other_file_and_no_runtime_settings(tmp_path):
    """ONNX files need no consent, as long as they stay data: a tensor stored in another file
    (ONNX Runtime would read it) or ONNX Runtime session settings in the metadata are refused."""
    onnx = require("onnx", "ONNX needs the deploy extra (onnx)")
    require("onnxruntime", "ONNX needs the deploy extra (onnxruntime)")
    from onnx import TensorProto, helper

    model = _identity_model()
    model.metadata_props.add(key="ort_config", value='{"session_options": {}}')
    onnx.save(model, str(tmp_path / "settings.onnx"))
    with pytest.raises(
        ValueError, match=r"settings.onnx: .*refused: it holds ONNX Runtime session settings"
    ):
        ExportedNetwork(str(tmp_path / "settings.onnx"))
    model = _identity_model()
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    weight.external_data.add(key="location", value="/etc/hostname")
    model.graph.initializer.append(weight)
    onnx.save(model, str(tmp_path / "external.onnx"))
    with pytest.raises(
        ValueError, match=r"external.onnx: .*its tensor 'w' is stored in another file"
    ):
        ExportedNetwork(str(tmp_path / "external.onnx"))
    # a plain file of data loads (it then lacks our metadata, which says so)
    onnx.save(_identity_model(), str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="without Panoptic SegFormer's metadata"):
        ExportedNetwork(str(tmp_path / "plain.onnx"))
