"""Fixtures of the tools' tests: a tool loaded by path (``import tools`` would find detectron2's
own ``tools`` package), a tiny stand-in for ``panoptic_segformer.modeling.complexity.build_core_model``, and a reader of
the tools' markdown tables."""

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tiny_core_model import build_tiny_core_model

from panoptic_segformer.modeling.inference import InferenceOptions

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool(name)``: tools/<name>.py as a fresh module."""
    return _load_tool


def _tiny_core_model(
    backbone: str, inference: InferenceOptions = InferenceOptions()
) -> torch.nn.Module:
    """COCO's 80 + 53 classes (so 300 thing detections can be kept), everything else tiny; a
    ResNet-18 whatever ``backbone`` names."""
    return build_tiny_core_model(num_queries=4, inference=inference)


@pytest.fixture
def tiny_core_model():
    """``tiny_core_model(backbone, inference)``: a stand-in for
    ``panoptic_segformer.modeling.complexity.build_core_model`` that builds in well under a second.
    """
    return _tiny_core_model


def _markdown_table(text: str, first_header: str):
    """Header and rows (lists of cells) of the aligned markdown table (``print_markdown``'s) in
    ``text`` whose first header is given."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if re.match(rf"\| {re.escape(first_header)} ", l))
    assert re.fullmatch(r"\|:-+(\|-+:)+\|", lines[start + 1])
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[0], table[2:]


@pytest.fixture
def markdown_table():
    """``markdown_table(text, first_header)``: the header and rows of a table a tool printed."""
    return _markdown_table
