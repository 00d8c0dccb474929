"""Loading ``MODEL.WEIGHTS`` without ever leaving the model silently random, and saving
checkpoints that a kill cannot leave half-written.

detectron2's ``DetectionCheckpointer`` loads what matches and only logs what does not, so a
wrong file gives a model that runs and predicts noise. This checkpointer raises instead:

* a full Panoptic SegFormer checkpoint (it holds weights beyond the backbone) must cover every
  parameter and buffer of the model, with the right shapes;
* a backbone checkpoint (ImageNet pretraining, e.g.
  ``detectron2://ImageNetPretrained/torchvision/R-50.pkl``) must cover every backbone weight;
  the rest of the model starts from its initialisation, as in training from scratch.

Keys the model does not use (e.g. an ImageNet classifier) are logged by detectron2 as usual.

fvcore's ``Checkpointer.save`` writes ``torch.save`` straight into ``<name>.pth`` and rewrites
``last_checkpoint`` in place, so a job killed mid-save (preemption, out-of-memory killer, a time
limit) leaves a truncated file under the final name, or an empty ``last_checkpoint`` that
``--resume`` then fails on. Here both are written to ``<file>.tmp`` in the same directory,
flushed to disk and renamed over the final name (``os.replace``, atomic on POSIX): every file
named ``*.pth`` or ``last_checkpoint`` is complete, and ``last_checkpoint`` only ever names a
complete checkpoint. A kill mid-save can leave a ``<name>.pth.tmp``, which the next save of that
name overwrites.

Every file is read as data (:mod:`panoptic_segformer.utils.safe_load`): detectron2 reads ``.pkl``
with ``pickle.load`` and torch files with ``torch.load``'s default, which a crafted file makes run
code (the default does before torch 2.6). A file asking for anything but weights data is refused
with a ``pickle.UnpicklingError`` naming the file.
"""

import os
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from panoptic_segformer.d2.class_info import CLASS_INFO_KEY
from panoptic_segformer.utils.safe_load import load_pickle, load_torch

__all__ = ["PanopticSegFormerCheckpointer"]

_BACKBONE_PREFIX = "backbone."
# the meta-architecture's model core; "model." in checkpoints of earlier releases
_CORE_PREFIX, _OLD_CORE_PREFIX = "core.", "model."
_SHOWN = 10  # keys listed in an error


def _listed(keys: List[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _write_atomically(path: str, mode: str, write: Callable[[Any], None]) -> None:
    """Calls ``write(f)`` on ``path + ".tmp"``, syncs it to disk, then renames it to ``path``;
    on any error the temporary file is removed and ``path`` is left as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # make the rename itself durable (a crash of the machine, not only of the process)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class PanopticSegFormerCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads files as data, raises on missing or mismatched
    weights and saves atomically (see module).

    Args:
        model, save_dir, save_to_disk, checkpointables: as detectron2's.
        class_info: the class names, thing/stuff split and colours of the training dataset
            (:func:`panoptic_segformer.d2.class_info.class_info_of`), saved in every checkpoint
            under ``"class_info"`` so that a process that never registered the dataset can draw
            the model's predictions; None saves none.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        class_info: Optional[Dict[str, Any]] = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.class_info = class_info

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """detectron2's ``_load_file`` (same formats, same result) with every file read as data.

        detectron2 reads ``.pkl`` and ``.pyth`` inline with ``pickle.load`` and ``torch.load``,
        so those two formats are read here; torch files go through the parent (it handles the
        ``?matching_heuristics=True`` suffix) and its ``_torch_load``, overridden below.
        """
        if filename.endswith(".pkl"):
            data = load_pickle(filename)
            if "model" in data and "__author__" in data:  # detectron2's model zoo
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1: detection models nest their weights under "blobs"
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            data = load_torch(filename)
            if "model_state" not in data:
                raise ValueError(
                    f"cannot load .pyth file {filename!r}: pycls checkpoints hold 'model_state', "
                    f"this one {sorted(data)}"
                )
            model = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return load_torch(f)

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``Checkpointer.save`` (same contents, file name and log line), written
        atomically, then ``last_checkpoint`` updated atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.class_info is not None:
            data[CLASS_INFO_KEY] = self.class_info
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a directory")
        self.logger.info(f"Saving checkpoint to {save_file}")
        _write_atomically(save_file, "wb", lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Writes ``last_checkpoint`` (the name of the latest checkpoint) atomically."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(path, "w", lambda f: f.write(last_filename_basename))

    def _load_model(self, checkpoint: Dict[str, Any]):
        checkpoint["model"] = self._renamed_core_keys(checkpoint["model"])
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

    def _renamed_core_keys(self, weights: Dict[str, Any]) -> Dict[str, Any]:
        """Checkpoints written before the meta-architecture's model core was named ``core``
        hold it under ``model.``; those keys load as ``core.`` (with a warning; for one
        release)."""
        ours = self.model.state_dict()
        old = [key for key in weights if key.startswith(_OLD_CORE_PREFIX)]
        takes_old = any(key.startswith(_OLD_CORE_PREFIX) for key in ours)
        if not old or takes_old or not any(key.startswith(_CORE_PREFIX) for key in ours):
            return weights
        self.logger.warning(
            f"the checkpoint names the model core {_OLD_CORE_PREFIX!r} ({len(old)} entries), "
            f"as releases before this one did; loading them as {_CORE_PREFIX!r}: save it again "
            "to update it"
        )

        def renamed(key: str) -> str:
            if key.startswith(_OLD_CORE_PREFIX):
                return _CORE_PREFIX + key[len(_OLD_CORE_PREFIX) :]
            return key

        return {renamed(key): value for key, value in weights.items()}

    def _describe(self) -> str:
        return f"{type(self.model).__name__} with {sum(1 for _ in self.model.state_dict())} entries"
