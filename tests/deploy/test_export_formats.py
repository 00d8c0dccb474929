"""The tiny core model (plain PyTorch, no detectron2) exported to each format gives the eager
model's outputs on two real photos at two sizes (exported at the first, run at both)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deploy_helpers import FORMATS, TOLERANCE
from skips import require

from panoptic_segformer.deploy import OUTPUT_NAMES, max_abs_differences

ROOT = Path(__file__).resolve().parents[2]


def eager_outputs(model, images, padding_mask):
    with torch.no_grad():
        return model(images, padding_mask)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_outputs_equal_eager_at_two_sizes(fmt, core_network, core_model, core_inputs):
    network = core_network(fmt)
    exported_size, other_size = core_inputs
    assert [tuple(x.shape[-2:]) for x, _ in core_inputs] == [(96, 160), (96, 192)]
    assert bool(other_size[1].any())  # the second photo is padded: the mask matters
    for images, padding_mask in [exported_size] if fmt == "torchscript" else core_inputs:
        expected = eager_outputs(core_model, images, padding_mask)
        differences = max_abs_differences(expected, network(images, padding_mask))
        assert set(differences) == set(OUTPUT_NAMES)
        assert max(differences.values()) <= TOLERANCE, differences
    if fmt == "torchscript":  # a trace takes its export size only, and says so
        with pytest.raises(ValueError, match="exported at, 96 x 160, got 96 x 192; export an"):
            network(*other_size)


def test_torch_export_runs_a_batch_of_two_sizes_padded(core_network, core_model, core_inputs):
    """Exported with a dynamic batch: the two photos padded into one batch (each with its
    padding mask) give the eager batch's outputs."""
    network = core_network("torch_export")
    assert network.metadata["batch"] is None
    (first, first_mask), (second, second_mask) = core_inputs
    # the first photo (96 x 160) padded to the second's 96 x 192
    images = torch.cat([F.pad(first, (0, 32)), second])
    padding_mask = torch.cat([F.pad(first_mask, (0, 32), value=True), second_mask])
    expected = eager_outputs(core_model, images, padding_mask)
    differences = max_abs_differences(expected, network(images, padding_mask))
    assert expected["thing_masks"].shape[0] == 2
    assert max(differences.values()) <= TOLERANCE, differences


def test_exported_files_carry_names_batch_and_size(core_network):
    traced = core_network("torchscript").metadata
    assert traced["output_names"] == list(OUTPUT_NAMES)
    assert traced["batch"] == 1 and traced["fixed_size"] == [96, 160]
    assert traced["size_divisibility"] == 32
    assert traced["config"] == "" and traced["class_info"] is None  # a core model has neither
    program = core_network("torch_export").metadata
    assert program["batch"] is None and program["fixed_size"] is None


def test_onnx_file_is_opset_18_with_grid_sample(core_exported):
    onnx = require("onnx", "ONNX needs the deploy extra (onnx)")
    model = onnx.load(str(core_exported("onnx")))
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


def test_exporting_and_running_import_no_detectron2(tmp_path):
    """In a process where detectron2 cannot be imported (as in CI), the deploy package imports
    and offers exporting and running; only the detectron2 layer's predictor asks for it."""
    script = (
        "import sys\n"
        "sys.modules['detectron2'] = None  # importing it now raises ImportError\n"
        "import panoptic_segformer.deploy as deploy\n"
        "from panoptic_segformer.deploy import ExportedNetwork, export_network\n"
        "assert not hasattr(deploy, 'ExportedPredictor')\n"
        "try:\n"
        "    from panoptic_segformer.d2 import ExportedPredictor\n"
        "except ImportError as e:\n"
        "    print('imported without', e.name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("imported without detectron2")  # the predictor asked for it
