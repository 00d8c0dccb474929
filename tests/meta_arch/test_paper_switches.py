"""The paper's ablation switches through train_net.py: each trains 5 iterations on the
generated COCO panoptic sample (tests/coco_panoptic_sample.py) with finite losses, then predicts
and is evaluated (Tables 6, 7, 8, Fig. 5, Sec. 3.3.3). Their effect on the model is tested in
tests/modeling and tests/meta_arch/test_meta_arch.py.
"""

import json
import math
import sys

import pytest
import torch
from skips import require, require_detectron2

require_detectron2()
require("panopticapi", "COCOPanopticEvaluator needs panopticapi installed")

from d2_helpers import (  # noqa: E402
    ROOT,
    make_cfg,
    register_sample,
    train_net_args,
)
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

sys.path.insert(0, str(ROOT))
from panoptic_segformer import PanopticSegFormerCheckpointer  # noqa: E402
from panoptic_segformer.d2.data import PanopticSegFormerDatasetMapper  # noqa: E402
from panoptic_segformer.d2.engine import train as train_net

DATASET = "psf_test_switches_sample"
PS = "MODEL.PANOPTIC_SEGFORMER."
MASK_DECODER_CLASSES = [
    PS + "TEST.THING_CLASSES_FROM",
    "mask_decoder",
    PS + "THING_CLASS_WEIGHT",
    "2.0",
]
SWITCHES = {
    "Table 6, 0 location decoder layers": [PS + "DEC_LAYERS", "0", *MASK_DECODER_CLASSES],
    "Table 6, 1 location decoder layer": [PS + "DEC_LAYERS", "1"],
    "Table 8, joint matching": [PS + "JOINT_MATCHING", "True"],
    "Fig. 5, without deep supervision": [PS + "DEEP_SUPERVISION", "False"],
    "Sec. 3.3.3, thing classes from the mask decoder": MASK_DECODER_CLASSES,
    "Table 7, plain pixel-wise argmax (p)": [PS + "TEST.MERGE", "pixel_argmax"],
}  # fmt: skip
# (Table 6's 2 layers is TINY's DEC_LAYERS, trained by tests/engine/test_train_net.py)


def run_args(output_dir, *opts):
    return train_net_args(
        output_dir,
        DATASET,
        "SOLVER.MAX_ITER", "5",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "200",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "200",
        "TEST.EVAL_PERIOD", "0",
        *opts,
    )  # fmt: skip


@pytest.mark.parametrize("switch", SWITCHES)
def test_switch_trains_and_predicts(switch, tmp_path, coco_panoptic_sample):
    register_sample(DATASET, coco_panoptic_sample, coco_panoptic_sample / "images")
    args = run_args(tmp_path, *SWITCHES[switch])
    results = train_net.main(args)  # raises on a non-finite loss (check_losses_finite)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    logged = [m for m in metrics if "total_loss" in m]
    assert logged[-1]["iteration"] == 4
    assert all(math.isfinite(m["total_loss"]) for m in logged)
    panoptic = results["panoptic_seg"]
    assert all(math.isfinite(panoptic[k]) for k in ("PQ", "SQ", "RQ"))
    # the trained model predicts segments on a sample image once its thresholds let it
    cfg = make_cfg(
        args.config_file,
        *args.opts,
        PS + "TEST.THING_SCORE_THRESHOLD", "0.0",
        PS + "TEST.STUFF_SCORE_THRESHOLD", "0.0",
        PS + "TEST.PIXEL_SCORE_THRESHOLD", "0.0",
        PS + "TEST.MASK_THRESHOLD", "0.0",
    )  # fmt: skip
    model = build_model(cfg).eval()
    PanopticSegFormerCheckpointer(model).load(str(tmp_path / "model_final.pth"))
    record = DatasetCatalog.get(DATASET)[0]
    with torch.no_grad():
        (output,) = model([PanopticSegFormerDatasetMapper(cfg, False)(record)])
    seg, segments = output["panoptic_seg"]
    assert seg.shape == (record["height"], record["width"]) and segments
    assert sorted(torch.unique(seg[seg > 0]).tolist()) == sorted(s["id"] for s in segments)
