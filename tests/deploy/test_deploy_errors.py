"""Bad input to exporting and to exported models gets an error naming the bad value (the tiny
core model: no detectron2 needed)."""

import importlib.util

import pytest

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
            ExportedNetwork(str(path))


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
