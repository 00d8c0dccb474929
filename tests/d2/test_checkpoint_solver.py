"""MODEL.WEIGHTS loading never leaves a silently random model; the authors' optimiser."""

import pytest

pytest.importorskip("detectron2", reason="the detectron2 layer needs detectron2 installed")

import torch  # noqa: E402
from d2_helpers import CONFIGS, TINY, make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from panoptic_segformer import PanopticSegFormerCheckpointer  # noqa: E402
from panoptic_segformer.solver import build_optimizer  # noqa: E402

BASE = CONFIGS[0].parent / "r50.yaml"


def tiny(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(make_cfg(BASE, *TINY, *opts))


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


def test_missing_and_mismatched_weights_raise(tmp_path):
    model = tiny()
    state = {k: v for k, v in model.state_dict().items() if "location_decoder" not in k}
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"model weights are missing: model\.location_decoder"):
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
    assert {names[i].split(".")[0] for i in slow} == {"backbone", "model"}
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


def test_imagenet_pkl_is_matched_by_name_heuristics(tmp_path):
    # the format of detectron2://ImageNetPretrained/torchvision/R-50.pkl: numpy arrays under the
    # backbone's own names, matched onto the model by detectron2's heuristics
    import pickle

    source = tiny(seed=4)
    weights = {
        k[len("backbone.") :]: v.numpy()
        for k, v in source.state_dict().items()
        if k.startswith("backbone.")
    }
    weights["fc.weight"] = torch.zeros(1000, 512).numpy()  # an ImageNet classifier: unused
    payload = {"model": weights, "__author__": "torchvision", "matching_heuristics": True}
    (tmp_path / "R-18.pkl").write_bytes(pickle.dumps(payload))
    model = tiny(seed=5)
    PanopticSegFormerCheckpointer(model).load(str(tmp_path / "R-18.pkl"))
    assert torch.equal(model.backbone.res5[1].conv2.weight, source.backbone.res5[1].conv2.weight)
    del weights["res5.1.conv2.weight"]
    (tmp_path / "R-18-partial.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(
        RuntimeError, match=r"backbone weights are missing: backbone\.res5\.1\.conv2"
    ):
        PanopticSegFormerCheckpointer(tiny()).load(str(tmp_path / "R-18-partial.pkl"))
