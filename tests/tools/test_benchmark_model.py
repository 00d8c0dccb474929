"""tools/benchmark_model.py on a tiny model: the tables' rows and columns, and the FLOP handles."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from panoptic_segformer.modeling.backbone import ResNetBackbone
from panoptic_segformer.modeling.inference import InferenceOptions
from panoptic_segformer.modeling.panoptic_segformer import build_panoptic_segformer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark_model.py"
STAGES = ["backbone", "neck + encoder", "location decoder", "mask decoder"]


@pytest.fixture
def tool():
    spec = importlib.util.spec_from_file_location("benchmark_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(name: str, inference: InferenceOptions = InferenceOptions()):
    """COCO's 80 + 53 classes (so 300 thing detections can be kept), everything else tiny."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18)
    return build_panoptic_segformer(
        backbone,
        backbone.out_channels,
        d_model=32,
        n_heads=4,
        n_points=2,
        d_ffn=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_queries=4,
        num_thing_mask_layers=1,
        num_stuff_mask_layers=1,
        with_criterion=False,
        inference=inference,
    ).eval()


def markdown_table(text: str, first_header: str):
    """Header and rows (lists of cells) of the markdown table whose first header is given."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if re.match(rf"\| {re.escape(first_header)} ", l))
    assert re.fullmatch(r"\|:-+(\|-+:)+\|", lines[start + 1])
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[0], table[2:]


@pytest.mark.parametrize("hide_fvcore", [False, True])
def test_full_run_tables(tool, monkeypatch, capsys, tmp_path, hide_fvcore):
    monkeypatch.setattr(tool, "build_model", tiny_model)
    if hide_fvcore:
        monkeypatch.setitem(sys.modules, "fvcore.nn", None)  # its import now raises ImportError
    out_json = tmp_path / "results.json"
    argv = ["--height", "64", "--width", "96", "--reps", "1", "--warmup", "0", "--threads", "1"]
    results = tool.main(argv + ["--json", str(out_json)])
    text = capsys.readouterr().out

    header, rows = markdown_table(text, "model")
    assert header == ["model", *STAGES, "total", "paper", "difference"]
    assert [r[0] for r in rows] == ["resnet50"]
    row = results["parameters"][0]
    assert sum(row[s] for s in STAGES) == pytest.approx(row["total"])  # the parts cover all
    assert rows[0][1:6] == [f"{row[k]:.2f}" for k in [*STAGES, "total"]]
    # frozen BN affine weights counted as parameters
    model = tiny_model("resnet50")
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    expected = sum(p.numel() for p in model.parameters()) + sum(
        2 * m.weight.numel() for m in frozen
    )
    assert frozen and row["total"] == pytest.approx(expected / 1e6, rel=1e-9)
    assert rows[0][6] == "51.0" and rows[0][7].endswith("%")

    header, rows = markdown_table(text, "stage")
    assert header == [
        "stage",
        "GFLOPs",
        "ms (153 masks)",
        "% (153 masks)",
        "ms (353 masks)",
        "% (353 masks)",
    ]
    assert [r[0] for r in rows] == [*STAGES, "post-processing", "total"]
    for column in (3, 5):
        assert sum(float(r[column]) for r in rows[:-1]) == pytest.approx(100, abs=0.3)
        assert float(rows[-1][column]) == 100.0
    fvcore_missing = hide_fvcore or importlib.util.find_spec("fvcore") is None
    assert (results["flops"] is None) == fvcore_missing
    if fvcore_missing:
        assert "fvcore is not installed" in text and {r[1] for r in rows} == {"-"}
    else:
        gflops = results["flops"]["stages"]
        assert set(gflops) == set(STAGES) and all(g > 0 for g in gflops.values())
        assert sum(gflops.values()) == pytest.approx(results["flops"]["total"])
        assert [r[1] for r in rows] == [f"{gflops[s]:.1f}" for s in STAGES] + [
            "-",
            f"{results['flops']['total']:.1f}",
        ]
        assert "not counted" in text
    assert "post-processing of 353 queries (300 things + 53 stuff) at 64x96" in text
    saved = json.loads(out_json.read_text())
    assert set(saved) == {"parameters", "flops", "timing", "peak_memory_gib", "autocast"}
    assert saved["autocast"] is None and "warm-up; float32;" in text
    assert set(saved["timing"]) == {"100", "300"}
    assert set(saved["timing"]["300"]) == {*STAGES, "post-processing"}


def test_autocast_runs_the_model_in_half_precision(tool, monkeypatch, capsys):
    dtypes, kept = [], []

    def build(name, inference):
        model = tiny_model(name, inference)
        head = model.location_decoder.class_heads[-1]
        head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        things = model.mask_decoder.things
        things.register_forward_hook(lambda module, args, out: kept.append(args[0].shape[1]))
        return model

    monkeypatch.setattr(tool, "build_model", build)
    argv = ["--height", "64", "--width", "96", "--reps", "1", "--warmup", "0", "--threads", "1"]
    results = tool.main(argv + ["--autocast", "bfloat16"])
    text = capsys.readouterr().out
    # the FLOP count runs in float32; every timed forward in bfloat16
    assert dtypes[-2:] == [torch.bfloat16, torch.bfloat16]
    # the 153- and 353-mask columns time 100 and 300 thing queries
    assert kept[-2:] == [100, 300]
    assert results["autocast"] == "bfloat16" and "autocast to bfloat16;" in text
    _, rows = markdown_table(text, "stage")
    assert [r[0] for r in rows] == [*STAGES, "post-processing", "total"]


def test_params_only_skips_what_cannot_be_built(tool, monkeypatch, capsys):
    def build(name, inference):
        if name == "needs_timm":
            raise ImportError("no timm here")
        return tiny_model(name, inference)

    monkeypatch.setattr(tool, "build_model", build)
    monkeypatch.setattr(tool, "PAPER_PARAMS", {"resnet50": 51.0, "needs_timm": 1.0})
    results = tool.main(["--params-only"])
    text = capsys.readouterr().out
    assert "note: needs_timm skipped: no timm here" in text
    _, rows = markdown_table(text, "model")
    assert [r[0] for r in rows] == ["resnet50"]
    assert "stage" not in text and "timing" not in results


def test_preparations_table_times_each_preparation_on_the_same_weights(tool, monkeypatch, capsys):
    built = []

    def build(name, inference=InferenceOptions()):
        built.append(tiny_model(name, inference))
        return built[-1]

    monkeypatch.setattr(tool, "build_model", build)
    argv = ["--height", "64", "--width", "96", "--reps", "1", "--warmup", "0", "--threads", "1"]
    results = tool.main(argv + ["--preparations"])
    text = capsys.readouterr().out
    header, rows = markdown_table(text, "preparation")
    assert header == ["preparation", "start-up s", "ms", "vs as built"]
    names = ["as built", "batch norms folded", "channels-last weights"]
    assert [r[0] for r in rows] == [*names, "both (prepare_for_inference)"]  # no compile
    assert rows[0][3] == "1.00" and list(results["preparations"]) == [r[0] for r in rows]
    # the models the rows timed: one of each, built anew with the same weights
    as_built, folded, channels_last, both = built[1:]  # built[0]: the parameter table's
    is_bn = lambda m: isinstance(m, FrozenBatchNorm2d)  # noqa: E731
    assert any(map(is_bn, as_built.modules())) and any(map(is_bn, channels_last.modules()))
    assert not any(map(is_bn, folded.modules())) and not any(map(is_bn, both.modules()))
    cl = torch.channels_last
    assert channels_last.backbone.conv1.weight.is_contiguous(memory_format=cl)
    assert not folded.backbone.conv1.weight.is_contiguous(memory_format=cl)
    assert both.prepared_for_inference and not as_built.prepared_for_inference
    torch.testing.assert_close(as_built.encoder.state_dict(), both.encoder.state_dict())


class _Ops(nn.Module):
    def forward(self, x, grid, q, k, v):
        sampled = F.grid_sample(x, grid, align_corners=False)
        return sampled, F.scaled_dot_product_attention(q, k, v)


def test_flop_handles(tool):
    fvcore_nn = pytest.importorskip("fvcore.nn")
    x, grid = torch.randn(1, 2, 5, 5), torch.rand(1, 3, 4, 2)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 6)
    analysis = fvcore_nn.FlopCountAnalysis(_Ops(), (x, grid, q, k, v))
    analysis.set_op_handle(**tool.FLOP_HANDLES).unsupported_ops_warnings(False)
    by_operator = analysis.by_operator()
    assert by_operator["grid_sampler"] == 4 * 1 * 2 * 3 * 4  # N * C * out_points * 4
    assert by_operator["scaled_dot_product_attention"] == 2 * 3 * 5 * (8 + 6)
