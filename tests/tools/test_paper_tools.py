"""tools/analyze_model.py and tools/ablate_inference.py on tiny inputs."""

import json

import pytest
from skips import require, require_detectron2

require_detectron2()
require("fvcore", "FLOPs are counted with fvcore")

import torch  # noqa: E402
from d2_helpers import (  # noqa: E402
    CONFIGS,
    PERMISSIVE_SCORES,
    TINY,
    make_cfg,
    register_sample,
)
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from panoptic_segformer.d2.data import register_subset  # noqa: E402
from panoptic_segformer.modeling import MaskWiseOptions, PixelArgmaxOptions  # noqa: E402

R50 = str(CONFIGS[0].parent / "r50.yaml")
DATASET = "psf_test_tools_sample"


@pytest.fixture(scope="module")
def sample_dataset(coco_panoptic_sample):
    """The generated COCO panoptic sample (tests/coco_panoptic_sample.py)."""
    return register_sample(DATASET, coco_panoptic_sample, coco_panoptic_sample / "images")


def test_analyze_model_at_a_size(load_tool, tmp_path, capsys):
    tool = load_tool("analyze_model")
    out = tmp_path / "analysis.json"
    result = tool.main(["--config-file", R50, "--size", "64", "96", "--output", str(out), *TINY])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    params, gflops = result["params_m"], result["gflops"]
    parts = ["backbone", "neck + encoder", "location decoder", "mask decoder"]
    assert params["total"] == pytest.approx(sum(params[p] for p in parts))
    assert gflops["total"] == pytest.approx(sum(gflops[p] for p in parts))
    assert all(gflops[p] > 0 for p in parts) and result["input_sizes"] == [[64, 96]]
    # the tiny ResNet-18 has no Table 1 row; the R50 config does
    assert result["paper_table1"] == {"backbone": None}
    assert tool.paper_key(__import__("d2_helpers").make_cfg(R50)) == "resnet50"
    # fvcore has no handle for element-wise ops such as the additions; they are listed, not counted
    assert "aten::add" in result["not_counted"]
    text = capsys.readouterr().out
    assert f"| total            | {params['total']:10.2f} | {gflops['total']:6.1f} |" in text
    assert "not counted (fvcore has no handle; mostly element-wise): aten::" in text


def test_flops_grow_with_the_input(load_tool, tmp_path):
    tool = load_tool("analyze_model")
    small = tool.main(["--config-file", R50, "--size", "64", "96", "--output", str(tmp_path / "a")])
    large = tool.main(
        ["--config-file", R50, "--size", "128", "192", "--output", str(tmp_path / "b")]
    )
    # the convolutional backbone's FLOPs scale with the pixels
    assert large["gflops"]["backbone"] == pytest.approx(4 * small["gflops"]["backbone"], rel=0.02)
    assert large["paper_table1"] == {"backbone": "resnet50", "params": 51.0, "gflops": 214.0}


def test_analyze_model_over_dataset_images(load_tool, tmp_path, sample_dataset):
    tool = load_tool("analyze_model")
    opts = [*TINY, "DATASETS.TEST", f"('{sample_dataset}',)", "INPUT.MIN_SIZE_TEST", "96"]
    result = tool.main(
        ["--config-file", R50, "--num-inputs", "2", "--output", str(tmp_path / "a"), *opts]
    )
    assert result["inputs"] == 2
    assert sorted(result["input_sizes"]) == [
        [96, 144],
        [96, 171],
    ]  # the test-time resize (640x427, 640x360)


