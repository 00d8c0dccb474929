"""tools/benchmark_peers.py against a stand-in for Mask2Former's repository: each model in its own
process, the in-memory patch of the missing compiled op, the per-image table and its ratios, and
the training step's table, ratios and breakdown by stage."""

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
TRAIN = ["--train", "--size", "64", "--max-size", "96", "--reps", "1", "--warmup", "0"]

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
                if self.training:  # the masks as its own mapper gives them: a bool tensor
                    masks = [x["instances"].gt_masks for x in batched_inputs]
                    assert all(m.dtype == torch.bool and m.any() for m in masks)
                    return {"loss_mask": self.conv(image).mean()}
                return [{"panoptic_seg": (self.conv(image)[0, 0].int(), [])}]

        class COCOPanopticNewBaselineDatasetMapper:  # the same outputs, read the same way
            def __init__(self, is_train, *, tfm_gens, image_format):
                self.tfm_gens, self.image_format = tfm_gens, image_format

            def __call__(self, dataset_dict):
                import numpy as np
                from detectron2.data import detection_utils as utils
                from detectron2.data import transforms as T
                from detectron2.structures import Instances
                from panopticapi.utils import rgb2id

                image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
                image, transforms = T.apply_transform_gens(self.tfm_gens, image)
                png = utils.read_image(dataset_dict["pan_seg_file_name"], "RGB")
                ids = rgb2id(transforms.apply_segmentation(png))
                kept = [s for s in dataset_dict["segments_info"] if not s["iscrowd"]]
                instances = Instances(image.shape[:2])
                instances.gt_classes = torch.tensor([s["category_id"] for s in kept])
                instances.gt_masks = torch.from_numpy(np.stack([ids == s["id"] for s in kept]))
                tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
                return {"image": tensor, "instances": instances}
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
    assert re.search(r"^bar: time ratio <= 0.7: (met|NOT met)$", result.stdout, re.M)
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


def test_times_a_training_step_of_both_models(tmp_path, coco_panoptic_sample):
    folder = stand_in(tmp_path / "Mask2Former")
    result = run(
        "--mask2former", folder, "--sample", coco_panoptic_sample, *TRAIN, "--breakdown",
        "--threads", "1", "--json", tmp_path / "train.json", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "train.json").read_text())
    ours, theirs = saved["Panoptic SegFormer"], saved["Mask2Former"]
    # the two sample images (427x640, 360x640) at short side 64, long side at most 96
    assert ours["sizes"] == theirs["sizes"] == [[64, 96], [54, 96]]
    assert "on 2 images (64x96, 54x96)" in result.stdout
    seconds = re.search(
        r"^\| s / step \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \|$", result.stdout, re.M
    )
    assert seconds.groups() == (
        f"{ours['ms'] / 1e3:.1f}",
        f"{theirs['ms'] / 1e3:.1f}",
        f"{ours['ms'] / theirs['ms']:.2f}",
    )
    memory = re.search(
        r"^\| peak memory .* \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \|$", result.stdout, re.M
    )
    assert memory.group(3) == f"{ours['peak_gib'] / theirs['peak_gib']:.2f}"
    assert saved["ratios"] == {
        "time": ours["ms"] / theirs["ms"],
        "memory": ours["peak_gib"] / theirs["peak_gib"],
    }
    assert re.search(r"^bar: time ratio <= 0.7: (met|NOT met)$", result.stdout, re.M)
    assert re.search(r"^bar: memory ratio <= 0.8: (met|NOT met)$", result.stdout, re.M)

    # our step by stage: every stage in running order, then backward and the optimizer
    rows = {r["stage"]: r for r in ours["breakdown"]["rows"]}
    assert list(rows) == [
        "other", "backbone", "neck", "positions + flatten", "encoder", "location decoder",
        "matching (filter) + gather", "thing mask decoder, between layers", "thing mask layer 1",
        "thing mask tail", "thing class heads", "stuff mask decoder, between layers",
        "stuff mask layer 1", "stuff mask tail", "stuff class heads", "losses",
        "matching (mask decoder)", "backward", "optimizer step",
    ]  # fmt: skip
    for stage in ("backbone", "encoder", "location decoder", "thing mask layer 1"):
        assert rows[stage]["held_mib"] > 0 and rows[stage]["peak_mib"] > 0, stage
    # matching runs without gradients; the backward pass and the optimizer save nothing
    for stage in ("matching (mask decoder)", "backward", "optimizer step"):
        assert rows[stage]["held_mib"] == 0, stage
    assert rows["backward"]["ms"] > 0
    held = ours["breakdown"]["held"]
    assert sum(h["mib"] for h in held) == pytest.approx(sum(r["held_mib"] for r in rows.values()))
    assert rows["encoder"]["backward_ms"] > 0
    encoder = rows["encoder"]
    assert f"| encoder | {encoder['ms']:.0f} | {encoder['backward_ms']:.0f} | " in result.stdout


def test_training_arguments_name_the_problem(tmp_path):
    no_sample = run("--mask2former", tmp_path, "--train", "--sample", tmp_path)
    assert (
        no_sample.returncode == 2 and f"--sample {tmp_path}: no panoptic.json" in no_sample.stderr
    )
    alone = run("--mask2former", tmp_path, "--breakdown")
    assert alone.returncode == 2 and "add --train" in alone.stderr
    small = run("--mask2former", tmp_path, "--train", "--size", "0")
    assert small.returncode == 2 and "--size and --max-size must be >= 1" in small.stderr
