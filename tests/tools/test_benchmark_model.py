"""tools/benchmark_model.py on a tiny model: the stage and preparation tables' rows and columns,
and the models each preparation times."""

import json

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

STAGES = ["backbone", "neck + encoder", "location decoder", "mask decoder"]
TINY_RUN = ["--height", "64", "--width", "96", "--reps", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture
def tool(load_tool, tiny_core_model, monkeypatch):
    module = load_tool("benchmark_model")
    monkeypatch.setattr(module, "build_core_model", tiny_core_model)
    return module


def test_full_run_tables(tool, capsys, tmp_path, markdown_table):
    out_json = tmp_path / "results.json"
    results = tool.main(TINY_RUN + ["--json", str(out_json)])
    text = capsys.readouterr().out

    assert "Parameters" not in text and "GFLOPs" not in text  # tools/analyze_model.py's
    header, rows = markdown_table(text, "stage")
    assert header == ["stage", "ms (153 masks)", "% (153 masks)", "ms (353 masks)", "% (353 masks)"]
    assert [r[0] for r in rows] == [*STAGES, "post-processing", "total"]
    for kept, ms_column in ((100, 1), (300, 3)):
        timing = results["timing"][kept]
        assert [r[ms_column] for r in rows[:-1]] == [f"{timing[s]:.0f}" for s in timing]
        assert rows[-1][ms_column] == f"{sum(timing.values()):.0f}"
        assert sum(float(r[ms_column + 1]) for r in rows[:-1]) == pytest.approx(100, abs=0.3)
        assert float(rows[-1][ms_column + 1]) == 100.0
    assert "post-processing of 353 queries (300 things + 53 stuff) at 64x96" in text
    saved = json.loads(out_json.read_text())
    assert set(saved) == {"timing", "peak_memory_gib", "autocast"}
    assert saved["autocast"] is None and "warm-up; float32;" in text
    assert set(saved["timing"]) == {"100", "300"}
    assert set(saved["timing"]["300"]) == {*STAGES, "post-processing"}


def test_autocast_runs_the_model_in_half_precision(tool, tiny_core_model, monkeypatch, capsys):
    dtypes, kept = [], []

    def build(name, **inference_kwargs):
        model = tiny_core_model(name, **inference_kwargs)
        head = model.location_decoder.class_heads[-1]
        head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        things = model.mask_decoder.things
        things.register_forward_hook(lambda module, args, out: kept.append(args[0].shape[1]))
        return model

    monkeypatch.setattr(tool, "build_core_model", build)
    results = tool.main(TINY_RUN + ["--autocast", "bfloat16"])
    text = capsys.readouterr().out
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # one timed forward per kept count
    assert kept[-2:] == [100, 300]  # the 153- and 353-mask columns
    assert results["autocast"] == "bfloat16" and "autocast to bfloat16;" in text


def test_an_unbuildable_backbone_is_a_clear_error(tool, monkeypatch, capsys):
    def build(name, **inference_kwargs):
        raise ImportError(f"{name} needs timm")

    monkeypatch.setattr(tool, "build_core_model", build)
    with pytest.raises(SystemExit):
        tool.main(TINY_RUN + ["--backbone", "swin_large"])
    assert "swin_large needs timm" in capsys.readouterr().err


def test_preparations_table_times_each_preparation_on_the_same_weights(
    tool, monkeypatch, capsys, markdown_table
):
    timed = {}

    def recording(name, prepare):
        def run(model):
            timed[name] = prepare(model)
            return timed[name]

        return run

    preparations = {name: recording(name, p) for name, p in tool.PREPARATIONS.items()}
    monkeypatch.setattr(tool, "PREPARATIONS", preparations)
    results = tool.main(TINY_RUN + ["--preparations"])
    text = capsys.readouterr().out
    header, rows = markdown_table(text, "preparation")
    assert header == ["preparation", "start-up s", "ms", "vs as built"]
    names = ["as built", "batch norms folded", "channels-last weights"]
    assert [r[0] for r in rows] == [*names, "both (prepare_for_inference)"]  # no compile
    assert rows[0][3] == "1.00" and list(results["preparations"]) == [r[0] for r in rows]
    # the models the rows timed: one of each, each its own copy of the same weights
    as_built, folded, channels_last, both = (timed[r[0]] for r in rows)
    assert len({id(as_built), id(folded), id(channels_last), id(both)}) == 4
    is_bn = lambda m: isinstance(m, FrozenBatchNorm2d)  # noqa: E731
    assert any(map(is_bn, as_built.modules())) and any(map(is_bn, channels_last.modules()))
    assert not any(map(is_bn, folded.modules())) and not any(map(is_bn, both.modules()))
    cl = torch.channels_last
    assert channels_last.backbone.conv1.weight.is_contiguous(memory_format=cl)
    assert not folded.backbone.conv1.weight.is_contiguous(memory_format=cl)
    assert both.prepared_for_inference and not as_built.prepared_for_inference
    torch.testing.assert_close(as_built.encoder.state_dict(), both.encoder.state_dict())