def test_ablate_inference_table(load_tool, tmp_path, sample_dataset, capsys):
    tool = load_tool("ablate_inference")
    opts = [*TINY, "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "200",
            "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "2",
            "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "2"]  # fmt: skip
    result = tool.main(
        ["--config-file", R50, "--dataset", sample_dataset, "--num-images", "1",
         "--variants", "mask_wise,pixel_argmax,pixel_argmax_class_weighted,exit_1,exit_3,"
                       "mask_decoder_classes",
         "--output", str(tmp_path), *opts]
    )  # fmt: skip
    rows = result["variants"]
    # exit_3 > 2 layers, and mask-decoder classes with an untrained class head: skipped
    assert list(rows) == ["mask_wise", "pixel_argmax", "pixel_argmax_class_weighted", "exit_1"]
    assert tool.METRICS[-3:] == ("BPQ", "BPQ_th", "BPQ_st")  # Boundary PQ: Table 7's right half
    for row in rows.values():
        assert set(row) == {*tool.METRICS, "images_per_second"} and row["images_per_second"] > 0
        assert all(isinstance(row[m], float) and 0 <= row[m] <= 100 for m in tool.METRICS)
        # min(IoU, boundary IoU) <= IoU per pair: Boundary PQ never exceeds PQ
        assert all(row["B" + m] <= row[m] + 1e-9 for m in ("PQ", "PQ_th", "PQ_st"))
    assert "| BPQ | BPQ_th | BPQ_st | images/s |" in capsys.readouterr().out
    assert result["dataset"] == f"{sample_dataset}_first1"
    assert (
        json.loads((tmp_path / "ablate_inference.json").read_text())["variants"].keys()
        == rows.keys()
    )
    with pytest.raises(SystemExit, match=r"unknown variants \['exit_9'\]"):
        tool.main(["--config-file", R50, "--variants", "exit_9", *TINY])


def test_ablate_inference_variants_switch_a_built_model_as_the_config_would(load_tool):
    tool = load_tool("ablate_inference")
    test = "MODEL.PANOPTIC_SEGFORMER.TEST."
    opts = [*TINY, *PERMISSIVE_SCORES, test + "MASK_DECODER_LAYERS", "1"]
    cfg = make_cfg(R50, *opts, test + "PIXEL_SCORE_THRESHOLD", "0.0")
    # Table 7's "(p)" row is the variant named pixel_argmax; "(p*)" says so in its name
    plain = tool.variant_options(cfg, tool.VARIANTS["pixel_argmax"])
    assert plain.merge == PixelArgmaxOptions(score_threshold=0.0, class_weighted=False)
    weighted = tool.variant_options(cfg, tool.VARIANTS["pixel_argmax_class_weighted"])
    assert weighted.merge == PixelArgmaxOptions(score_threshold=0.0, class_weighted=True)
    assert plain.mask_decoder_layers is None  # every variant but exit_k runs all layers
    mask_wise = tool.variant_options(cfg, tool.VARIANTS["exit_1"])
    assert mask_wise.mask_decoder_layers == 1
    assert mask_wise.merge == MaskWiseOptions(
        thing_score_threshold=0.0,
        stuff_score_threshold=0.0,
        thing_overlap_threshold=1.0,
        stuff_overlap_threshold=1.0,
    )
    # a model switched to a variant predicts exactly as one built with the variant's config
    image = torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(0))
    switches = [item for pair in tool.VARIANTS["pixel_argmax"].items() for item in pair]

    def predict(config, options=None):
        torch.manual_seed(0)
        model = build_model(config).eval()
        if options is not None:
            model.core.set_inference(options)
        with torch.no_grad():
            (out,) = model([{"image": image.to(torch.uint8)}])
        return out["panoptic_seg"]

    built_seg, built_info = predict(
        make_cfg(R50, *opts, test + "PIXEL_SCORE_THRESHOLD", "0.0", *switches)
    )
    switched_seg, switched_info = predict(cfg, plain)
    default_seg, _ = predict(cfg)
    assert len(built_info) >= 2 and built_info == switched_info
    assert torch.equal(built_seg, switched_seg) and not torch.equal(default_seg, switched_seg)


def test_subset_has_its_own_json(tmp_path, sample_dataset):
    name = register_subset(sample_dataset, 1, str(tmp_path))
    (first,) = DatasetCatalog.get(name)
    assert first == DatasetCatalog.get(sample_dataset)[0]
    subset = json.loads((tmp_path / f"{name}_panoptic.json").read_text())
    assert [im["id"] for im in subset["images"]] == [first["image_id"]]
    assert [a["image_id"] for a in subset["annotations"]] == [first["image_id"]]
    with pytest.raises(ValueError, match="num_images must be positive, got 0"):
        register_subset(sample_dataset, 0, str(tmp_path))


@pytest.mark.parametrize(
    "tool", ["analyze_model", "ablate_inference", "eval_robustness", "convert_official_checkpoint"]
)
def test_every_tool_has_help(load_tool, tool, capsys):
    module = load_tool(tool)
    with pytest.raises(SystemExit) as done:
        if hasattr(module, "get_parser"):
            module.get_parser().parse_args(["--help"])
        else:
            module.parse_args(["--help"])
    assert done.value.code == 0
    assert "--config-file" in capsys.readouterr().out


def test_analyze_model_rejects_a_bad_size(load_tool, capsys):
    tool = load_tool("analyze_model")
    with pytest.raises(SystemExit):
        tool.main(["--config-file", R50, "--size", "0", "96"])
    assert "--size must be positive, got 0 96" in capsys.readouterr().err
