"""panoptic_segformer.modeling.complexity (tools/analyze_model.py's and benchmark_model.py's library): the FLOP handles, the parts' parameters and the markdown tables."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from panoptic_segformer.modeling import complexity
from panoptic_segformer.modeling.inference_preparation import is_frozen_batchnorm


@pytest.fixture
def analysis():
    return complexity


class _Ops(nn.Module):
    def forward(self, x, grid, q, k, v):
        sampled = F.grid_sample(x, grid, align_corners=False)
        return sampled, F.scaled_dot_product_attention(q, k, v)


def test_flop_handles(analysis):
    fvcore_nn = pytest.importorskip("fvcore.nn")
    x, grid = torch.randn(1, 2, 5, 5), torch.rand(1, 3, 4, 2)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 6)
    flops = fvcore_nn.FlopCountAnalysis(_Ops(), (x, grid, q, k, v))
    flops.set_op_handle(**analysis.FLOP_HANDLES).unsupported_ops_warnings(False)
    by_operator = flops.by_operator()
    assert by_operator["grid_sampler"] == 4 * 1 * 2 * 3 * 4  # N * C * out_points * 4
    assert by_operator["scaled_dot_product_attention"] == 2 * 3 * 5 * (8 + 6)


def test_parameter_parts_cover_the_model(analysis, tiny_core_model):
    model = tiny_core_model("resnet50")
    parts = analysis.parameter_parts(model.backbone, model)
    assert list(parts) == [*analysis.PARTS, "total"]
    assert parts["total"] == sum(parts[p] for p in analysis.PARTS)
    # every parameter, and the frozen batch norms' affine weights (buffers) as mmdet counts them
    frozen = [m for m in model.modules() if is_frozen_batchnorm(m)]
    expected = sum(p.numel() for p in model.parameters()) + sum(
        2 * m.weight.numel() for m in frozen
    )
    assert frozen and parts["total"] == expected


def test_print_markdown_aligns_the_columns(analysis, capsys):
    analysis.print_markdown(["name", "value"], [["a", "1.5"], ["longer", "10"]])
    assert capsys.readouterr().out.splitlines() == [
        "| name   | value |",
        "|:-------|------:|",
        "| a      |   1.5 |",
        "| longer |    10 |",
    ]
