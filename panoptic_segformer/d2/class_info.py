"""The class names, thing/stuff split and colours that travel with a model.

detectron2 keeps them in ``MetadataCatalog``, filled when a dataset is registered; a process
that never registered the training dataset (the demo, drawing a model trained on a dataset
registered inside a training script) has empty metadata there, and detectron2's ``Visualizer``
fails deep inside with ``AttributeError: ... metadata is empty``. So checkpoints saved by
``train_net.py`` and every exported file carry a *class info* dict (JSON-safe: lists, strings,
numbers), and predictors draw from it when the dataset is not registered.
"""

from typing import Dict, Optional

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata

__all__ = ["CLASS_INFO_KEY", "class_info_of", "class_info_of_config", "drawing_metadata"]

# key of the class info in a checkpoint dict and in an exported file's metadata
CLASS_INFO_KEY = "class_info"
# the metadata fields saved; the id maps are saved as [dataset id, contiguous id] pairs
_LISTS = ("thing_classes", "stuff_classes", "thing_colors", "stuff_colors")
_MAPS = ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id")


def class_info_of(metadata: Metadata) -> Optional[Dict[str, object]]:
    """The class info of a dataset's metadata, or None when it has no class names.

    Returns:
        dict with ``dataset`` (its name) and those of ``thing_classes``, ``stuff_classes``,
        ``thing_colors``, ``stuff_colors``, ``thing_dataset_id_to_contiguous_id`` and
        ``stuff_dataset_id_to_contiguous_id`` it has (the maps as lists of pairs).
    """
    if not hasattr(metadata, "thing_classes"):
        return None
    info: Dict[str, object] = {"dataset": metadata.name}
    for key in _LISTS:
        if hasattr(metadata, key):
            info[key] = [list(v) if isinstance(v, (tuple, list)) else v for v in metadata.get(key)]
    for key in _MAPS:
        if hasattr(metadata, key):
            info[key] = [[int(k), int(v)] for k, v in metadata.get(key).items()]
    return info


def class_info_of_config(cfg) -> Optional[Dict[str, object]]:
    """The class info of the config's first training dataset (else its first test dataset)."""
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    return class_info_of(MetadataCatalog.get(names[0])) if names else None


def drawing_metadata(dataset: Optional[str], class_info: Optional[Dict[str, object]]) -> Metadata:
    """The metadata to draw a model's predictions with: the registered dataset's when it has
    class names, else one built from the model's ``class_info``.

    Args:
        dataset: the config's dataset name (``DATASETS.TEST[0]``), or None.
        class_info: what the model carries (:func:`class_info_of`), or None.

    Raises:
        ValueError: neither has class names; the message names the dataset and the fix.
    """
    name = dataset or "__unregistered"
    if dataset and hasattr(MetadataCatalog.get(dataset), "thing_classes"):
        return MetadataCatalog.get(dataset)
    if class_info is None:
        raise ValueError(
            f"dataset {name!r} is not registered in this process and the model carries no class "
            "names: register the dataset before drawing (as the training script did), or use a "
            "checkpoint saved by this version's train_net.py or a file of tools/deploy/"
            "export_model.py (both carry the class names)"
        )
    # a Metadata object of its own, not MetadataCatalog's entry: nothing global is changed
    fields = {k: class_info[k] for k in _LISTS if k in class_info}
    fields.update({k: {a: b for a, b in class_info[k]} for k in _MAPS if k in class_info})
    return Metadata(name=str(class_info.get("dataset", name)), **fields)
