"""tools/benchmark_peers.py against a stand-in for Mask2Former's repository: each model in its own
process, the in-memory patch of the missing compiled op, the per-image table and its ratios."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from skips import require, require_detectron2

require_detectron2("both predictors are detectron2 predictors")
cv2 = require("cv2", "the benchmark reads its images with OpenCV")

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "benchmark_peers.py"
# our model, tiny (ResNet-18, one layer per stack) at a short side of 64
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32",
    "MODEL.PANOPTIC_SEGFORMER.NHEADS", "4",
    "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "10",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "1",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
]  # fmt: skip

# Mask2Former's layout: its package raises at import without the compiled op, as the real one
STAND_IN = {
    "mask2former/__init__.py": """
        try:
            import MultiScaleDeformableAttention  # noqa: F401
        except ModuleNotFoundError:
            raise ModuleNotFoundError("Please compile MultiScaleDeformableAttention CUDA op")
        import torch
        from detectron2.config import CfgNode
        from detectron2.modeling import META_ARCH_REGISTRY

        def add_maskformer2_config(cfg):
            cfg.MODEL.MASK_FORMER = CfgNode()
            cfg.MODEL.MASK_FORMER.TEST = CfgNode()
            cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
            cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
            cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True

        @META_ARCH_REGISTRY.register()
        class StandInMaskFormer(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()
                test = cfg.MODEL.MASK_FORMER.TEST
                assert (test.PANOPTIC_ON, test.INSTANCE_ON, test.SEMANTIC_ON) == (1, 0, 0)
                self.conv = torch.nn.Conv2d(3, 1, 3)

            def forward(self, batched_inputs):
                image = batched_inputs[0]["image"].float()[None]
                return [{"panoptic_seg": (self.conv(image)[0, 0].int(), [])}]
    """,
    "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml": """
        MODEL:
          META_ARCHITECTURE: "StandInMaskFormer"
        INPUT:
          MIN_SIZE_TEST: 64
          MAX_SIZE_TEST: 96
    """,
}


def stand_in(folder: Path) -> Path:
    for name, text in STAND_IN.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_times_both_models_per_image_and_prints_the_ratio(tmp_path):
    images = []
    for i, (h, w) in enumerate([(60, 90), (90, 60)]):
        images.append(tmp_path / f"photo{i}.jpg")
        rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(images[-1]), rgb)
    folder = stand_in(tmp_path / "Mask2Former")
    result = run(
        "--mask2former", folder, "--images", *images, "--reps", "1", "--warmup", "0",
        "--threads", "1", "--json", tmp_path / "rows.json", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(
        r"^\| (\S+) \| (\S*) ?\| (\d+) \| (\d+) \| \**([\d.]+)\** \|$", result.stdout, re.M
    )
    assert [r[:2] for r in rows] == [("photo0.jpg", "64x96"), ("photo1.jpg", "96x64"), ("all", "")]
    saved = json.loads((tmp_path / "rows.json").read_text())["rows"]
    for row, (_, _, ours, theirs, ratio) in zip(saved, rows):
        assert (int(ours), int(theirs)) == (round(row["ours_ms"]), round(row["mask2former_ms"]))
        assert ratio == f"{row['ours_ms'] / row['mask2former_ms']:.2f}"
    total = sum(r["ours_ms"] for r in saved) / sum(r["mask2former_ms"] for r in saved)
    assert rows[2][4] == f"{total:.2f}"
    assert re.search(r"^bar: ratio <= 0.7: (met|NOT met)$", result.stdout, re.M)
    assert re.search(
        r"peak memory .*Panoptic SegFormer [\d.]+ GiB, Mask2Former [\d.]+ GiB", result.stdout
    )


def test_bad_arguments_name_the_problem(tmp_path):
    missing = run("--mask2former", tmp_path, "--images", tmp_path / "none.jpg")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    (tmp_path / "a.jpg").write_bytes(b"")
    not_a_clone = run("--mask2former", tmp_path, "--images", tmp_path / "a.jpg")
    assert not_a_clone.returncode == 2
    assert f"--mask2former {tmp_path}: no configs/coco" in not_a_clone.stderr
    odd = run("--mask2former", tmp_path, "MODEL.WEIGHTS")
    assert odd.returncode == 2 and "KEY VALUE pairs" in odd.stderr
