"""Training losses of Panoptic SegFormer: Eq. (3) to (5) of the paper, as the authors train.

L = lambda_things * L_things + lambda_stuff * L_stuff, where

* L_things holds the location decoder's detection losses (focal, L1, GIoU) on every layer, and
  the thing mask decoder's Dice loss (and, weighted 0 as in the authors' code, its class loss)
  on every layer and the tail;
* L_stuff holds the stuff mask decoder's Dice loss on every layer and the tail and its
  one-logit presence focal loss on every layer (weighted x2 again, as the authors do).

Matching (see :mod:`panoptic_segformer.modeling.matcher`): location decoder layers 1..D-1 are
matched one to one; the last layer's costs feed the "filter", whose first round is that layer's
one-to-one match: by default (``max_per_target=1``, the authors' released behaviour) exactly
these T queries reach the thing mask decoder; with more rounds, up to ``max_per_target`` per
thing. Those queries are then matched one to one with the Dice cost of the thing mask
decoder's last masks at their own resolution (stride 8), and only these matches get mask
targets; the mask losses are taken at stride 4. Stuff query k always predicts stuff class k: its
target is that class's mask, or nothing (weight 0) when the class is absent.

Switches of the paper's ablations: without deep supervision (Fig. 5, "w/o ds") the mask decoder
is supervised on its last layer only (the Dice losses of the tail masks and the class losses of
the last layer; the earlier layers' terms stay in the dict, weighted 0). Without location
decoder layers (Table 6, "0") every thing query reaches the thing mask decoder and is matched
one to one by the mask decoder's own last class head and the Dice cost, without box costs.

lambda_things / lambda_stuff are, by default, recomputed per batch from the numbers of things
and stuff segments (averaged over processes when distributed, each at least 1), as the
authors' code does; fixed values are a switch. Every loss is a sum divided by the number of
things (or stuff segments) in the batch.

Targets are one dict per image, as :func:`panoptic_segformer.modeling.targets.split_targets`
builds them.

Shape shorthand: D location decoder layers, N images, Q thing queries, K thing classes, Z stuff
classes, B box size (4, or 2 for centres), H1 x W1 the stride-8 mask size.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from panoptic_segformer.modeling.losses import dice_loss, giou_loss, l1_box_loss, sigmoid_focal_loss
from panoptic_segformer.modeling.matcher import (
    HungarianMatcher,
    MaskDecoderMatcher,
    MatchIndices,
    repeated_hungarian_match,
)
from panoptic_segformer.modeling.targets import Targets


def _mean_over_processes(counts: Sequence[float], device: torch.device) -> List[float]:
    """``counts`` averaged over the processes of the default group (as they are when not
    distributed), in one all-reduce."""
    values = torch.tensor([float(c) for c in counts], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values.tolist()


def _upsample_x2(masks: Tensor) -> Tensor:
    """(M, H1, W1) stride-8 masks -> (M, 2 H1, 2 W1): losses are taken at stride 4."""
    if masks.shape[0] == 0:  # interpolate rejects empty batches; keep the autograd graph
        return masks.repeat(1, 2, 2)
    return F.interpolate(masks[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]


def _resize_targets(masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """(T, Hm, Wm) bool -> (T, h, w) float by bilinear resizing (the authors' target rule)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0]


class PanopticSegFormerCriterion(nn.Module):
    """Matching plus the weighted losses of all decoders.

    Args:
        num_thing_classes: K.
        num_stuff_classes: Z.
        matcher: the location decoder's one-to-one matcher (its costs also drive the filter).
        mask_matcher: the thing mask decoder's one-to-one matcher.
        class_weight: focal class loss weight (lambda_cls, 2).
        bbox_weight: L1 box loss weight (5).
        giou_weight: GIoU loss weight (2); unused by the box-free decoder.
        mask_weight: Dice loss weight (lambda_seg, 2).
        stuff_class_factor: extra factor of the stuff presence loss (the authors' x2).
        thing_class_weight: weight of the thing mask decoder's class loss; the authors' code
            multiplies it by 0 (thing classes come from the location decoder).
        focal_alpha, focal_gamma: of every focal loss.
        max_per_target: most queries the filter selects per thing: 1 (default) passes exactly
            the location decoder's one-to-one matches, as the authors' released assigner does;
            more is the rounds their ``max_pos = 3`` was configured for.
        max_selected: most queries the filter selects per image: the rounds of matching
            are at most ``max_selected // T`` (the authors' released assigner: 300).
        lambda_things, lambda_stuff: fixed Eq. (3) weights; both None (default) recomputes
            them per batch from the thing and stuff counts.
        deep_supervision: supervise every mask decoder layer (paper Sec. 3.3.3); False
            supervises the last one only (Fig. 5's "w/o ds").
    """

    def __init__(
        self,
        num_thing_classes: int,
        num_stuff_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        mask_matcher: Optional[MaskDecoderMatcher] = None,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 2.0,
        stuff_class_factor: float = 2.0,
        thing_class_weight: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_per_target: int = 1,
        max_selected: int = 300,
        lambda_things: Optional[float] = None,
        lambda_stuff: Optional[float] = None,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if (lambda_things is None) != (lambda_stuff is None):
            raise ValueError(
                "set both lambda_things and lambda_stuff, or neither (per-batch weights); got "
                f"lambda_things={lambda_things}, lambda_stuff={lambda_stuff}"
            )
        for name, value in (("lambda_things", lambda_things), ("lambda_stuff", lambda_stuff)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.mask_matcher = mask_matcher if mask_matcher is not None else MaskDecoderMatcher()
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.mask_weight = mask_weight
        self.stuff_class_factor = stuff_class_factor
        self.thing_class_weight = thing_class_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.max_per_target = max_per_target
        self.max_selected = max_selected
        self.lambda_things = lambda_things
        self.lambda_stuff = lambda_stuff
        self.deep_supervision = deep_supervision

    @torch.no_grad()
    def select_thing_queries(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: Targets
    ) -> List[MatchIndices]:
        """The filter: the queries of each thing for the thing mask decoder, ``max_per_target``
        rounds of matching (1: the one-to-one match).

        Args:
            pred_logits (Tensor): (N, Q, K) the location decoder's last-layer class logits.
            pred_boxes (Tensor): (N, Q, B) its boxes.
            targets: per-image target dicts.

        Returns:
            per image (query_idx, target_idx) from :func:`repeated_hungarian_match`; the first
            T_i pairs are the one-to-one match.
        """
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"predictions hold {pred_logits.shape[0]} images but targets hold {len(targets)}"
            )
        return [
            repeated_hungarian_match(
                self.matcher.cost_matrix(logits, boxes, t["thing_labels"], t["thing_boxes"]),
                self.max_per_target,
                self.max_selected,
            )
            for logits, boxes, t in zip(pred_logits, pred_boxes, targets)
        ]

    def forward(self, outputs: Dict[str, object], targets: Targets) -> Dict[str, Tensor]:
        """Weighted losses of one batch.

        Args:
            outputs: the model's training outputs:
                ``pred_logits`` (D, N, Q, K) and ``pred_boxes`` (D, N, Q, B) of the location
                decoder; ``selection``, :meth:`select_thing_queries` of its last layer;
                ``thing_masks`` list of (N, Qs, H1, W1) and ``thing_logits`` list of
                (N, Qs, K) of the thing mask decoder run on the selected queries (row r of
                image i is ``selection[i][0][r]``, rows past it pad); ``stuff_masks`` list of
                (N, Z, H1, W1) and ``stuff_logits`` list of (N, Z).
            targets: per-image target dicts (see the module docstring).

        Returns:
            dict of weighted scalar losses whose sum is Eq. (3): ``loss_cls``, ``loss_bbox``,
            ``loss_giou`` (last location layer) and ``d{i}.`` copies for earlier layers;
            ``loss_mask_things`` (tail) and ``t{j}.loss_mask_things`` / ``t{j}.loss_cls_things``
            per thing layer; ``loss_mask_stuff`` (tail) and ``s{j}.loss_mask_stuff`` /
            ``s{j}.loss_cls_stuff`` per stuff layer.
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != pred_logits.shape[1]:
            raise ValueError(
                f"predictions hold {pred_logits.shape[1]} images but targets hold {len(targets)}"
            )
        device = pred_logits.device
        counts = [sum(len(t[key]) for t in targets) for key in ("thing_labels", "stuff_labels")]
        num_things, num_stuff = (max(c, 1.0) for c in _mean_over_processes(counts, device))
        if self.lambda_things is None:
            lambda_things = num_things / (num_things + num_stuff)
            lambda_stuff = num_stuff / (num_things + num_stuff)
        else:
            lambda_things, lambda_stuff = self.lambda_things, self.lambda_stuff

        losses: Dict[str, Tensor] = {}
        selection = outputs["selection"]
        num_layers = pred_logits.shape[0]
        for d in range(num_layers):
            last = d == num_layers - 1
            if last:
                matches = [
                    (q[: len(t["thing_labels"])], i[: len(t["thing_labels"])])
                    for (q, i), t in zip(selection, targets)
                ]
            else:
                matches = self.matcher(
                    pred_logits[d],
                    pred_boxes[d],
                    [t["thing_labels"] for t in targets],
                    [t["thing_boxes"] for t in targets],
                )
            prefix = "" if last else f"d{d}."
            for name, value in self._detection_losses(
                pred_logits[d], pred_boxes[d], targets, matches, num_things
            ).items():
                losses[prefix + name] = lambda_things * value

        for name, value in self._thing_mask_losses(outputs, targets, num_things).items():
            losses[name] = lambda_things * value
        for name, value in self._stuff_losses(outputs, targets, num_stuff).items():
            losses[name] = lambda_stuff * value
        return losses

    def _detection_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Targets,
        matches: Sequence[MatchIndices],
        num_things: float,
    ) -> Dict[str, Tensor]:
        """Focal, L1 and GIoU losses of one location decoder layer; (N, Q, K), (N, Q, B)."""
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        labels = torch.cat([t["thing_labels"][i] for t, (_, i) in zip(targets, matches)])
        target_boxes = torch.cat([t["thing_boxes"][i] for t, (_, i) in zip(targets, matches)])
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, labels.to(logits.device)] = 1
        matched = boxes[batch_idx, query_idx]
        target_boxes = target_boxes.to(matched)
        losses = {
            "loss_cls": self.class_weight
            * sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, num_things),
            "loss_bbox": self.bbox_weight * l1_box_loss(matched, target_boxes, num_things),
        }
        if boxes.shape[-1] == 4:
            losses["loss_giou"] = self.giou_weight * giou_loss(matched, target_boxes, num_things)
        return losses

    def _thing_mask_losses(
        self, outputs: Dict[str, object], targets: Targets, num_things: float
    ) -> Dict[str, Tensor]:
        """Dice (and class) losses of the thing mask decoder, matched one to one."""
        masks: List[Tensor] = outputs["thing_masks"]
        logits: List[Tensor] = outputs["thing_logits"]
        selection: List[MatchIndices] = outputs["selection"]
        rows = [q.to(logits[-1].device) for q, _ in selection]
        if len(outputs["pred_logits"]):
            # Class and box of a selected query come from the location decoder's last layer.
            last_logits, last_boxes = outputs["pred_logits"][-1], outputs["pred_boxes"][-1]
            match_logits = [last_logits[i, q] for i, q in enumerate(rows)]
            match_boxes = [last_boxes[i, q] for i, q in enumerate(rows)]
        else:  # no location decoder layers: the mask decoder's own classes, no boxes
            match_logits = [logits[-1][i, : len(q)] for i, q in enumerate(rows)]
            match_boxes = None
        # Matched on the last masks at their own resolution (stride 8), the targets resized to
        # it (the authors' DiceCost); the losses below are taken at stride 4.
        mask_size = tuple(masks[-1].shape[-2:])
        matches = self.mask_matcher(
            match_logits,
            match_boxes,
            [masks[-1][i, : len(q)] for i, q in enumerate(rows)],
            [t["thing_labels"] for t in targets],
            [t["thing_boxes"] for t in targets],
            [_resize_targets(t["thing_masks"], mask_size) for t in targets],
        )
        batch_idx = torch.cat([torch.full_like(r, i) for i, (r, _) in enumerate(matches)])
        row_idx = torch.cat([r for r, _ in matches])
        size = (2 * mask_size[0], 2 * mask_size[1])
        target_masks = torch.cat(
            [_resize_targets(t["thing_masks"][i], size) for t, (_, i) in zip(targets, matches)]
        )
        labels = torch.cat([t["thing_labels"][i] for t, (_, i) in zip(targets, matches)])

        losses = {}
        for j, layer_masks in enumerate(masks):
            last = j == len(masks) - 1
            name = "loss_mask_things" if last else f"t{j}.loss_mask_things"
            pred = _upsample_x2(layer_masks[batch_idx, row_idx])
            losses[name] = self._layer_weight(self.mask_weight, last) * dice_loss(
                pred, target_masks, num_normalizer=num_things
            )
        # Rows that only pad the batch are not queries: no class loss there. (N, Qs, K) targets,
        # the same for every layer.
        valid = torch.zeros(logits[0].shape[:2], dtype=torch.bool, device=logits[0].device)
        for i, q in enumerate(rows):
            valid[i, : len(q)] = True
        onehot = torch.zeros_like(logits[0])
        onehot[batch_idx, row_idx, labels.to(onehot.device)] = 1
        onehot = onehot[valid]
        for j, layer_logits in enumerate(logits):
            focal = sigmoid_focal_loss(
                layer_logits[valid], onehot, self.focal_alpha, self.focal_gamma, num_things
            )
            weight = self._layer_weight(self.thing_class_weight, j == len(logits) - 1)
            losses[f"t{j}.loss_cls_things"] = weight * focal
        return losses

    def _stuff_losses(
        self, outputs: Dict[str, object], targets: Targets, num_stuff: float
    ) -> Dict[str, Tensor]:
        """Dice and presence losses of the class-fixed stuff queries."""
        masks: List[Tensor] = outputs["stuff_masks"]
        logits: List[Tensor] = outputs["stuff_logits"]
        device = logits[0].device
        size = (2 * masks[-1].shape[-2], 2 * masks[-1].shape[-1])
        batch_idx = torch.cat(
            [torch.full_like(t["stuff_labels"], i) for i, t in enumerate(targets)]
        ).to(device)
        class_idx = torch.cat([t["stuff_labels"] for t in targets]).to(device)
        target_masks = torch.cat([_resize_targets(t["stuff_masks"], size) for t in targets])
        present = torch.zeros_like(logits[0])
        present[batch_idx, class_idx] = 1

        losses = {}
        for j, layer_masks in enumerate(masks):
            last = j == len(masks) - 1
            name = "loss_mask_stuff" if last else f"s{j}.loss_mask_stuff"
            # Only present classes have a target; absent ones have weight 0.
            pred = _upsample_x2(layer_masks[batch_idx, class_idx])
            losses[name] = self._layer_weight(self.mask_weight, last) * dice_loss(
                pred, target_masks, num_normalizer=num_stuff
            )
        for j, layer_logits in enumerate(logits):
            focal = sigmoid_focal_loss(
                layer_logits, present, self.focal_alpha, self.focal_gamma, num_stuff
            )
            weight = self._layer_weight(
                self.class_weight * self.stuff_class_factor, j == len(logits) - 1
            )
            losses[f"s{j}.loss_cls_stuff"] = weight * focal
        return losses

    def _layer_weight(self, weight: float, last_layer: bool) -> float:
        """A mask decoder loss weight, 0 for the layers before the last without deep
        supervision (the terms stay, so every parameter still gets a gradient: DDP needs no
        unused-parameter search)."""
        return weight if self.deep_supervision or last_layer else 0.0
