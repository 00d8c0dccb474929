"""The tiny model exported to each format gives the eager network's outputs and panoptic
results, on two real photos at two sizes (exported at the first, run at both)."""

import pytest

pytest.importorskip("detectron2", reason="exporting the meta-architecture needs detectron2")

import torch  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

FORMATS = ("onnx", "torch_export", "torchscript")
TOLERANCE = 1e-4  # absolute, on every output of the network


def eager_outputs(model, images, padding_mask):
    with torch.no_grad():
        return model.network(ImageList(images, [tuple(images.shape[-2:])]), padding_mask)


def sizes_run(fmt, network_inputs):
    """The inputs a format takes: both sizes, or (TorchScript) only the exported one."""
    return network_inputs[:1] if fmt == "torchscript" else network_inputs


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_outputs_equal_eager_at_two_sizes(fmt, exported, predictor, network_inputs):
    from panoptic_segformer.deploy import ExportedNetwork, max_abs_differences

    network = ExportedNetwork(str(exported(fmt)))
    assert [tuple(x.shape[-2:]) for x, _ in network_inputs] == [(96, 160), (96, 192)]
    for images, padding_mask in sizes_run(fmt, network_inputs):
        expected = eager_outputs(predictor.model, images, padding_mask)
        differences = max_abs_differences(expected, network(images, padding_mask))
        assert set(differences) == {
            "thing_masks",
            "thing_scores",
            "thing_labels",
            "thing_boxes",
            "stuff_masks",
            "stuff_scores",
        }
        assert max(differences.values()) <= TOLERANCE, differences


def test_torch_export_runs_a_batch_of_two_sizes_padded(exported, predictor, network_inputs):
    """Exported with a dynamic batch: two images padded into one batch (each with its padding
    mask) give the eager batch's outputs."""
    from panoptic_segformer.deploy import ExportedNetwork, max_abs_differences

    network = ExportedNetwork(str(exported("torch_export")))
    assert network.metadata["batch"] is None
    images, masks = predictor.model.preprocess_images(
        [torch.full((3, 96, 160), 60.0), torch.full((3, 90, 128), 90.0)]
    )
    batch = images.tensor
    expected = eager_outputs(predictor.model, batch, masks)
    differences = max_abs_differences(expected, network(batch, masks))
    assert batch.shape[0] == 2 and max(differences.values()) <= TOLERANCE, differences


def same_panoptic(expected, actual):
    """Same segments (id, category, isthing) and at least 99.9% of the pixels."""
    (seg_e, info_e), (seg_a, info_a) = expected["panoptic_seg"], actual["panoptic_seg"]
    key = [(s["id"], s["category_id"], s["isthing"]) for s in info_e]
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info_a] == key
    assert seg_e.shape == seg_a.shape
    agree = (seg_e == seg_a).float().mean().item()
    assert agree >= 0.999, agree
    for e, a in zip(info_e, info_a):
        assert abs(e["score"] - a["score"]) <= TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_predictor_gives_the_panoptic_results_of_pytorch(fmt, exported, predictor, photos):
    from panoptic_segformer.deploy import ExportedPredictor

    exported_predictor = ExportedPredictor(str(exported(fmt)))  # the config from the file
    shown = photos[:1] if fmt == "torchscript" else photos
    for photo in shown:
        expected, actual = predictor(photo), exported_predictor(photo)
        assert len(expected["panoptic_seg"][1]) >= 2  # the check compares segments
        assert actual["panoptic_seg"][0].shape == photo.shape[:2]
        same_panoptic(expected, actual)


def test_exported_files_carry_names_size_and_classes(exported, tiny_cfg):
    from panoptic_segformer.deploy import ExportedNetwork

    network = ExportedNetwork(str(exported("torchscript")))
    metadata = network.metadata
    assert metadata["batch"] == 1 and metadata["fixed_size"] == [96, 160]
    assert metadata["size_divisibility"] == 32
    info = metadata["class_info"]
    assert info["dataset"] == tiny_cfg.DATASETS.TRAIN[0]
    # detectron2 names every COCO panoptic category in both lists
    assert len(info["thing_classes"]) == 133 and info["thing_classes"][0] == "person"
    assert len(info["stuff_colors"]) == len(info["stuff_classes"])
    assert "MODEL:" in metadata["config"]


def test_onnx_file_is_opset_18_with_grid_sample(exported):
    onnx = pytest.importorskip("onnx", reason="ONNX needs the deploy extra (onnx)")
    model = onnx.load(str(exported("onnx")))
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == 18
    ops = {node.op_type for node in model.graph.node}
    for function in model.functions:
        ops |= {node.op_type for node in function.node}
    assert "GridSample" in ops
    # the height and width are symbolic: the exported graph takes any multiple of 32
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[2].dim_param and dims[3].dim_param
    assert not any(node.domain.startswith("panoptic") for node in model.graph.node)
