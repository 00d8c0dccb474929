"""Skipping a test module whose optional dependency is missing, with the reason.

``pytest.importorskip("detectron2")`` is not enough: detectron2's own top-level package imports
nothing, while the submodules the project uses import fvcore, iopath and pycocotools, which an
installation can lack. :func:`require_detectron2` imports those submodules, so a test module
skips with the missing library named instead of failing at collection. detectron2's Visualizer
also needs OpenCV, which the rest of detectron2 does not: modules that draw also
``require("cv2", ...)``.
"""

import importlib

import pytest

# the detectron2 modules the project and its tests import at their top
DETECTRON2_MODULES = (
    "detectron2.checkpoint",
    "detectron2.config",
    "detectron2.data",
    "detectron2.engine",
    "detectron2.evaluation",
    "detectron2.modeling",
)


def require(module: str, reason: str) -> object:
    """Imports and returns ``module``, or skips the calling test module with ``reason`` and the
    import error (which names the missing library)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{reason} ({e})", allow_module_level=True)


def require_detectron2(reason: str = "the detectron2 layer needs detectron2 installed") -> None:
    """Skips the calling test module unless detectron2 and everything it imports import."""
    for module in DETECTRON2_MODULES:
        require(module, reason)
