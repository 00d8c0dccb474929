"""Bad input to exporting and to exported models gets an error naming the bad value."""

import pytest

pytest.importorskip("detectron2", reason="exporting the meta-architecture needs detectron2")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    sys.path.insert(0, str(ROOT / "tools" / "deploy"))
    import export_model

    return export_model


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_batch_1_model_given_two_images_says_so(fmt, exported, network_inputs):
    from panoptic_segformer.deploy import ExportedNetwork

    network = ExportedNetwork(str(exported(fmt)))
    images, padding_mask = network_inputs[0]
    with pytest.raises(ValueError, match=r"exported for a batch of 1 image\(s\) but got 2"):
        network(images.repeat(2, 1, 1, 1), padding_mask.repeat(2, 1, 1))


def test_sizes_an_exported_model_cannot_take(exported, network_inputs):
    from panoptic_segformer.deploy import ExportedNetwork

    images, padding_mask = network_inputs[0]
    program = ExportedNetwork(str(exported("torch_export")))
    with pytest.raises(ValueError, match="multiples of 32, got 96 x 150"):
        program(images[..., :150], padding_mask[..., :150])
    traced = ExportedNetwork(str(exported("torchscript")))
    other, other_mask = network_inputs[1]
    with pytest.raises(ValueError, match="exported at, 96 x 160, got 96 x 192"):
        traced(other, other_mask)


def test_missing_corrupt_and_unknown_files(tmp_path):
    from panoptic_segformer.deploy import ExportedNetwork

    with pytest.raises(FileNotFoundError, match="nothing.pt2: no such exported model file"):
        ExportedNetwork(str(tmp_path / "nothing.pt2"))
    with pytest.raises(ValueError, match=r"model.tflite: unknown exported model format.*\.onnx"):
        ExportedNetwork(str(tmp_path / "model.tflite"))
    for name in ("corrupt.pt2", "corrupt.ts") + (("corrupt.onnx",) if _has("onnxruntime") else ()):
        path = tmp_path / name
        path.write_bytes(b"not a model at all")
        with pytest.raises(ValueError, match=f"{name}: cannot load it as a"):
            ExportedNetwork(str(path))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_export_network_refuses_unknown_formats_and_small_samples(predictor, network_inputs):
    from panoptic_segformer.deploy import export_network

    images, padding_mask = network_inputs[0]
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_network(predictor.model, images, padding_mask, "tflite", "x.tflite")
    with pytest.raises(ValueError, match=r"\(64, 160\) px: export with images of at least 96"):
        export_network(
            predictor.model, images[..., :64, :], padding_mask[..., :64, :], "onnx", "x.onnx"
        )


def test_export_tool_names_weights_that_do_not_fit_the_config(tmp_path, tiny_cfg, capsys):
    from detectron2.modeling import build_model

    from deploy_helpers import TINY_DEPLOY

    from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer

    other = tiny_cfg.clone()
    other.defrost()
    other.MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES = 12
    PanopticSegFormerCheckpointer(build_model(other), str(tmp_path)).save("other")
    tool = load_tool()
    status = tool.main(
        [
            "--config-file", str(ROOT / "configs" / "r50.yaml"),
            "--format", "torchscript",
            "--output", str(tmp_path / "out"),
            *TINY_DEPLOY,
            "MODEL.WEIGHTS", str(tmp_path / "other.pth"),
        ]
    )  # fmt: skip
    error = capsys.readouterr().err
    assert status == 2
    assert "MODEL.WEIGHTS does not fit this model" in error and "(checkpoint (12, " in error
    assert not (tmp_path / "out").exists()


def test_export_tool_refuses_an_unknown_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().get_parser().parse_args(
            ["--config-file", "c.yaml", "--format", "tflite", "--output", "o"]
        )
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_export_tool_writes_and_checks_a_file(tmp_path, capsys, photos):
    """The tool as a user runs it: prints the file, its size and the check against PyTorch."""
    from deploy_helpers import TINY_DEPLOY

    status = load_tool().main(
        [
            "--config-file", str(ROOT / "configs" / "r50.yaml"),
            "--format", "torchscript",
            "--output", str(tmp_path),
            *TINY_DEPLOY,
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"wrote {tmp_path / 'r50.ts'}: " in out and " MB, format torchscript, batch 1" in out
    differences = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("  ")]
    assert len(differences) == 6 and max(differences) == 0.0
    assert torch.jit.load(str(tmp_path / "r50.ts")) is not None
