"""Mixed precision: a training step under autocast, and the losses and matching costs that stay
float32 inside it (CPU bfloat16 here; CUDA float16 where a GPU is present)."""

import pytest
import torch
from test_panoptic_segformer import synthetic_batch, tiny_model

from panoptic_segformer.modeling import losses as L
from panoptic_segformer.modeling import matching_costs as M

DEVICES = [
    ("cpu", torch.bfloat16),
    pytest.param(
        "cuda",
        torch.float16,
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


def _training_step(model, images, padding, targets, device_type, dtype):
    """Losses of one step (autocast when ``dtype``) and the gradients they give."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = model(images, padding, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach() for name, value in losses.items()}, grads


@pytest.mark.parametrize("device_type,dtype", DEVICES)
def test_training_step_under_autocast_is_close_to_float32(device_type, dtype):
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0).to(device_type)
    images, padding, targets = synthetic_batch()
    images, padding = images.to(device_type), padding.to(device_type)
    targets = [{k: v.to(device_type) for k, v in t.items()} for t in targets]
    # autocast really runs the network in half precision: the decoder's outputs are
    seen = []
    hook = model.location_decoder.class_heads[-1].register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    reference, reference_grads = _training_step(model, images, padding, targets, device_type, None)
    mixed, mixed_grads = _training_step(model, images, padding, targets, device_type, dtype)
    hook.remove()
    assert seen == [torch.float32, dtype]

    assert set(mixed) == set(reference)
    for name, value in mixed.items():
        # every loss comes out in float32, finite, within 2 % of the float32 step (measured on
        # the CPU in bfloat16: at most 0.6 %)
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert float(value) == pytest.approx(float(reference[name]), rel=2e-2, abs=1e-3), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(mixed_grads) == sorted(trainable)  # every parameter gets a gradient
    for name, grad in mixed_grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    flat = torch.cat([mixed_grads[n].flatten() for n in trainable])
    flat_reference = torch.cat([reference_grads[n].flatten() for n in trainable])
    # the same descent direction (measured on the CPU in bfloat16: cosine 0.98)
    assert torch.nn.functional.cosine_similarity(flat, flat_reference, dim=0) > 0.95


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    q, t, k = 7, 3, 5
    boxes = torch.rand(q, 4, generator=g) * 0.4 + 0.3
    target_boxes = torch.rand(t, 4, generator=g) * 0.4 + 0.3
    return {
        "logits": torch.randn(q, k, generator=g),
        "onehot": (torch.rand(q, k, generator=g) > 0.7).float(),
        "labels": torch.tensor([0, 3, 4]),
        "boxes": boxes,
        "target_boxes": target_boxes,
        "matched_boxes": boxes[:t],
        "masks": torch.rand(q, 16, 24, generator=g),
        "target_masks": torch.rand(t, 16, 24, generator=g) > 0.5,
        "device": device,
    }


# (function, its arguments from _inputs)
FLOAT32_FUNCTIONS = [
    (L.sigmoid_focal_loss, ("logits", "onehot")),
    (L.dice_loss, ("masks", "masks")),
    (L.l1_box_loss, ("matched_boxes", "target_boxes")),
    (L.giou_loss, ("matched_boxes", "target_boxes")),
    (M.focal_class_cost, ("logits", "labels")),
    (M.l1_box_cost, ("boxes", "target_boxes")),
    (M.giou_cost, ("boxes", "target_boxes")),
    (M.dice_cost, ("masks", "target_masks")),
]


@pytest.mark.parametrize("device_type,dtype", DEVICES)
@pytest.mark.parametrize("fn,names", FLOAT32_FUNCTIONS, ids=lambda x: getattr(x, "__name__", ""))
def test_losses_and_matching_costs_are_float32_under_autocast(device_type, dtype, fn, names):
    inputs = _inputs(device_type)
    args = [inputs[n].to(device_type) for n in names]
    # half-precision network outputs, as autocast gives them
    half = [a.to(dtype) if a.is_floating_point() else a for a in args]
    with torch.autocast(device_type, dtype=dtype):
        under_autocast = fn(*half)
    # exactly the float32 computation on the same (rounded) values, outside autocast
    expected = fn(*[a.float() if a.is_floating_point() else a for a in half])
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device_type,dtype", DEVICES)
def test_without_the_float32_guard_autocast_would_lower_the_costs(device_type, dtype):
    # the guard is not a no-op: the undecorated Dice cost's matrix product runs in half
    # precision and moves the costs; the guarded one is the float32 computation exactly
    inputs = _inputs(device_type)
    masks, targets = inputs["masks"].to(device_type), inputs["target_masks"].to(device_type)
    exact = M.dice_cost(masks, targets)
    with torch.autocast(device_type, dtype=dtype):
        lowered = M.dice_cost.__wrapped__(masks, targets)
        guarded = M.dice_cost(masks, targets)
    assert (lowered - exact).abs().max() > 1e-4
    torch.testing.assert_close(guarded, exact, rtol=0, atol=0)
    # float64 stays float64 (gradient checks run in double precision)
    assert M.dice_cost(masks.double(), targets).dtype == torch.float64


def test_float32_guard_passes_gradients_to_half_precision_inputs():
    logits = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(4, 3)
    targets[0, 1] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = L.sigmoid_focal_loss(logits, targets, num_normalizer=1.0)
    loss.backward()
    assert loss.dtype == torch.float32
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.abs().sum() > 0
