"""Loading ``MODEL.WEIGHTS`` without ever leaving the model silently random.

detectron2's ``DetectionCheckpointer`` loads what matches and only logs what does not, so a
wrong file gives a model that runs and predicts noise. This checkpointer raises instead:

* a full Panoptic SegFormer checkpoint (it holds weights beyond the backbone) must cover every
  parameter and buffer of the model, with the right shapes;
* a backbone checkpoint (ImageNet pretraining, e.g.
  ``detectron2://ImageNetPretrained/torchvision/R-50.pkl``) must cover every backbone weight;
  the rest of the model starts from its initialisation, as in training from scratch.

Keys the model does not use (e.g. an ImageNet classifier) are logged by detectron2 as usual.
"""

from typing import Any, Dict, List

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["PanopticSegFormerCheckpointer"]

_BACKBONE_PREFIX = "backbone."
_SHOWN = 10  # keys listed in an error


def _listed(keys: List[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


class PanopticSegFormerCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that raises on missing or mismatched weights (see module)."""

    def _load_model(self, checkpoint: Dict[str, Any]):
        # the parent pops checkpoint["model"]; detectron2's name-matching heuristics (for
        # ImageNet .pkl files) can only map a checkpoint onto backbone names
        full_model = any(not key.startswith(_BACKBONE_PREFIX) for key in checkpoint["model"])
        full_model = full_model and not checkpoint.get("matching_heuristics", False)
        incompatible = super()._load_model(checkpoint)
        missing = list(incompatible.missing_keys)
        if not full_model:
            missing = [key for key in missing if key.startswith(_BACKBONE_PREFIX)]
        shapes = [
            f"{key} (checkpoint {tuple(theirs)}, model {tuple(ours)})"
            for key, theirs, ours in incompatible.incorrect_shapes
        ]
        if missing or shapes:
            kind = "model" if full_model else "backbone"
            problems = []
            if missing:
                problems.append(f"{len(missing)} {kind} weights are missing: {_listed(missing)}")
            if shapes:
                problems.append(f"{len(shapes)} have other shapes: {_listed(shapes)}")
            raise RuntimeError(
                f"MODEL.WEIGHTS does not fit this model ({self._describe()}): "
                + "; ".join(problems)
                + ". Check that the config matches the checkpoint (backbone, number of classes "
                "and queries)."
            )
        return incompatible

    def _describe(self) -> str:
        return f"{type(self.model).__name__} with {sum(1 for _ in self.model.state_dict())} entries"
