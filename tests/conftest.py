"""Fixtures shared by the test folders, and the summary of skips by reason."""

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_panoptic_sample import REAL_SAMPLE, write_coco_panoptic_sample
from skips import require_detectron2

from panoptic_segformer.modeling.inference_preparation import is_frozen_batchnorm


@pytest.fixture(scope="session")
def coco_panoptic_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a small COCO-panoptic dataset the tests write (see
    ``tests/coco_panoptic_sample.py``): ``images/``, ``panoptic/``, ``panoptic.json`` and
    ``instances.json``. Needs detectron2 (its COCO categories) and pycocotools."""
    require_detectron2("the generated COCO panoptic sample needs detectron2")
    return write_coco_panoptic_sample(tmp_path_factory.mktemp("coco_panoptic_sample"))


@pytest.fixture(scope="session")
def real_coco_panoptic_sample() -> Path:
    """The folder of the two real COCO photos (same layout); skips where it is absent."""
    if not (REAL_SAMPLE / "panoptic.json").is_file():
        pytest.skip(f"the real COCO panoptic sample is missing ({REAL_SAMPLE})")
    return REAL_SAMPLE


class _CreatesAFile:
    """Unpickling it calls ``open(path, "w")``: the file appears if a loader runs the pickle's
    code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class CraftedWeights:
    """Writes weight files that create ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.marker = directory / "created by unpickling"

    def write(self, name: str) -> Path:
        """``directory / name`` holding a checkpoint of the usual layout (``.pkl``: ``pickle`` of
        numpy arrays, other names: ``torch.save`` of tensors) with the crafted object after a
        legitimate weight."""
        path = self.directory / name
        pkl = name.endswith(".pkl")
        weights = {
            "conv.weight": np.zeros(2) if pkl else torch.zeros(2),  # what the file may hold
            "conv.bias": _CreatesAFile(self.marker),
        }
        # "model_state": the layout of pycls' .pyth
        checkpoint = {"model": weights, "model_state": weights, "__author__": "crafted"}
        if pkl:
            path.write_bytes(pickle.dumps(checkpoint))
        else:
            torch.save(checkpoint, path)
        return path


@pytest.fixture
def crafted_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CraftedWeights:
    """Crafted weight files in ``tmp_path``; ``torch.load`` without ``weights_only`` runs their
    code, as it does by default before torch 2.6 (the variable forces that default on newer
    torch, and is ignored where ``weights_only`` is passed)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return CraftedWeights(tmp_path)


@torch.no_grad()
def _randomise_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Statistics far from the identity, small variances included (where eps matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if is_frozen_batchnorm(m):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g))
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 1e-3)


@pytest.fixture
def randomise_norms():
    """``randomise_norms(module, seed=0)``: gives every frozen batch norm of ``module`` random
    statistics (folding identity norms would test nothing)."""
    return _randomise_norms


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per skip reason with its count (a module skipped at collection counts once), so
    a run says what it did not test and why: no GPU, no detectron2, ..."""
    reasons: collections.Counter = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skips by reason")
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:4d}  {reason}")
