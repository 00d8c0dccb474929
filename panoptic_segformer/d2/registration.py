"""The one call that makes Panoptic SegFormer known to detectron2: :func:`register`.

Importing a module of the package registers nothing. ``register()`` adds the
``PanopticSegFormer`` meta-architecture (``MODEL.META_ARCHITECTURE``), the ``D2TimmBackbone``
backbone (``MODEL.BACKBONE.NAME``) and the datasets the configs name (ADE20K panoptic, COCO
panoptic test-dev; see :func:`panoptic_segformer.d2.data.register_builtin_datasets`). Call it
once before ``build_model(cfg)`` or reading a dataset; calling it again does nothing.
"""

from typing import Optional

from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY
from detectron2.utils.registry import Registry

__all__ = ["register"]


def register(datasets_root: Optional[str] = None) -> None:
    """Registers the meta-architecture, the backbone and the built-in datasets.

    Args:
        datasets_root: the datasets folder; default ``$DETECTRON2_DATASETS``, else "datasets".

    Raises:
        ValueError: another class already holds the name ``PanopticSegFormer`` or
            ``D2TimmBackbone`` in detectron2's registry.
    """
    from panoptic_segformer.d2.backbone import D2TimmBackbone
    from panoptic_segformer.d2.data.builtin import register_builtin_datasets
    from panoptic_segformer.d2.meta_arch import PanopticSegFormer

    _register(META_ARCH_REGISTRY, PanopticSegFormer)
    _register(BACKBONE_REGISTRY, D2TimmBackbone)
    register_builtin_datasets(datasets_root)


def _register(registry: Registry, cls: type) -> None:
    name = cls.__name__
    if name not in registry:
        registry.register(cls)
        return
    taken = registry.get(name)
    if taken is not cls:
        raise ValueError(
            f"detectron2's {registry._name} registry already has a {name!r} "
            f"({taken.__module__}.{taken.__qualname__}), not Panoptic SegFormer's "
            f"({cls.__module__}.{cls.__qualname__})"
        )
