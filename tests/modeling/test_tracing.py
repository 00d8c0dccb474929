"""The whole inference network traces as one graph (torch.compile, torch.export)."""

import pytest
from skips import require
import torch

from test_panoptic_segformer import synthetic_batch, tiny_model

dynamo = require("torch._dynamo", "torch.compile's tracer is missing")


def test_inference_is_one_graph_without_breaks():
    # a graph break (e.g. reading a tensor's values on the host) would split compilation and
    # make torch.export fail
    torch.manual_seed(0)
    model = tiny_model().eval()
    images, padding, _ = synthetic_batch()
    with torch.no_grad():
        explained = dynamo.explain(model)(images, padding)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons
