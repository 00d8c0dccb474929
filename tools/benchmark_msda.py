#!/usr/bin/env python
"""Benchmark multi-scale deformable attention implementations on the R50 shapes at 800x1333.

Levels 100x167, 50x84, 25x42, 13x21 (22,223 tokens; the levels of another input with
``--size HxW``); 8 heads x 32 channels; 4 points. Two
workloads: the encoder (every token is a query) and the decoder (300 queries). For each
available implementation it reports forward and forward+backward time, peak memory and the
ratio against the plain per-level grid_sample formulation (Deformable DETR's debugging
reference); on a GPU also the achieved GB/s against the bytes the op must move.

Implementations:
  grid_sample  Deformable DETR's reference formulation: sample every level, stack, weight, sum.
  pytorch      this package's PyTorch path (per-level grid_sample, accumulated level by level).
  cpu          this package's compiled CPU kernel (the registered operator), on the CPU.
  cuda         this package's CUDA kernel.
  original     Deformable DETR's CUDA op, if its ``MultiScaleDeformableAttention`` extension is
               importable (build it yourself for comparison; it is not part of this project).

Examples:
  python tools/benchmark_msda.py                       # CPU, float32, batch 1 and 2
  python tools/benchmark_msda.py --device cuda --dtypes float32 float16 bfloat16
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from panoptic_segformer.layers import multi_scale_deformable_attention
from panoptic_segformer.layers.ms_deform_attn_op import load_operator

SIZE = (800, 1333)  # the input image, COCO's test size
LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]  # levels_of(SIZE)


def levels_of(size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """The (H, W) of the four levels (strides 8 to 64) of an (H, W) input; each stride-2 step
    rounds up, as the backbone's convolutions do."""
    return [(-(-size[0] // stride), -(-size[1] // stride)) for stride in (8, 16, 32, 64)]


HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 300
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def grid_sample_reference(value, shapes, sampling_locations, attention_weights):
    """The plain formulation: per-level grid_sample, stacked over levels, weighted, summed."""
    n, _, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels * p)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, m * d, q).transpose(1, 2).contiguous()


def original_op() -> Optional[Callable]:
    try:
        import MultiScaleDeformableAttention as original  # Deformable DETR's extension
    except ImportError:
        return None

    class _Original(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, ss, lsi, loc, attn):
            ctx.save_for_backward(value, ss, lsi, loc, attn)
            return original.ms_deform_attn_forward(value, ss, lsi, loc, attn, 64)

        @staticmethod
        def backward(ctx, grad):
            value, ss, lsi, loc, attn = ctx.saved_tensors
            gv, gl, ga = original.ms_deform_attn_backward(
                value, ss, lsi, loc, attn, grad.contiguous(), 64
            )
            return gv, None, None, gl, ga

    return _Original.apply


def implementations(device: str, shapes: List[Tuple[int, int]] = LEVELS) -> Dict[str, Callable]:

    def ours(name):
        return lambda v, ss, lsi, loc, a: multi_scale_deformable_attention(
            v, ss, lsi, loc, a, implementation=name
        )

    impls = {
        "grid_sample": lambda v, ss, lsi, loc, a: grid_sample_reference(v, shapes, loc, a),
        "pytorch": ours("pytorch"),
    }
    if device == "cpu" and load_operator("cpu")[0] is not None:
        impls["cpu"] = ours("cpu")
    if device == "cuda":
        impls["cuda"] = ours("cuda")
        original = original_op()
        if original is not None:
            impls["original"] = lambda v, ss, lsi, loc, a: original(
                v, ss.to(v.device), lsi.to(v.device), loc, a
            )
    return impls


def make_inputs(
    batch: int,
    queries: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    levels: List[Tuple[int, int]] = LEVELS,
):
    g = torch.Generator().manual_seed(seed)
    n_levels, tokens = len(levels), sum(h * w for h, w in levels)
    value = torch.randn(batch, tokens, HEADS, CHANNELS, generator=g)
    # Reference points anywhere on the map plus offsets of a few pixels, as in the encoder.
    ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(batch, queries, HEADS, n_levels, POINTS, 2, generator=g) * 0.02
    loc = ref + offsets
    attn = torch.randn(batch, queries, HEADS, n_levels * POINTS, generator=g).softmax(-1)
    attn = attn.view(batch, queries, HEADS, n_levels, POINTS)
    ss = torch.tensor(levels, dtype=torch.int64)
    lsi = torch.cat([ss.new_zeros(1), ss.prod(1).cumsum(0)[:-1]])
    tensors = [t.to(device=device, dtype=dtype) for t in (value, loc, attn)]
    return tensors[0], ss, lsi, tensors[1], tensors[2]


def bytes_moved(
    batch: int, queries: int, dtype: torch.dtype, levels: List[Tuple[int, int]] = LEVELS
) -> Dict[str, int]:
    """Lower bound on memory traffic: every input read once, every output written once."""
    size = torch.tensor([], dtype=dtype).element_size()
    value = batch * sum(h * w for h, w in levels) * HEADS * CHANNELS * size
    points = batch * queries * HEADS * len(levels) * POINTS
    coords = points * 3 * size  # two coordinates and one weight per point
    out = batch * queries * HEADS * CHANNELS * size
    forward = value + coords + out
    return {"forward": forward, "backward": forward + out + value + coords}


def _workload(workload: str, batch: int, dtype_name: str, device: str, levels):
    queries = sum(h * w for h, w in levels) if workload == "encoder" else DECODER_QUERIES
    dtype = DTYPES[dtype_name]
    value, ss, lsi, loc, attn = make_inputs(batch, queries, dtype, device, levels=levels)
    grad = torch.randn(batch, queries, HEADS * CHANNELS, device=device).to(dtype)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    return queries, (value, ss, lsi, loc, attn), leaves, grad


def _runners(fn: Callable, inputs, leaves, grad):
    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*inputs).backward(grad)

    return forward, forward_backward


