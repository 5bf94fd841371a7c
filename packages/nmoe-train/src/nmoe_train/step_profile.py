"""Where the GPU time of one training step goes: kernels by category, plus idle time.

The training bench (``bench/bench_train.py --profile DIR``) profiles one full step (forward,
backward, optimizer) with torch.profiler inside named ``record_function`` ranges (`RANGES`) and
hands the chrome trace to `kernel_events_from_chrome_trace`, which gives every GPU kernel (and
memcpy / memset) with the ranges it was launched under; `categorize` and `gpu_time_breakdown`
then sum the GPU time per category. Both are pure functions of plain data, tested on synthetic
events.

A kernel's ranges are found by time: the ``record_function`` ranges (on any CPU thread) that
contain the CPU-side launch call (``cudaLaunchKernel``, ``cuLaunchKernelEx``, ...) linked to the
kernel by its correlation id. The autograd engine launches the backward from its own thread
while the main thread waits inside the ``backward`` range, so time containment attributes the
backward correctly; ranges entered inside the autograd thread (a custom Function's backward,
dispatcher calls) are found the same way.

Categories, first matching rule wins (``ranges`` are the enclosing range names):

1. ``optimizer``: launched inside `RANGES.optimizer` (everything in ``optimizer.step``).
2. ``expert_gemm``: grouped GEMMs by kernel name (nmoe CuTeDSL kernels, torch ``_grouped_mm``
   CUTLASS kernels), or any GEMM-named kernel inside `RANGES.experts`.
3. ``attention``: SDPA / flash / cuDNN attention kernels, by name.
4. ``dispatch_combine``: launched inside `RANGES.dispatch` / `RANGES.combine`, or nmoe_comm /
   permute kernels by name.
5. ``router``: inside `RANGES.router` (scores, sigmoid, top-k, gate normalisation).
6. ``loss``: inside `RANGES.loss` (the chunked linear cross-entropy, its head GEMMs included).
7. ``expert_other``: the non-GEMM kernels inside `RANGES.experts` (SwiGLU, gating, casts).
8. ``dense_gemm``: the remaining GEMM kernels (attention projections, dense MLPs, router-free
   linear layers).
9. ``elementwise_other``: everything else (norms, residuals, RoPE, casts, memcpy / memset).

``idle`` is the step's wall time minus the union of the kernels' busy intervals inside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CATEGORIES = (
    "expert_gemm",
    "expert_other",
    "dense_gemm",
    "attention",
    "dispatch_combine",
    "router",
    "loss",
    "optimizer",
    "elementwise_other",
)


@dataclass(frozen=True)
class _Ranges:
    step: str = "nmoe/step"
    forward: str = "nmoe/forward"
    backward: str = "nmoe/backward"
    optimizer: str = "nmoe/optimizer"
    router: str = "nmoe/router"
    experts: str = "nmoe/experts"
    dispatch: str = "nmoe/dispatch"
    combine: str = "nmoe/combine"
    loss: str = "nmoe/loss"


RANGES = _Ranges()
"""The ``record_function`` names the bench enters; `categorize` keys on them."""

_GROUPED_GEMM = re.compile(
    r"grouped_gemm|groupedgemm|grouped_mm|groupproblemshape|nmoe_kernels", re.IGNORECASE
)
_GEMM = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|wgmma|_mma_|sm90_.*mma", re.IGNORECASE)
_ATTENTION = re.compile(
    r"flash|fmha|sdpa|scaled_dot_product|attention|attn|cudnn.*(mha|bprop|fprop)", re.IGNORECASE
)
_COMM = re.compile(r"nmoe_comm|permute|rdep|nvshmem|dispatch|combine", re.IGNORECASE)


@dataclass(frozen=True)
class KernelEvent:
    """One GPU activity: ``name``, ``start_us`` and ``duration_us`` on the GPU timeline, and
    ``ranges``, the names of the CPU ranges that enclosed its launch (outermost first)."""

    name: str
    start_us: float
    duration_us: float
    ranges: tuple[str, ...] = ()


def categorize(name: str, ranges: Sequence[str]) -> str:
    """The category (one of `CATEGORIES`) of a kernel ``name`` launched inside ``ranges``; the
    rules are in the module docstring."""
    inside = set(ranges)
    if RANGES.optimizer in inside:
        return "optimizer"
    is_gemm = bool(_GEMM.search(name))
    if _GROUPED_GEMM.search(name) or (is_gemm and RANGES.experts in inside):
        return "expert_gemm"
    if _ATTENTION.search(name):
        return "attention"
    if RANGES.dispatch in inside or RANGES.combine in inside or _COMM.search(name):
        return "dispatch_combine"
    if RANGES.router in inside:
        return "router"
    if RANGES.loss in inside:
        return "loss"
    if RANGES.experts in inside:
        return "expert_other"
    if is_gemm:
        return "dense_gemm"
    return "elementwise_other"


def busy_union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def gpu_time_breakdown(
    events: Iterable[KernelEvent], window_start_us: float, window_end_us: float
) -> dict[str, float]:
    """GPU time in microseconds per category of `CATEGORIES`, plus ``idle``, ``busy`` and
    ``wall`` for the step window ``[window_start_us, window_end_us]``.

    Kernel time is the sum of durations (kernels on concurrent streams both count, so the
    categories can add up to more than ``busy``); each event is clipped to the window. ``busy``
    is the union of the clipped intervals, ``idle = wall - busy``.
    """
    if window_end_us < window_start_us:
        raise ValueError(f"window ends ({window_end_us}) before it starts ({window_start_us})")
    totals = dict.fromkeys(CATEGORIES, 0.0)
    intervals = []
    for event in events:
        start = max(event.start_us, window_start_us)
        end = min(event.start_us + event.duration_us, window_end_us)
        if end <= start:
            continue
        totals[categorize(event.name, event.ranges)] += end - start
        intervals.append((start, end))
    wall = window_end_us - window_start_us
    busy = busy_union_us(intervals)
    totals.update(busy=busy, idle=wall - busy, wall=wall)
    return totals


_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_events_from_chrome_trace(
    trace: dict, range_prefix: str = "nmoe/"
) -> tuple[list[KernelEvent], dict[str, tuple[float, float]]]:
    """GPU activities of a torch.profiler chrome trace (the parsed JSON) with their ranges.

    Returns ``(events, ranges)``: every ``kernel`` / ``gpu_memcpy`` / ``gpu_memset`` event as a
    `KernelEvent` whose ``ranges`` are the ``user_annotation`` ranges named ``range_prefix...``
    that contain the CPU launch call with the same correlation id (outermost first; an event
    without a launch record gets none), and the first ``(start_us, end_us)`` of each such range
    name.
    """
    trace_events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    annotations = []
    launches: dict[int, float] = {}
    gpu = []
    for ev in trace_events:
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat", "")
        if cat == "user_annotation" and str(ev.get("name", "")).startswith(range_prefix):
            annotations.append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0)),
                                ev["name"]))
        elif cat in _LAUNCH_CATEGORIES:
            correlation = (ev.get("args") or {}).get("correlation")
            if correlation is not None:
                launches[int(correlation)] = float(ev["ts"])
        elif cat in _GPU_CATEGORIES:
            gpu.append(ev)
    annotations.sort(key=lambda a: (a[0], -a[1]))  # outer ranges before the inner ones
    first: dict[str, tuple[float, float]] = {}
    for start, end, name in annotations:
        first.setdefault(name, (start, end))
    # Sweep the launches in time order, keeping the ranges open at each launch.
    timed = []
    for index, ev in enumerate(gpu):
        correlation = (ev.get("args") or {}).get("correlation")
        launch = launches.get(int(correlation)) if correlation is not None else None
        if launch is not None:
            timed.append((launch, index))
    enclosing: list[tuple[str, ...]] = [()] * len(gpu)
    open_ranges: list[tuple[float, float, str]] = []
    next_annotation = 0
    for launch, index in sorted(timed):
        while next_annotation < len(annotations) and annotations[next_annotation][0] <= launch:
            open_ranges.append(annotations[next_annotation])
            next_annotation += 1
        open_ranges = [a for a in open_ranges if a[1] >= launch]
        enclosing[index] = tuple(name for _, _, name in open_ranges)
    events = [
        KernelEvent(str(ev.get("name", "")), float(ev["ts"]), float(ev.get("dur", 0.0)),
                    enclosing[index])
        for index, ev in enumerate(gpu)
    ]
    return events, first


def format_breakdown(title: str, totals: dict[str, float]) -> str:
    """A text table of `gpu_time_breakdown`'s result: ms and % of the step's wall time."""
    wall = totals["wall"] or 1.0
    lines = [title, f"  {'category':<20}{'ms':>10}{'% step':>9}"]
    for key in (*CATEGORIES, "idle"):
        lines.append(f"  {key:<20}{totals[key] / 1000:>10.3f}{100 * totals[key] / wall:>8.1f}%")
    lines.append(f"  {'step wall':<20}{totals['wall'] / 1000:>10.3f}{100.0:>8.1f}%")
    return "\n".join(lines)
