"""The authors' optimiser as detectron2 builds it from ``SOLVER.*``.

AdamW at ``BASE_LR`` with ``WEIGHT_DECAY`` on every parameter (mmdet's default, which the
authors used); ``BASE_LR x BACKBONE_MULTIPLIER`` for the backbone and for every parameter whose
name contains one of ``LR_MULTIPLIER_KEYS`` (the deformable attention's sampling offsets and the
reference points). ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE: "full_model"`` clips the norm
of all gradients together (max-norm 0.1 in the authors' code); "value" and "norm" keep
detectron2's per-parameter meaning.
"""

from typing import Any, Dict, List, Type

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

__all__ = ["build_optimizer", "parameter_groups"]

OPTIMIZERS = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def parameter_groups(
    model: nn.Module, base_lr: float, weight_decay: float, multiplier: float, keys: List[str]
) -> List[Dict[str, Any]]:
    """Trainable parameters in two groups: ``base_lr``, and ``base_lr * multiplier`` for the
    backbone (names starting with ``backbone.``) and names containing any of ``keys``."""
    groups: Dict[bool, List[nn.Parameter]] = {False: [], True: []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        slow = name.startswith("backbone.") or any(key in name for key in keys)
        groups[slow].append(param)
    return [
        {
            "params": params,
            "lr": base_lr * (multiplier if slow else 1.0),
            "weight_decay": weight_decay,
        }
        for slow, params in groups.items()
        if params
    ]


def _with_full_model_clipping(
    optimizer_type: Type[torch.optim.Optimizer], max_norm: float, norm_type: float
):
    class FullModelClipping(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipping.__name__ = f"{optimizer_type.__name__}WithFullModelClipping"
    return FullModelClipping


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser of ``SOLVER.*`` (see module).

    Raises:
        ValueError: for an unknown ``SOLVER.OPTIMIZER`` or ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE``.
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    groups = parameter_groups(
        model,
        cfg.SOLVER.BASE_LR,
        cfg.SOLVER.WEIGHT_DECAY,
        cfg.SOLVER.BACKBONE_MULTIPLIER,
        list(cfg.SOLVER.LR_MULTIPLIER_KEYS),
    )
    optimizer_type = OPTIMIZERS[name]
    kwargs = {"momentum": cfg.SOLVER.MOMENTUM} if name == "SGD" else {}
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_type = _with_full_model_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)
        return optimizer_type(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
    if clip.ENABLED and clip.CLIP_TYPE not in ("value", "norm"):
        raise ValueError(
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model', 'value' or 'norm', got "
            f"{clip.CLIP_TYPE!r}"
        )
    return maybe_add_gradient_clipping(cfg, optimizer_type)(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
