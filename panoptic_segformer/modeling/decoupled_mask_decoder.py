"""Query-decoupled mask decoder (Sec. 3.4 of the paper): things and stuff in separate stacks.

Thing queries come from the location decoder; stuff queries are learned, one per stuff class
("class-fixed": query k always predicts stuff class k). Each set runs through its own
:class:`MaskDecoder` stack, as in the authors' code: things 4 layers without self-attention,
stuff 6 layers with self-attention, each ending in a tail attention. Every layer gets a class
head: things over the K thing classes, stuff one logit per query (is class k present?).

Shape shorthand: N images, Q thing queries, Z stuff classes, K thing classes, C channels,
S tokens of the first three encoder levels, H1 x W1 the stride-8 level.
"""

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from panoptic_segformer.modeling.mask_decoder import MaskDecoder, MaskDecoderLayer


class DecoupledMaskDecoder(nn.Module):
    """Thing and stuff mask decoders with their class heads and the stuff queries.

    Args:
        num_thing_classes: K.
        num_stuff_classes: Z, one stuff query each.
        d_model: channels C.
        n_heads: attention heads of both stacks.
        mlp_ratio: MLP hidden width / C in the mask decoder layers.
        num_thing_layers: layers of the thing stack (4), before its tail.
        num_stuff_layers: layers of the stuff stack (6), before its tail.
        prior_prob: initial class probability of every class head (focal-loss prior).
        checkpointing: activation checkpointing of both stacks' layers and tails in training
            (:class:`~panoptic_segformer.modeling.mask_decoder.MaskDecoder`).
    """

    def __init__(
        self,
        num_thing_classes: int = 80,
        num_stuff_classes: int = 53,
        d_model: int = 256,
        n_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_thing_layers: int = 4,
        num_stuff_layers: int = 6,
        prior_prob: float = 0.01,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_thing_classes < 1 or num_stuff_classes < 0:
            raise ValueError(
                "need at least one thing class and no negative stuff count, got "
                f"num_thing_classes={num_thing_classes}, num_stuff_classes={num_stuff_classes}"
            )
        self.d_model = d_model
        self.num_stuff_classes = num_stuff_classes
        self.things = MaskDecoder(
            MaskDecoderLayer(d_model, n_heads, mlp_ratio, self_attn=False),
            num_thing_layers,
            d_model,
            n_heads,
            checkpointing,
        )
        self.stuff = MaskDecoder(
            MaskDecoderLayer(d_model, n_heads, mlp_ratio, self_attn=True),
            num_stuff_layers,
            d_model,
            n_heads,
            checkpointing,
        )
        # Each stuff query holds its content part and its positional part (2C), the authors'
        # ``stuff_query`` embedding.
        self.stuff_query = nn.Embedding(num_stuff_classes, 2 * d_model)
        thing_head = nn.Linear(d_model, num_thing_classes)
        stuff_head = nn.Linear(d_model, 1)
        self.thing_class_heads = nn.ModuleList(
            copy.deepcopy(thing_head) for _ in range(num_thing_layers)
        )
        self.stuff_class_heads = nn.ModuleList(
            copy.deepcopy(stuff_head) for _ in range(num_stuff_layers)
        )
        # follows Deformable DETR's focal-loss bias prior
        bias = -math.log((1 - prior_prob) / prior_prob)
        for head in [*self.thing_class_heads, *self.stuff_class_heads]:
            nn.init.constant_(head.bias, bias)

    def forward_things(
        self,
        queries: Tensor,
        memory: Tensor,
        shapes: Sequence[Tuple[int, int]],
        memory_padding_mask: Optional[Tensor] = None,
        num_layers: Optional[int] = None,
        last_mask_only: bool = False,
    ) -> Dict[str, List[Tensor]]:
        """Runs the thing stack on location-aware thing queries (no positional embedding).

        Args:
            queries (Tensor): (N, Q, C) thing queries; rows that only pad a batch do no harm,
                the thing stack has no self-attention.
            memory (Tensor): (N, S, C) encoder memory of the first three levels.
            shapes: their three (H, W), finest first.
            memory_padding_mask (Tensor, optional): (N, S) bool, True at padding.
            num_layers: early exit after this many layers (paper Table 10), None for all.
            last_mask_only: compute the last mask only (inference; see :class:`MaskDecoder`).

        Returns:
            dict with "masks": (N, Q, H1, W1) per layer run, then the tail's unless it exited
            early (only the last with ``last_mask_only``); "logits": (N, Q, K) class logits per
            layer run.
        """
        out = self.things(
            queries, memory, shapes, None, memory_padding_mask, num_layers, last_mask_only
        )
        logits = [head(q) for head, q in zip(self.thing_class_heads, out["queries"])]
        return {"masks": out["masks"], "logits": logits}

    def forward_stuff(
        self,
        memory: Tensor,
        shapes: Sequence[Tuple[int, int]],
        memory_padding_mask: Optional[Tensor] = None,
        num_layers: Optional[int] = None,
        last_mask_only: bool = False,
    ) -> Dict[str, List[Tensor]]:
        """Runs the stuff stack on the Z class-fixed stuff queries.

        Args:
            memory (Tensor): (N, S, C) encoder memory of the first three levels.
            shapes: their three (H, W), finest first.
            memory_padding_mask (Tensor, optional): (N, S) bool, True at padding.
            num_layers: early exit after this many layers (paper Table 10), None for all.
            last_mask_only: compute the last mask only (inference; see :class:`MaskDecoder`).

        Returns:
            dict with "masks": (N, Z, H1, W1) per layer run, then the tail's unless it exited
            early (only the last with ``last_mask_only``); "logits": (N, Z) presence logits per
            layer run.
        """
        n = memory.shape[0]
        # (Z, 2C) -> 2 x (N, Z, C)
        content, pos = self.stuff_query.weight.split(self.d_model, dim=1)
        content = content[None].expand(n, -1, -1)
        pos = pos[None].expand(n, -1, -1)
        out = self.stuff(
            content, memory, shapes, pos, memory_padding_mask, num_layers, last_mask_only
        )
        # (N, Z, 1) -> (N, Z)
        logits = [head(q).squeeze(-1) for head, q in zip(self.stuff_class_heads, out["queries"])]
        return {"masks": out["masks"], "logits": logits}


def gather_queries(queries: Tensor, indices: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Gathers a different set of queries per image into one zero-padded batch.

    Args:
        queries (Tensor): (N, Q, C).
        indices: N int64 tensors (Q_i,) of query indices, repeats allowed.

    Returns:
        gathered (Tensor): (N, max Q_i, C), rows past Q_i are zero.
        valid (Tensor): (N, max Q_i) bool, True for the gathered rows.
    """
    n, _, c = queries.shape
    if len(indices) != n:
        raise ValueError(f"queries hold {n} images but indices hold {len(indices)}")
    longest = max((len(i) for i in indices), default=0)
    gathered = queries.new_zeros(n, longest, c)
    valid = torch.zeros(n, longest, dtype=torch.bool, device=queries.device)
    for b, index in enumerate(indices):
        index = index.to(queries.device)
        gathered[b, : len(index)] = queries[b, index]
        valid[b, : len(index)] = True
    return gathered, valid
