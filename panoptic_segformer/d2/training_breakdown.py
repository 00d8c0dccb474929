"""One training step of Panoptic SegFormer broken down by stage (``tools/benchmark_peers.py
--train --breakdown``): forward time, what autograd holds for the backward pass, and peak memory.

Stages are split by forward hooks on the meta-architecture's parts, in the order they run:
backbone, neck, positions + flattening, encoder, location decoder, the filter's matching (and
the gathering of its queries), every layer and the tail of the thing and stuff mask decoders
(each with its class heads after it), and the criterion (losses), inside which the mask
decoder's matcher is a stage of its own; the backward pass and the optimizer step are rows of
their own.

* ``ms``: wall time of the stage in the profiled step (the profiler adds a little to each op).
* ``backward ms``: time the backward pass spends on the stage's autograd nodes (each node's
  ``autograd::engine::evaluate_function`` range, matched to the stage of the forward op with
  its sequence number; a node created inside a custom autograd function goes to the stage of
  the op created just before it).
* ``held MiB``: what autograd saves for the backward pass while the stage runs
  (``torch.autograd.graph.saved_tensors_hooks``): each storage once, at the stage that first saves
  it, parameters left out (they are held anyway). Layers run under activation checkpointing save
  their inputs only, outside these hooks, so they show (almost) nothing here.
* ``peak MiB``: the most memory the CPU allocator had handed out during the stage, counted from
  the start of the step (parameters, gradients and optimizer state of earlier steps left out):
  the ``Total Allocated`` of the profiler's memory events (``torch.profiler.profile(
  profile_memory=True)``), at the resolution of single allocations.

The second table lists what is held: the saved storages grouped by stage, shape and dtype,
largest first.
"""

import json
import tempfile
import time
from bisect import bisect_right
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["StageRecorder", "print_breakdown", "profile_step", "stage_modules"]

BACKWARD, OPTIMIZER = "backward", "optimizer step"
MIB = 2**20

# (label, module, label of the code that runs after it until the next hooked module)
Stage = Tuple[str, nn.Module, Optional[str]]


def stage_modules(meta: nn.Module) -> List[Stage]:
    """The hooked stages of a ``PanopticSegFormer`` meta-architecture."""
    core = meta.core
    decoder = core.mask_decoder
    stages: List[Stage] = [
        ("backbone", meta.backbone, None),
        ("neck", core.neck, "positions + flatten"),
        ("encoder", core.encoder, None),
        ("location decoder", core.location_decoder, "matching (filter) + gather"),
    ]
    for name, stack in (("thing", decoder.things), ("stuff", decoder.stuff)):
        # the stack's own code between its layers (positions, loop), then its class heads
        stages.append((f"{name} mask decoder, between layers", stack, f"{name} class heads"))
        stages += [
            (f"{name} mask layer {i + 1}", layer, None) for i, layer in enumerate(stack.layers)
        ]
        stages.append((f"{name} mask tail", stack.tail, None))
    stages += [
        ("losses", core.criterion, None),
        ("matching (mask decoder)", core.criterion.mask_matcher, None),
    ]
    return stages


class StageRecorder:
    """Labels the code a forward pass runs by stage: times it, opens a profiler range of the
    label's name, and counts what autograd saves for the backward pass.

    Use as a context manager around the forward pass; :meth:`switch` labels code outside the
    hooked modules (the backward pass, the optimizer step).

    Args:
        stages: (label, module, label after it) as :func:`stage_modules` returns.
        parameters: the model's parameters, left out of the saved tensors.
    """

    def __init__(self, stages: Sequence[Stage], parameters: Sequence[torch.Tensor]) -> None:
        self.stages = stages
        self.parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self.seconds: Dict[str, float] = defaultdict(float)
        self.held: Dict[str, int] = defaultdict(int)
        self.held_by_shape: Dict[Tuple[str, Tuple[int, ...], str], List[int]] = {}
        self.order: List[str] = []
        self._seen: set = set()
        self._stack: List[str] = []
        self._label: Optional[str] = None
        self._range = None
        self._start = 0.0
        self._handles: list = []

    def switch(self, label: Optional[str]) -> None:
        """Ends the current label's time and range and starts ``label``'s (None: none)."""
        now = time.perf_counter()
        if self._label is not None:
            self.seconds[self._label] += now - self._start
            self._range.__exit__(None, None, None)
        self._label, self._start = label, now
        if label is not None:
            if label not in self.order:
                self.order.append(label)
            self._range = record_function(label)
            self._range.__enter__()

    def _enter(self, label: str) -> Callable:
        def hook(module, args):
            self._stack.append(self._label)
            self.switch(label)

        return hook

    def _leave(self, after: Optional[str]) -> Callable:
        def hook(module, args, output):
            previous = self._stack.pop()
            self.switch(after or previous)

        return hook

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and key not in self.parameters:
            self._seen.add(key)
            self.held[self._label] += storage.nbytes()
            group = self.held_by_shape.setdefault(
                (self._label, tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")), [0, 0]
            )
            group[0] += 1
            group[1] += storage.nbytes()
        return tensor

    def __enter__(self) -> "StageRecorder":
        for label, module, after in self.stages:
            self._handles.append(module.register_forward_pre_hook(self._enter(label)))
            self._handles.append(module.register_forward_hook(self._leave(after)))
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        self.switch("other")
        return self

    def __exit__(self, *exc) -> None:
        self._saved.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _peaks(trace: Path, labels: Sequence[str]) -> Dict[str, int]:
    """Per label, the highest ``Total Allocated`` of the memory events inside its ranges."""
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and e["name"] in labels
    )
    starts = [r[0] for r in ranges]
    peaks: Dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("name") != "[memory]":
            continue
        index = bisect_right(starts, event["ts"]) - 1
        if index >= 0 and event["ts"] <= ranges[index][1]:
            label = ranges[index][2]
            peaks[label] = max(peaks[label], event["args"]["Total Allocated"])
    return peaks


