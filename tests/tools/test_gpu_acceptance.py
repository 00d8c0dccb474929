"""tools/gpu_acceptance.py: its dry run reaches every part, parts keep their time budgets, and
the parts that can run on a CPU (the CPU kernel benchmark, training with AMP switched off) give
the numbers the table shows."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skips import require_detectron2

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("gpu_acceptance")


def context(tool, tmp_path, gpus=1, detectron2=None):
    return tool.Context(output=tmp_path, gpus=gpus, detectron2=detectron2, dry_run=False)


def test_dry_run_reaches_every_part(tmp_path, tool):
    # the command line, as on the GPU machine
    command = [sys.executable, str(TOOL), "--dry-run", "--output", str(tmp_path)]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    names = [row["part"] for row in report["parts"]]
    assert names == ["environment", *(part.name for part in tool.PARTS)]
    assert report["dry_run"] and report["parts"][0]["status"] == "pass"
    for row in report["parts"][1:]:
        if not torch.cuda.is_available():
            assert row["status"] == "skipped: no GPU", row
        else:
            assert row["status"] == "dry run" or row["status"].startswith("skipped: "), row
        assert row["command"] and row["seconds"] == 0.0
    for name in names:  # the printed table has a row per part
        assert f"| {name} | " in process.stdout


def test_parts_keep_their_budget_and_report_failures(tmp_path, tool, monkeypatch):
    def part(code, budget=60):
        return tool.Part("probe", budget, lambda c: [sys.executable, "-c", code], lambda c, o: o)

    here = context(tool, tmp_path)
    row = tool.run_part(part("print('the numbers')"), here)
    assert row["status"] == "pass" and row["numbers"].strip() == "the numbers"
    row = tool.run_part(part("import sys; print('broken'); sys.exit(3)"), here)
    assert row["status"] == "fail: exit status 3" and "broken" in row["output_tail"]
    row = tool.run_part(part("import time; time.sleep(30)", budget=1), here)
    assert row["status"] == "fail: over its budget of 1 s" and row["seconds"] < 20
    unreadable = tool.Part(
        "probe", 60, lambda c: [sys.executable, "-c", "pass"], lambda c, o: {}[1]
    )
    assert tool.run_part(unreadable, here)["status"].startswith("fail: results unreadable")
    # skipped parts say why
    gpu_part = tool.PARTS[0]
    assert tool.run_part(gpu_part, context(tool, tmp_path, gpus=0))["status"] == "skipped: no GPU"
    two_gpu = next(p for p in tool.PARTS if p.needs_gpus == 2)
    assert tool.skip_reason(two_gpu, here) == "2 GPUs needed, 1 visible"
    amp = next(p for p in tool.PARTS if p.needs_detectron2)
    assert tool.skip_reason(amp, context(tool, tmp_path, detectron2="no detectron2")) == (
        "no detectron2"
    )
    # the exit status is 1 when a part fails (here on a pretended GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "pretended GPU")
    monkeypatch.setattr(tool, "PARTS", [part("print('ok')")])
    assert tool.main(["--output", str(tmp_path / "ok")]) == 0
    monkeypatch.setattr(tool, "PARTS", [part("print('ok')"), part("raise SystemExit(2)")])
    assert tool.main(["--output", str(tmp_path / "failed")]) == 1
    report = json.loads((tmp_path / "failed" / "gpu_acceptance.json").read_text())
    assert [r["status"] for r in report["parts"]] == ["pass", "pass", "fail: exit status 2"]
    assert "pretended GPU" in report["parts"][0]["numbers"]


def test_one_gpu_budgets_add_up_to_under_eight_minutes(tool):
    one_gpu = [part.budget_s for part in tool.PARTS if part.needs_gpus == 1]
    assert len(one_gpu) == len(tool.PARTS) - 1 and sum(one_gpu) <= 8 * 60 - 15


def test_msda_cpu_part_gives_its_numbers_here(tmp_path, tool, monkeypatch):
    part = next(p for p in tool.PARTS if p.name == "msda cpu")
    # one repetition at a quarter of the size, and a bigger budget on this 2-core machine than
    # on the GPU machine's CPU
    monkeypatch.setattr(tool, "MSDA_CPU_REPS", "--warmup 0 --reps 1 --size 200x333")
    row = tool.run_part(dataclasses.replace(part, budget_s=400), context(tool, tmp_path))
    assert row["status"] == "pass", row.get("output_tail")
    assert row["numbers"].startswith("encoder b1: float32 fwd ")
    assert row["numbers"].endswith("x pytorch)")


def test_made_dataset_is_consistent_coco_panoptic(tmp_path, tool):
    root = tool.make_panoptic_dataset(tmp_path, num_images=4)
    coco = root / "coco"
    data = json.loads((coco / "annotations" / "panoptic_train2017.json").read_text())
    assert len(data["images"]) == len(data["annotations"]) == 4
    categories = {c["id"]: c["isthing"] for c in data["categories"]}
    for image, annotation in zip(data["images"], data["annotations"]):
        pixels = np.asarray(Image.open(coco / "train2017" / image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3)
        png = Image.open(coco / "panoptic_train2017" / annotation["file_name"])
        rgb = np.asarray(png).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        infos = annotation["segments_info"]
        assert set(np.unique(ids)) == {info["id"] for info in infos}  # no void, no stray id
        for info in infos:
            ys, xs = (ids == info["id"]).nonzero()
            assert info["area"] == len(ys)
            assert info["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        kinds = {categories[info["category_id"]] for info in infos}
        assert kinds == {0, 1}  # stuff and things in every image


def test_training_part_runs_train_net_on_the_made_images(tmp_path, tool, monkeypatch):
    require_detectron2("the training part needs detectron2")
    missing = tool.detectron2_missing()
    if missing:
        pytest.skip(missing)
    # the "amp training" part's command on the CPU: AMP off (detectron2's AMP trainer needs
    # CUDA), a small model, 5 iterations
    on_cpu = [
        "MODEL.DEVICE", "cpu",
        "SOLVER.AMP.ENABLED", "False",
        "SOLVER.MAX_ITER", "5",
        "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "64",
        "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1",
        "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(160,)",
        "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.CROP.ENABLED", "False",
    ]  # fmt: skip
    opts = tool._training_opts
    monkeypatch.setattr(tool, "_training_opts", lambda c, gpus: opts(c, gpus) + on_cpu)
    part = next(p for p in tool.PARTS if p.name == "amp training")
    row = tool.run_part(dataclasses.replace(part, budget_s=400), context(tool, tmp_path))
    assert row["status"] == "pass", row.get("output_tail")
    assert row["numbers"].startswith("5 iterations, total loss ")
    assert "(finite)" in row["numbers"] and row["numbers"].endswith(" s/iter")
    assert (tmp_path / "train_1gpu" / "model_final.pth").is_file()
