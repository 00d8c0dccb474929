"""Activation checkpointing of a layer, as the encoder and the mask decoder switch it on."""

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(layer: nn.Module, *args: Any, checkpointing: bool = False) -> Any:
    """``layer(*args)``; with ``checkpointing``, in training with gradients, through
    ``torch.utils.checkpoint`` (non-reentrant): autograd keeps the layer's inputs only and the
    backward pass runs the layer again, with the random state of the first run (the same
    dropout), so the outputs and gradients are those of ``layer(*args)``."""
    if checkpointing and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