def _backward_seconds(events: Sequence, labels: Sequence[str]) -> Dict[str, float]:
    """Per label of the forward pass, the time of the backward nodes whose forward ran under
    it."""
    stage_of: Dict[Tuple[int, int], str] = {}  # (thread, sequence number) -> stage
    nodes = []
    for event in events:
        if event.sequence_nr < 0:
            continue
        if event.name.startswith("autograd::engine::evaluate_function"):
            nodes.append(((event.fwd_thread, event.sequence_nr), event.cpu_time_total))
            continue
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        if root.name in labels:
            stage_of[(event.thread, event.sequence_nr)] = root.name
    known = sorted(stage_of)
    seconds: Dict[str, float] = defaultdict(float)
    for key, microseconds in nodes:
        index = bisect_right(known, key) - 1
        if index >= 0 and known[index][0] == key[0]:
            seconds[stage_of[known[index]]] += microseconds / 1e6
    return seconds


def profile_step(
    model: nn.Module,
    batch: List[Dict],
    optimizer: torch.optim.Optimizer,
    stages: Optional[Sequence[Stage]] = None,
) -> Dict[str, object]:
    """Runs one training step (forward, backward, optimizer step) under the profiler.

    Args:
        model: a ``PanopticSegFormer`` meta-architecture in training mode.
        batch: its input dicts.
        optimizer: over its parameters.
        stages: the hooked stages; default :func:`stage_modules` of ``model``.

    Returns:
        ``rows``: per stage (in running order, then backward, optimizer step) its label, ``ms``,
        ``backward_ms``, ``held_mib`` and ``peak_mib``; ``held``: the saved storages by stage, shape
        and dtype (``stage``, ``shape``, ``dtype``, ``count``, ``mib``), largest first.
    """
    recorder = StageRecorder(stages or stage_modules(model), list(model.parameters()))
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with recorder:
                total = sum(model(batch).values())
            recorder.switch(BACKWARD)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            recorder.switch(OPTIMIZER)
            optimizer.step()
            recorder.switch(None)
        prof.export_chrome_trace(str(trace))
        peaks = _peaks(trace, recorder.order)
    forward = [label for label in recorder.order if label not in (BACKWARD, OPTIMIZER)]
    backward = _backward_seconds(prof.events(), forward)
    rows = [
        {
            "stage": label,
            "ms": recorder.seconds[label] * 1e3,
            "backward_ms": backward[label] * 1e3,
            "held_mib": recorder.held[label] / MIB,
            "peak_mib": peaks[label] / MIB,
        }
        for label in recorder.order
    ]
    held = sorted(
        (
            {"stage": s, "shape": list(shape), "dtype": d, "count": c, "mib": b / MIB}
            for (s, shape, d), (c, b) in recorder.held_by_shape.items()
        ),
        key=lambda r: -r["mib"],
    )
    return {"rows": rows, "held": held}


def print_breakdown(breakdown: Dict[str, object], largest: int = 12) -> None:
    """The stage table and the ``largest`` groups of held tensors, as markdown."""
    rows = breakdown["rows"]
    print("| stage | ms | backward ms | held MiB | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['stage']} | {row['ms']:.0f} | {row['backward_ms']:.0f} | "
            f"{row['held_mib']:.0f} | {row['peak_mib']:.0f} |"
        )
    total = {key: sum(r[key] for r in rows) for key in ("ms", "backward_ms", "held_mib")}
    peak = max(r["peak_mib"] for r in rows)
    print(
        f"| total | {total['ms']:.0f} | {total['backward_ms']:.0f} | {total['held_mib']:.0f} | "
        f"{peak:.0f} |"
    )
    print("\n| held by | shape | dtype | count | MiB |")
    print("|---|---|---|---:|---:|")
    for row in breakdown["held"][:largest]:
        shape = "x".join(map(str, row["shape"]))
        print(f"| {row['stage']} | {shape} | {row['dtype']} | {row['count']} | {row['mib']:.0f} |")
