"""tools/deploy/export_model.py as a user runs it: it writes and checks a file, and names bad
input (an unknown format, weights that do not fit the config)."""

import pytest
from skips import require_detectron2

require_detectron2("the export tool builds the detectron2 model")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    sys.path.insert(0, str(ROOT / "tools" / "deploy"))
    import export_model

    return export_model


def test_export_tool_names_weights_that_do_not_fit_the_config(tmp_path, tiny_cfg, capsys):
    from deploy_helpers import TINY_DEPLOY
    from detectron2.modeling import build_model

    from panoptic_segformer.d2.checkpoint import PanopticSegFormerCheckpointer

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


def test_export_tool_writes_and_checks_a_file(tmp_path, capsys):
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
