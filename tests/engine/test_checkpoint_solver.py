"""MODEL.WEIGHTS loading never leaves a silently random model nor runs code from the file; the
authors' optimiser."""

import pickle
import re

import numpy as np
import pytest
from skips import require_detectron2

require_detectron2()

import torch  # noqa: E402
from d2_helpers import CONFIGS, INSTANCES, TINY, make_cfg  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from panoptic_segformer import PanopticSegFormerCheckpointer  # noqa: E402
from panoptic_segformer.d2.solver import build_optimizer  # noqa: E402

BASE = CONFIGS[0].parent / "r50.yaml"


def tiny(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(make_cfg(BASE, *TINY, *INSTANCES, *opts))


def predict(model):
    model.eval()
    image = torch.randint(
        0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"].scores


def test_full_checkpoint_round_trip(tmp_path):
    trained = tiny(seed=1)
    PanopticSegFormerCheckpointer(trained, str(tmp_path)).save("model")
    fresh = tiny(seed=2)
    assert not torch.equal(predict(fresh), predict(trained))
    PanopticSegFormerCheckpointer(fresh).load(str(tmp_path / "model.pth"))
    assert torch.equal(predict(fresh), predict(trained))


def test_a_checkpoint_of_an_earlier_release_loads_its_core_from_model_keys(tmp_path, caplog):
    # earlier releases named the meta-architecture's model core "model": model.encoder...
    trained = tiny(seed=1)
    old = {
        ("model." + k[len("core.") :] if k.startswith("core.") else k): v
        for k, v in trained.state_dict().items()
    }
    assert any(k.startswith("model.encoder.") for k in old)
    torch.save({"model": old}, tmp_path / "old.pth")
    fresh = tiny(seed=2)
    assert not torch.equal(predict(fresh), predict(trained))
    PanopticSegFormerCheckpointer(fresh).load(str(tmp_path / "old.pth"))
    assert torch.equal(predict(fresh), predict(trained))
    assert "loading them as 'core.'" in caplog.text


def test_missing_and_mismatched_weights_raise(tmp_path):
    model = tiny()
    state = {k: v for k, v in model.state_dict().items() if "location_decoder" not in k}
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"model weights are missing: core\.location_decoder"):
        PanopticSegFormerCheckpointer(tiny()).load(str(tmp_path / "partial.pth"))
    # another number of queries: the query embeddings do not fit
    torch.save({"model": model.state_dict()}, tmp_path / "full.pth")
    other = tiny("MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "30")
    with pytest.raises(RuntimeError, match=r"have other shapes: .*\(checkpoint \(20, "):
        PanopticSegFormerCheckpointer(other).load(str(tmp_path / "full.pth"))
    with pytest.raises(AssertionError, match="not found"):
        PanopticSegFormerCheckpointer(tiny()).load(str(tmp_path / "absent.pth"))


def test_backbone_checkpoint_must_cover_the_backbone(tmp_path):
    model = tiny()
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    fresh = tiny(seed=3)
    PanopticSegFormerCheckpointer(fresh).load(str(tmp_path / "backbone.pth"))  # the rest: init
    assert torch.equal(fresh.backbone.res4[0].conv1.weight, model.backbone.res4[0].conv1.weight)
    del backbone["backbone.res5.1.conv2.weight"]
    torch.save({"model": backbone}, tmp_path / "backbone_partial.pth")
    with pytest.raises(RuntimeError, match=r"1 backbone weights are missing: backbone\.res5\.1"):
        PanopticSegFormerCheckpointer(tiny()).load(str(tmp_path / "backbone_partial.pth"))


def test_optimizer_groups_and_full_model_clipping():
    cfg = make_cfg(BASE, *TINY)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer).__name__ == "AdamWWithFullModelClipping"
    slow = {
        id(p)
        for g in optimizer.param_groups
        if g["lr"] == pytest.approx(1.4e-5)
        for p in g["params"]
    }
    fast = {
        id(p)
        for g in optimizer.param_groups
        if g["lr"] == pytest.approx(1.4e-4)
        for p in g["params"]
    }
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i].split(".")[0] for i in slow} == {"backbone", "core"}
    assert all(
        n.startswith("backbone.") or "sampling_offsets" in n or "reference_points" in n
        for n in (names[i] for i in slow)
    )
    assert any("sampling_offsets" in names[i] for i in slow)
    assert not any(names[i].startswith("backbone.") for i in fast)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.startswith("backbone.stem") or n.startswith("backbone.res2") for n in frozen
    )
    assert len(slow) + len(fast) == sum(p.requires_grad for p in model.parameters())
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4}
    # the norm of ALL gradients together is clipped to 0.1 before the step
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total.item() == pytest.approx(0.1, rel=1e-3)  # unclipped: about 1e4


