"""train_net.py end to end on the generated COCO panoptic sample (tests/coco_panoptic_sample.py):
a training iteration through detectron2's trainer, a checkpoint, then inference and
COCOPanopticEvaluator."""

import json
import logging
import math
import pickle
import re
import sys
from collections import Counter

import pytest
import torch
from skips import require, require_detectron2

require_detectron2()
require("panopticapi", "COCOPanopticEvaluator needs panopticapi installed")

from d2_helpers import (  # noqa: E402
    CONFIGS,
    INSTANCES,
    PIXEL_ARGMAX,
    ROOT,
    make_cfg,
    register_sample,
    train_net_args,
    write_own_predictions_as_ground_truth,
)

sys.path.insert(0, str(ROOT))
from panoptic_segformer.d2.engine import train as train_net

DATASET = "psf_test_coco_sample"
OWN = "psf_test_own_predictions"  # the sample with a model's predictions as ground truth


@pytest.fixture(scope="module")
def sample_dataset(coco_panoptic_sample):
    return register_sample(
        DATASET,
        coco_panoptic_sample,
        coco_panoptic_sample / "images",
        instances_json=str(coco_panoptic_sample / "instances.json"),
    )


def args_for(output_dir, *extra, eval_only=False, resume=False):
    return train_net_args(
        output_dir,
        DATASET,
        "MODEL.PANOPTIC_SEGFORMER.TEST.MAX_DETECTIONS", "20",  # fewer full-size masks to resize
        "SEED", "0",
        "SOLVER.MAX_ITER", "1",
        *extra,
        eval_only=eval_only,
        resume=resume,
    )  # fmt: skip


