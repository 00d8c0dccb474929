"""tools/analyze_model.py without detectron2: --params-only (Table 1's four models) and its
argument checks. With a config (detectron2): tests/tools/test_paper_tools.py."""

import json

import pytest


@pytest.fixture
def tool(load_tool, tiny_core_model, monkeypatch):
    module = load_tool("analyze_model")
    monkeypatch.setattr(module, "build_core_model", tiny_core_model)
    return module


def test_params_only_table(tool, tiny_core_model, monkeypatch, capsys, tmp_path, markdown_table):
    def build(name, **inference_kwargs):
        if name == "needs_timm":
            raise ImportError("no timm here")
        return tiny_core_model(name, **inference_kwargs)

    monkeypatch.setattr(tool, "build_core_model", build)
    table1 = {"resnet50": {"params": 51.0, "gflops": 214.0}, "needs_timm": {"params": 1.0}}
    monkeypatch.setattr(tool, "PAPER_TABLE1", table1)
    out = tmp_path / "params.json"
    result = tool.main(["--params-only", "--output", str(out)])
    text = capsys.readouterr().out

    assert "note: needs_timm skipped: no timm here" in text and "GFLOPs" not in text
    assert json.loads(out.read_text()) == result
    (row,) = result["parameters"]
    model = tiny_core_model("resnet50")
    expected = tool.parameter_parts(model.backbone, model)
    assert row == {
        "backbone": "resnet50",
        "params_m": {k: v / 1e6 for k, v in expected.items()},
        "paper_params_m": 51.0,
    }
    header, rows = markdown_table(text, "model")
    assert header == ["model", *tool.PARTS, "total", "paper", "difference"]
    params = row["params_m"]
    difference = f"{100 * (params['total'] - 51.0) / 51.0:+.1f} %"
    assert rows == [
        ["resnet50", *(f"{params[k]:.2f}" for k in [*tool.PARTS, "total"]), "51.0", difference]
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "one of the arguments --config-file --params-only is required"),
        (
            ["--params-only", "--config-file", "configs/r50.yaml"],
            "argument --config-file: not allowed with argument --params-only",
        ),
        (["--params-only", "--size", "64", "96"], "--params-only takes no --size, --num-inputs"),
        (["--params-only", "MODEL.DEVICE", "cpu"], "--params-only takes no --size, --num-inputs"),
    ],
)
def test_bad_arguments_are_named(tool, capsys, argv, message):
    with pytest.raises(SystemExit):
        tool.main(argv)
    assert message in capsys.readouterr().err