def test_bad_solver_settings_raise():
    model = tiny()
    with pytest.raises(
        ValueError, match=r"SOLVER.OPTIMIZER must be one of \['ADAMW', 'SGD'\], got 'LAMB'"
    ):
        build_optimizer(make_cfg(BASE, *TINY, "SOLVER.OPTIMIZER", "LAMB"), model)
    with pytest.raises(
        ValueError, match="CLIP_TYPE must be 'full_model', 'value' or 'norm', got 'x'"
    ):
        build_optimizer(make_cfg(BASE, *TINY, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "x"), model)


def write_imagenet_weights(path, weights, protocol=None):
    """``weights`` (backbone names -> numpy arrays) as ``.pkl`` in the format of
    detectron2://ImageNetPretrained/torchvision/R-50.pkl, or as pycls' ``.pyth``."""
    if path.suffix == ".pyth":
        torch.save({"model_state": {k: torch.from_numpy(v) for k, v in weights.items()}}, path)
    else:
        payload = {"model": weights, "__author__": "torchvision", "matching_heuristics": True}
        path.write_bytes(pickle.dumps(payload, protocol=protocol))


# protocol 2: the highest Python 2 wrote
@pytest.mark.parametrize(
    "name, protocol", [("R-18.pkl", 2), ("R-18.pkl", pickle.HIGHEST_PROTOCOL), ("R-18.pyth", None)]
)
def test_imagenet_weights_are_matched_by_name_heuristics(tmp_path, name, protocol):
    # numpy arrays (tensors in .pyth) under the backbone's own names, matched onto the model by
    # detectron2's heuristics
    source = tiny(seed=4)
    weights = {
        k[len("backbone.") :]: v.numpy()
        for k, v in source.state_dict().items()
        if k.startswith("backbone.")
    }
    weights["fc.weight"] = torch.zeros(1000, 512).numpy()  # an ImageNet classifier: unused
    write_imagenet_weights(tmp_path / name, weights, protocol)
    model = tiny(seed=5)
    PanopticSegFormerCheckpointer(model).load(str(tmp_path / name))
    assert torch.equal(model.backbone.res5[1].conv2.weight, source.backbone.res5[1].conv2.weight)
    del weights["res5.1.conv2.weight"]
    write_imagenet_weights(tmp_path / f"partial-{name}", weights, protocol)
    with pytest.raises(
        RuntimeError, match=r"backbone weights are missing: backbone\.res5\.1\.conv2"
    ):
        PanopticSegFormerCheckpointer(tiny()).load(str(tmp_path / f"partial-{name}"))


LEGACY = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.mark.parametrize(
    "name, payload",
    [
        ("zoo.pkl", {"model": {"a.weight": LEGACY}, "__author__": "Detectron2 Model Zoo"}),
        ("caffe2.pkl", {"blobs": {"res2_0_branch2a_w": LEGACY, "conv1_w_momentum": LEGACY}}),
        ("msra.pkl", {"res2_0_branch2a_w": LEGACY, "conv1_w": LEGACY, "conv1_w_momentum": LEGACY}),
        ("pycls.pyth", {"model_state": {"a.weight": torch.ones(2), "bn.num_batches_tracked": 3}}),
    ],
)
def test_every_format_reads_as_detectron2_reads_it(tmp_path, name, payload):
    path = str(tmp_path / name)
    if name.endswith(".pkl"):
        (tmp_path / name).write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    model = torch.nn.Linear(2, 2)  # reading the file does not look at the model
    ours = PanopticSegFormerCheckpointer(model)._load_file(path)
    theirs = DetectionCheckpointer(model)._load_file(path)
    assert ours.keys() == theirs.keys() and ours["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():
        assert type(ours["model"][key]) is type(value)
        np.testing.assert_array_equal(ours["model"][key], value)
    assert {k: v for k, v in ours.items() if k != "model"} == {
        k: v for k, v in theirs.items() if k != "model"
    }


@pytest.mark.parametrize("name", ["R-50.pkl", "model.pth", "RegNetY-4.0GF.pyth"])
def test_weights_that_would_run_code_are_refused_naming_the_file(crafted_weights, name):
    path = str(crafted_weights.write(name))
    model = torch.nn.Linear(2, 2)  # the file is refused before the model is looked at
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load '{re.escape(path)}'"):
        PanopticSegFormerCheckpointer(model).load(path)
    assert not crafted_weights.marker.exists()