def test_train_then_evaluate(tmp_path, sample_dataset, coco_panoptic_sample):
    # the pixel-wise argmax paints dozens of thing and stuff segments after one iteration; the
    # instance results (off by default) switched on for COCOEvaluator
    results = train_net.main(args_for(tmp_path, *PIXEL_ARGMAX, *INSTANCES))
    assert (tmp_path / "model_final.pth").is_file()
    # the checkpoint carries the dataset's class names (the demo draws from them)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)["class_info"]
    assert saved["dataset"] == DATASET and saved["thing_classes"][0] == "person"
    assert len(saved["stuff_classes"]) == len(saved["stuff_colors"]) > 0
    # the evaluation after the last iteration, on the sample's ground truth (PQ ~0 so soon)
    panoptic = results["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert math.isfinite(panoptic[key]) and 0 <= panoptic[key] <= 100, key
    # COCOEvaluator read the instance masks and boxes (AP is nan where nothing matches)
    assert {"AP", "AP50", "APs"} <= set(results["segm"]) and "AP" in results["bbox"]

    # --eval-only of the trained weights on the sample and on the sample whose ground truth is
    # their own predictions (plus a 4 x 4 person per image), which a correct evaluation scores
    # ~100: category ids, images and PNGs must all be matched up
    weights = str(tmp_path / "model_final.pth")
    own_test = ["MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{DATASET}', '{OWN}')"]
    args = args_for(tmp_path, *PIXEL_ARGMAX, *INSTANCES, *own_test, eval_only=True)
    cfg = make_cfg(args.config_file, *args.opts)
    write_own_predictions_as_ground_truth(cfg, sample_dataset, tmp_path / "own")
    register_sample(OWN, tmp_path / "own", coco_panoptic_sample / "images")
    again = train_net.main(args)

    # the trained weights evaluate the same way with --eval-only
    assert again[DATASET]["panoptic_seg"] == pytest.approx(panoptic)
    assert again[DATASET]["segm"] == pytest.approx(results["segm"], nan_ok=True)
    # and the main process wrote them as JSON (NaN as null)
    written = json.loads((tmp_path / "inference" / "results.json").read_text())
    assert written[DATASET]["panoptic_seg"] == again[DATASET]["panoptic_seg"]
    assert written[OWN] == again[OWN]
    segm = again[DATASET]["segm"]
    nan = [k for k, v in segm.items() if math.isnan(v)]
    assert all(written[DATASET]["segm"][k] is None for k in nan)
    assert {k: v for k, v in written[DATASET]["segm"].items() if k not in nan} == {
        k: v for k, v in segm.items() if k not in nan
    }

    # the evaluator's predictions, turned into COCO's category ids by the dataset's metadata,
    # are the ground truth written from detectron2's own COCO metadata, image by image (the
    # added person is the last segment of each image)
    def segments(annotations):
        return {
            a["image_id"]: [(s["id"], s["category_id"]) for s in a["segments_info"]]
            for a in annotations
        }

    ground_truth = json.loads((tmp_path / "own" / "panoptic.json").read_text())
    predictions = json.loads((tmp_path / "inference" / OWN / "predictions.json").read_text())
    expected = {k: v[:-1] for k, v in segments(ground_truth["annotations"]).items()}
    assert segments(predictions["annotations"]) == expected
    isthing = {c["id"]: c["isthing"] for c in ground_truth["categories"]}
    kinds = Counter(isthing[c] for image in expected.values() for _, c in image)
    assert kinds[True] > 5 and kinds[False] > 5, kinds  # the checks below are not vacuous
    own = again[OWN]["panoptic_seg"]
    # every stuff segment is matched, and only the corner's 16 pixels make an IoU below 1; a
    # swapped category, a mixed-up image or a misread PNG leaves segments unmatched
    assert own["RQ_st"] == 100 and own["PQ_st"] > 99
    # the same for things, but for the added persons: missed (panopticapi's per-category
    # RQ = TP / (TP + FP / 2 + FN / 2): 1 for every other thing category, TP / (TP + 1) for
    # person with its two misses)
    things = Counter(c for image in expected.values() for _, c in image if isthing[c])
    persons = things.pop(1, 0)
    rq_th = 100 * (len(things) + persons / (persons + 1)) / (len(things) + 1)
    assert own["RQ_th"] == pytest.approx(rq_th) and own["PQ_th"] > rq_th - 1


def test_resume_restores_iteration_optimizer_and_scheduler(tmp_path, sample_dataset):
    # no test dataset: the evaluation after the last iteration has nothing to do
    no_test = ["DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "1"]
    trained = train_net.Trainer(
        train_net.setup(args_for(tmp_path, *no_test, "SOLVER.MAX_ITER", "2"))
    )
    trained.resume_or_load(resume=False)
    trained.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    longer = args_for(tmp_path, *no_test, "SOLVER.MAX_ITER", "4", resume=True)
    resumed = train_net.Trainer(train_net.setup(longer))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed.scheduler.state_dict() == trained.scheduler.state_dict()
    assert resumed.scheduler.last_epoch == 2
    theirs, ours = trained.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys() and ours["state"]
    for index, state in theirs["state"].items():
        assert state.keys() == ours["state"][index].keys()
        assert all(torch.equal(ours["state"][index][k], v) for k, v in state.items())
    assert all(float(state["step"]) == 2 for state in ours["state"].values())
    model = resumed.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in trained.model.state_dict().items())


def test_resume_refuses_a_last_checkpoint_that_would_run_code(tmp_path, crafted_weights):
    path = crafted_weights.write("model_0000099.pth")
    (tmp_path / "last_checkpoint").write_text(path.name)
    args = args_for(tmp_path, "MODEL.WEIGHTS", "unused.pth", eval_only=True, resume=True)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load '{re.escape(str(path))}'"):
        train_net.main(args)
    assert not crafted_weights.marker.exists()


def test_eval_only_needs_weights(tmp_path, sample_dataset):
    with pytest.raises(ValueError, match="--eval-only needs trained weights: set MODEL.WEIGHTS"):
        train_net.main(args_for(tmp_path, eval_only=True))


def test_missing_instances_json_is_skipped_with_a_warning(tmp_path, caplog, coco_panoptic_sample):
    name = register_sample(
        "psf_test_no_instances_json",
        coco_panoptic_sample,
        coco_panoptic_sample / "images",
        instances_json=str(tmp_path / "no.json"),
    )
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml", *INSTANCES)
    with caplog.at_level(logging.WARNING, logger="detectron2"):
        evaluators = train_net.Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert [type(e).__name__ for e in evaluators._evaluators] == ["COCOPanopticEvaluator"]
    assert f"the instances json {tmp_path / 'no.json'} does not exist" in caplog.text


def test_boundary_pq_is_added_on_request(tmp_path, sample_dataset):
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml")  # panoptic results only, by default

    def names():
        evaluators = train_net.Trainer.build_evaluator(cfg, sample_dataset, str(tmp_path))
        return [type(e).__name__ for e in evaluators._evaluators]

    assert names() == ["COCOPanopticEvaluator"]  # TEST.BOUNDARY_PQ is off by default
    cfg.TEST.BOUNDARY_PQ = True
    assert names() == ["COCOPanopticEvaluator", "BoundaryPanopticEvaluator"]


def test_amp_on_the_cpu_is_refused_by_name():
    cfg = make_cfg(
        CONFIGS[0].parent / "r50.yaml", "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True"
    )
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match="SOLVER.AMP.ENABLED True needs a CUDA model, but MODEL.DEVICE is 'cpu'"
    ):
        train_net.build_step_trainer(cfg, model, [], optimizer)
    cfg.SOLVER.AMP.ENABLED = False
    assert type(train_net.build_step_trainer(cfg, model, [], optimizer)).__name__ == "SimpleTrainer"


def test_processes_on_one_cpu_share_its_threads(monkeypatch):
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml", "MODEL.DEVICE", "cpu")
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train_net.comm, "get_local_size", lambda: 2)
    try:
        torch.set_num_threads(4)
        train_net.share_cpu_threads(cfg)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is kept
        torch.set_num_threads(3)
        train_net.share_cpu_threads(cfg)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_non_panoptic_datasets_are_refused():
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml")
    with pytest.raises(ValueError, match=r"'coco_2017_val' has evaluator_type 'coco'"):
        train_net.Trainer.build_evaluator(cfg, "coco_2017_val")


def test_training_from_random_weights_is_said():
    r50 = make_cfg(CONFIGS[0].parent / "r50.yaml")
    assert train_net.random_init_warning(r50) is None  # the ImageNet R50 of detectron2
    r50.MODEL.WEIGHTS = ""
    assert "R-50.pkl" in train_net.random_init_warning(r50)
    swin = make_cfg(CONFIGS[0].parent / "swin_l.yaml")
    assert "MODEL.TIMM.PRETRAINED to a local ImageNet checkpoint of swin_large" in (
        train_net.random_init_warning(swin)
    )
    swin.MODEL.TIMM.PRETRAINED = "swin_large_22k.pth"
    assert train_net.random_init_warning(swin) is None