def _elapsed_ms(fn: Callable, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_workload(
    names: List[str],
    workload: str,
    batch: int,
    dtype_name: str,
    device: str,
    warmup: int,
    reps: int,
    levels: List[Tuple[int, int]] = LEVELS,
) -> List[Dict]:
    """Median times of every implementation, measured round-robin in this process, in an order
    reversed every round, so that no implementation is favoured by running first or last."""
    impls = implementations(device, levels)
    queries, inputs, leaves, grad = _workload(workload, batch, dtype_name, device, levels)
    runners = {name: _runners(impls[name], inputs, leaves, grad) for name in names}
    samples = {name: ([], []) for name in names}
    for rep in range(warmup + reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            for runner, times in zip(runners[name], samples[name]):
                ms = _elapsed_ms(runner, device)
                if rep >= warmup:
                    times.append(ms)
    rows = []
    for name in names:
        fwd_ms, fwd_bwd_ms = (statistics.median(t) for t in samples[name])
        row = dict(
            impl=name,
            workload=workload,
            batch=batch,
            queries=queries,
            dtype=dtype_name,
            fwd_ms=fwd_ms,
            fwd_bwd_ms=fwd_bwd_ms,
        )
        if device == "cuda":
            moved = bytes_moved(batch, queries, DTYPES[dtype_name], levels)
            row["fwd_gbps"] = moved["forward"] / fwd_ms / 1e6
            row["fwd_bwd_gbps"] = moved["backward"] / fwd_bwd_ms / 1e6
        rows.append(row)
    return rows


def peak_memory_mib(
    name: str,
    workload: str,
    batch: int,
    dtype_name: str,
    device: str,
    levels: List[Tuple[int, int]] = LEVELS,
) -> float:
    """Peak memory of one forward+backward beyond its inputs: the CUDA allocator's peak, or on
    the CPU the peak resident set beyond the current one (Linux; call it in a fresh process so
    that memory freed by earlier runs and kept by the C allocator does not hide the peak)."""
    _, inputs, leaves, grad = _workload(workload, batch, dtype_name, device, levels)
    _, forward_backward = _runners(implementations(device, levels)[name], inputs, leaves, grad)
    if device == "cuda":
        forward_backward()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    forward_backward()
    return (_rss_kib("VmHWM") - base) / 1024


def _rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) resident set of this process, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _fresh_process_peak(job) -> float:
    # A new process per measurement, so the peak resident set is this measurement's alone.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_memory_mib, job)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--workloads", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"]
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        default=None,
        help="subset of: grid_sample pytorch cpu cuda original (default: available)",
    )
    parser.add_argument(
        "--size",
        default="x".join(map(str, SIZE)),
        help="the input image HxW whose levels are sampled (default: %(default)s)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        size = tuple(int(side) for side in args.size.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        parser.error(f"--size takes HxW in pixels, e.g. 800x1333, got {args.size!r}")
    levels = levels_of(size)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch values must be positive, got {args.batch}")
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    available = implementations(device)
    names = args.implementations or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(
            f"implementation(s) {unknown} not available on {device}; "
            f"available: {list(available)}"
        )
    if device == "cpu" and not Path("/proc/self/clear_refs").exists():
        parser.error("CPU peak memory is read from /proc/self (Linux only)")
    if device == "cpu" and set(args.dtypes) & {"float16", "bfloat16"}:
        print("note: on the CPU, float16/bfloat16 values are computed in float32")

    rows = []
    for workload in args.workloads:
        for batch in args.batch:
            for dtype in args.dtypes:
                print(f"{workload} batch {batch} {dtype}: {', '.join(names)}", file=sys.stderr)
                group = time_workload(
                    names, workload, batch, dtype, device, args.warmup, args.reps, levels
                )
                for row in group:
                    row["size"] = args.size
                    job = (row["impl"], workload, batch, dtype, device, levels)
                    row["peak_mib"] = (
                        peak_memory_mib(*job) if device == "cuda" else _fresh_process_peak(job)
                    )
                rows.extend(group)
    print_table(rows, device, args.size)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


def print_table(rows: List[Dict], device: str, size: str = "x".join(map(str, SIZE))) -> None:
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"\nmulti-scale deformable attention, R50 {size} shapes, {name}, "
        f"torch {torch.__version__}"
    )
    baseline = {
        (r["workload"], r["batch"], r["dtype"]): r for r in rows if r["impl"] == "grid_sample"
    }
    header = [
        "workload",
        "batch",
        "dtype",
        "impl",
        "fwd ms",
        "fwd+bwd ms",
        "peak MiB",
        "fwd x",
        "fwd+bwd x",
    ]
    if device == "cuda":
        header += ["fwd GB/s", "fwd+bwd GB/s"]
    lines = [header]
    for r in rows:
        base = baseline.get((r["workload"], r["batch"], r["dtype"]))
        speedup = (lambda key: f"{base[key] / r[key]:.2f}") if base else (lambda key: "-")
        line = [
            r["workload"],
            str(r["batch"]),
            r["dtype"],
            r["impl"],
            f"{r['fwd_ms']:.2f}",
            f"{r['fwd_bwd_ms']:.2f}",
            f"{r['peak_mib']:.0f}",
            speedup("fwd_ms"),
            speedup("fwd_bwd_ms"),
        ]
        if device == "cuda":
            line += [f"{r['fwd_gbps']:.0f}", f"{r['fwd_bwd_gbps']:.0f}"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    print("x = speed-up over grid_sample (the plain formulation) on the same workload and dtype")


if __name__ == "__main__":
    main()
