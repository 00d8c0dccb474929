"""losses: each loss against a value worked out by hand, reductions, conventions, gradients."""

import math

import pytest
import torch

from panoptic_segformer.modeling.losses import (
    dice_loss,
    giou_loss,
    l1_box_loss,
    sigmoid_focal_loss,
)


def test_sigmoid_focal_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    p2 = 1 / (1 + math.exp(-2.0))  # sigmoid(2) = 0.8808
    expected = torch.tensor(
        [
            [
                # logit 0, positive: p_t = 0.5, alpha 0.25 * (1 - 0.5)^2 * (-log 0.5)
                0.25 * 0.25 * math.log(2),
                # logit 0, negative: p_t = 0.5, (1 - alpha) 0.75 * (0.5)^2 * log 2
                0.75 * 0.25 * math.log(2),
                # logit 2, positive: 0.25 * (1 - 0.8808)^2 * (-log 0.8808)
                0.25 * (1 - p2) ** 2 * -math.log(p2),
            ]
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected)
    # sum / num_normalizer
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, num_normalizer=2.0), expected.sum() / 2
    )


def test_sigmoid_focal_loss_arguments_matter():
    logits = torch.tensor([0.0, 0.0], dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # alpha < 0 disables the alpha weighting: 0.25 * log 2 for both
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha=-1.0),
        torch.full((2,), 0.25 * math.log(2), dtype=torch.float64),
    )
    # gamma 0 and no alpha is plain binary cross-entropy
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=0.0),
        torch.full((2,), math.log(2), dtype=torch.float64),
    )


def test_sigmoid_focal_loss_gradient_finite_for_saturated_logits():
    logits = torch.tensor([[-60.0, 60.0, 30.0, -30.0, 0.5]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    loss = sigmoid_focal_loss(logits, targets, num_normalizer=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # a confidently wrong logit x costs about alpha_t * |x| (p_t ~ 0, -log p_t ~ |x|), a
    # confidently right one about 0: 0.25 * 60 + 0.75 * 60, plus the unsaturated logit 0.5
    p = 1 / (1 + math.exp(-0.5))
    expected = 0.25 * 60 + 0.75 * 60 + 0.25 * (1 - p) ** 2 * -math.log(p)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the gradient pushes the wrong and the unsaturated logits toward their targets
    assert (logits.grad[0, [0, 4]] < 0).all() and logits.grad[0, 1] > 0


def test_dice_loss_on_activated_values():
    # the authors' ReLU head: values are used as they are (activation "none")
    inputs = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    eps = 1e-6
    # sum(p t) = 1 + 0.5 = 1.5; sum(p^2) = 1 + 0.25 = 1.25; sum(t^2) = 2
    expected = 1 - 2 * 1.5 / (1.25 + eps + 2 + eps)
    torch.testing.assert_close(
        dice_loss(inputs, targets), torch.tensor([expected], dtype=torch.float64)
    )
    # a ReLU value above 1 is not squashed: p = 2, t = 1 -> 1 - 4 / (4 + 1)
    torch.testing.assert_close(
        dice_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), eps=0.0), torch.tensor([0.2])
    )


def test_dice_loss_on_logits_with_sigmoid():
    logits = torch.tensor([[[0.0, -100.0]]])  # (M=1, H=1, W=2)
    targets = torch.tensor([[[1.0, 0.0]]])
    # p = (0.5, ~0): sum(p t) = 0.5, sum(p^2) = 0.25, sum(t^2) = 1 -> 1 - 1 / 1.25 = 0.2
    torch.testing.assert_close(
        dice_loss(logits, targets, activation="sigmoid", eps=0.0), torch.tensor([0.2])
    )
    # read as activated values instead, p = (0, -100): sum(p t) = 0, so the loss is 1
    torch.testing.assert_close(
        dice_loss(logits, targets, activation="none", eps=0.0), torch.tensor([1.0])
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        dice_loss(logits, targets, activation="softmax")


def test_dice_loss_limits_and_normaliser():
    perfect = torch.tensor([[1.0, 0.0, 1.0]])
    empty = torch.zeros(1, 3)
    losses = dice_loss(torch.cat([perfect, empty]), torch.cat([perfect, empty]))
    # perfect: 1 - 4 / (2 + 2 + 2 eps) ~ 0; both empty: 1 - 0 / (2 eps) = 1
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        dice_loss(torch.cat([perfect, empty]), torch.cat([perfect, empty]), num_normalizer=4.0),
        losses.sum() / 4,
    )


def test_l1_box_loss_hand_computed():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    target = torch.tensor([[0.4, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]])
    # |0.5 - 0.4| + 0 + 0 + |0.2 - 0.4| = 0.3; identical boxes 0
    torch.testing.assert_close(l1_box_loss(pred, target), torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(l1_box_loss(pred, target, num_normalizer=3.0), torch.tensor(0.1))


def test_giou_loss_hand_computed():
    pred = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    target = torch.tensor([[0.5, 0.1, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    # first pair: [0, 0, 0.2, 0.2] and [0.4, 0, 0.6, 0.2], disjoint; union 0.08, enclosing
    # 0.6 * 0.2 = 0.12: GIoU = -(0.12 - 0.08) / 0.12 = -1/3, loss 4/3; second pair identical
    expected = torch.tensor([4 / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(giou_loss(pred, target), expected)
    torch.testing.assert_close(
        giou_loss(pred, target, num_normalizer=2.0), torch.tensor(2 / 3, dtype=torch.float64)
    )
