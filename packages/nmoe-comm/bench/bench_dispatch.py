"""Benchmark dispatch + combine of the expert-parallel backends against ``nccl`` (torchrun).

    NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    python -m torch.distributed.run --standalone --nproc_per_node 8 \
        packages/nmoe-comm/bench/bench_dispatch.py [--backends nccl ipc nvshmem] [--fp8] \
        [--sync-free] [--json out.json]
    # where the time of one decode-sized ipc dispatch + combine goes, stage by stage:
    ... bench_dispatch.py --backends ipc --breakdown [--shapes 128x7168x8]

Shapes (tokens per rank T, hidden D, top-k K): (4096, 7168, 8), (16384, 768, 8), (8192, 2048, 6)
and the decode size (128, 7168, 8); bfloat16 rows, ``E`` experts (default 256) routed uniformly
at random (K distinct per token), a fresh rotation of 4 input sets (never the same inputs twice
in a row). Each timed iteration starts from a barrier with the GPUs idle and records CUDA events
around ``dispatch`` (including its one host synchronisation) and ``combine`` of the dispatched
rows; the reported time is the median over iterations of the slowest rank. GB/s per rank counts
the bytes that cross devices (rows to or from other ranks, payload only), averaged over ranks,
divided by that time. The baseline is ``nccl`` measured in the same run; ``ratio`` = nccl time /
backend time. ``--fp8`` adds FP8 dispatch rows (``backend+fp8``); ``--sync-free`` adds
``dispatch(..., sync=False)`` rows for the backends that support it (``backend:sync_free``: no
host synchronisation, ``x_RD`` has ``capacity`` rows of which the first R are valid). Before
timing, each backend's ``x_RD`` (its first R rows) and combined output are compared with nccl's
on the same inputs (``match`` column). Rank 0 prints a table and writes JSON rows (op, shape,
dtype, time, GB/s, baseline, ratio, card, GPU count, torch, CUDA and driver versions).
``--graph`` adds ``backend:graph`` rows: the sync-free dispatch and its combine captured once
each in a CUDA graph and replayed (a server's decode path; the host only launches the graphs).
The timed cycles (copy the next inputs into the captured tensors, replay dispatch, replay
combine) are enqueued back to back as a decode loop runs them, so the GPUs run ahead of the host
and the in-graph barriers keep the ranks in step; each op's time is the median of the intervals
between events recorded around its replay (NMOE_BENCH_GRAPH_PROFILE=1 also prints the kernels
inside the graphs, rank 0). ``--dedup`` adds ``backend+dedup`` rows (``dedup_rows=True``: each
token's row crosses once per owner instead of once per slot; GB/s still counts one row per slot,
so it is the effective rate, above what the links carry). ``--owner`` adds ``backend+owner`` rows
in the sync-free and graph modes asked for (``reduce_on_owner=True``: the combine also sends one
row per token and owner, the owner's partial sum; its match column allows that sum's bfloat16
rounding, the dispatch still bitwise).

``--zero-copy`` adds ``backend/zc`` rows (``zero_copy=True``: ``x_RD`` is a view of the dispatcher's
buffer and each row is stored by its source straight at its final row). ``--two-kernel`` adds
``backend/2k`` rows (``pipelined=False``: the two-kernel path, scatter -> barrier -> unpack and
return -> barrier -> reduce) and ``backend/pl`` rows (``pipelined=True``), beside the dispatcher's
own choice, in the same run; ``--grids DB,DP,CB,CP[,CR[,PH]] ...`` adds ``ipc@...`` rows (with
``--zero-copy`` ``ipc/zc@...``) with other grids for the pipelined kernels (blocks per SM and
percent of sender blocks, dispatch then combine, optionally the dispatch's rows per chunk and the
combine's token phases, `RdepDispatcher.stream_phases`).

``--breakdown`` (``ipc`` / ``nvshmem`` only; default shape the decode size) times each stage of
one dispatch + combine instead, synchronous and sync-free: the dispatcher's ``stage_hook``
records a CUDA event and ``time.perf_counter_ns`` right after each stage is enqueued (dispatch:
``checks`` = argument checks and per-call allocations, ``route_plan`` (with the count exchange
and its GPU barrier), ``scatter_slots`` (with the completion barrier), ``host_sync`` (the status
read: the host waits for the GPU here), ``alloc`` (output tensors), ``unpack``, ``handle``
(result objects), ``(return)``; combine: ``checks``, ``return_rows`` (with its barrier),
``reduce_slots``, ``(return)``; the pipelined kernels report ``dispatch_stream`` in place of
``scatter_slots`` and ``unpack``, ``combine_stream`` in place of the combine's two, and their
``host_sync`` comes before the kernel). Per stage it prints the host time between marks (Python,
pybind and launch calls; for ``host_sync`` the wait) and the GPU time between the events (kernel
time plus any idle gap waiting for the host or for other ranks at a barrier), medians over
iterations, for the slowest rank and rank 0, plus the cost of one mark itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import time

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1"),
                      ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import nmoe_comm  # noqa: E402
from nmoe_comm.rdep import BufferLayout  # noqa: E402

SHAPES = [(4096, 7168, 8), (16384, 768, 8), (8192, 2048, 6), (128, 7168, 8)]
LARGE = SHAPES[:3]
DECODE = (128, 7168, 8)
ROTATIONS = 4


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def _capacity(tokens: int, top_k: int) -> int:
    # Uniform routing: R is about T*K per rank with a spread of ~sqrt(T*K); 1.5x plus slack.
    return int(tokens * top_k * 1.5) + 256


def _inputs(shape, num_experts, rank, device):
    tokens, hidden, top_k = shape
    gen = torch.Generator(device=device).manual_seed(1234 + 7919 * rank)
    sets = []
    for _ in range(ROTATIONS):
        x = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
        scores = torch.rand(tokens, num_experts, generator=gen, device=device)
        ids = scores.topk(top_k, dim=1).indices
        gates = torch.rand(tokens, top_k, generator=gen, device=device)
        sets.append((x, ids, gates))
    return sets


def _cross_bytes(ids: torch.Tensor, num_experts: int, world: int, rank: int, row_bytes: int):
    """(dispatch bytes this rank sends off-device, combine bytes it sends off-device)."""
    owner = ids // (num_experts // world)
    sent = int((owner != rank).sum())
    counts = torch.zeros(world, dtype=torch.int64, device=ids.device)
    counts.index_add_(0, owner.flatten(), torch.ones_like(owner.flatten()))
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    received_from_others = sum(int(g[rank]) for r, g in enumerate(gathered) if r != rank)
    return sent * row_bytes, received_from_others * row_bytes


def _barrier(device) -> None:
    flag = torch.ones(1, device=device)
    dist.all_reduce(flag)
    torch.cuda.synchronize(device)


def _make(backend: str, shape, num_experts, world, rank, dedup: bool | str = False):
    """``dedup``: False, True (``dedup_rows``) or "owner" (also ``reduce_on_owner``).
    ``backend``: a registered name (``pipelined`` chosen by the dispatcher), ``NAME/2k``
    (``pipelined=False``: the two-kernel path), ``NAME/pl`` (``pipelined=True``), ``NAME/zc``
    (``zero_copy=True``: ``x_RD`` a view of the buffer, rows stored at their final row), or
    ``NAME@DB,DP,CB,CP[,CR[,PH]]`` (pipelined, with these grids: dispatch and combine blocks per
    SM and percent of senders, the dispatch's rows per chunk and the combine's token phases; see
    `RdepDispatcher.dispatch_grid` and ``stream_phases``)."""
    tokens, hidden, top_k = shape
    name, _, grid = backend.partition("@")
    name, _, mode = name.partition("/")
    options = {} if name == "nccl" else {
        "hidden": hidden, "dtype": torch.bfloat16, "max_send_rows": tokens * top_k,
        "dedup_rows": bool(dedup), "reduce_on_owner": dedup == "owner",
        "pipelined": {"2k": False, "pl": True}.get(mode, True if grid else None),
        "zero_copy": mode == "zc"}
    dispatcher = nmoe_comm.create_dispatcher(name, num_experts=num_experts,
                                             capacity=_capacity(tokens, top_k), world_size=world,
                                             rank=rank, **options)
    if grid:
        db, dp, cb, cp, *extra = (int(v) for v in grid.split(","))
        dispatcher.dispatch_grid = (db, dp, extra[0] if extra else dispatcher.dispatch_grid[2])
        dispatcher.combine_grid = (cb, cp)
        if len(extra) > 1:
            dispatcher.stream_phases = extra[1]
    return dispatcher


def _run(dispatcher, sets, fp8, sync, iters, warmup, device, y_pool):
    """Median (dispatch_ms, combine_ms) of this rank, and the first rotation's outputs."""
    def step(j):
        x, ids, gates = sets[j % ROTATIONS]
        received = dispatcher.dispatch(x, ids, gates, fp8=fp8, sync=sync)
        y = y_pool[: received.x_RD.shape[0]] if fp8 else received.x_RD
        return received, y

    first = step(0)
    x_RD = first[0].x_RD
    if first[0].num_received is not None:  # sync-free: the first R rows are the result
        x_RD = x_RD[:int(first[0].num_received.cpu()[0])]
    # A copy: a zero-copy dispatcher's x_RD is overwritten by the timed dispatches.
    reference_out = (x_RD.clone(), dispatcher.combine(first[1], first[0].handle))
    for j in range(warmup):
        received, y = step(j)
        dispatcher.combine(y, received.handle)
    dispatch_ms, combine_ms = [], []
    for j in range(iters):
        _barrier(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        received, y = step(j)
        events[1].record()
        dispatcher.combine(y, received.handle)
        events[2].record()
        events[2].synchronize()
        dispatch_ms.append(events[0].elapsed_time(events[1]))
        combine_ms.append(events[1].elapsed_time(events[2]))
    return statistics.median(dispatch_ms), statistics.median(combine_ms), reference_out


def _run_graph(dispatcher, sets, iters, warmup, device):
    """`_run` for a sync-free dispatch and its combine captured in two CUDA graphs (how a server
    runs its decode steps: no host work per call); the inputs of each rotation are copied into
    the captured input tensors before the timed replays."""
    static = [t.clone() for t in sets[0]]
    current = torch.cuda.current_stream(device)

    def load(j):
        for dst, src in zip(static, sets[j % ROTATIONS], strict=True):
            dst.copy_(src)

    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph advises
        for _ in range(2):
            received = dispatcher.dispatch(*static, sync=False)
            dispatcher.combine(received.x_RD, received.handle)
    current.wait_stream(side)
    dispatch_graph, combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(dispatch_graph):
        received = dispatcher.dispatch(*static, sync=False)
    with torch.cuda.graph(combine_graph, pool=dispatch_graph.pool()):
        out = dispatcher.combine(received.x_RD, received.handle)
    load(0)
    dispatch_graph.replay()
    combine_graph.replay()
    rows = int(received.num_received.cpu()[0])
    reference_out = (received.x_RD[:rows].clone(), out.clone())
    for j in range(warmup):
        load(j)
        dispatch_graph.replay()
        combine_graph.replay()
    if os.environ.get("NMOE_BENCH_GRAPH_PROFILE") == "1":
        _profile_replays(dispatch_graph, combine_graph, device)
    # A server's steady decode loop: the host enqueues every cycle ahead, the GPUs run the cycles
    # back to back and the in-graph barriers keep the ranks in step (no host or launch skew in
    # the intervals). Events between the replays time each op.
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(iters)]
    _barrier(device)
    for j in range(iters):
        load(j)
        events[j][0].record()
        dispatch_graph.replay()
        events[j][1].record()
        combine_graph.replay()
        events[j][2].record()
    torch.cuda.synchronize(device)
    dispatch_ms = [e[0].elapsed_time(e[1]) for e in events]
    combine_ms = [e[1].elapsed_time(e[2]) for e in events]
    del dispatch_graph, combine_graph
    return statistics.median(dispatch_ms), statistics.median(combine_ms), reference_out


def _profile_replays(dispatch_graph, combine_graph, device, replays: int = 20) -> None:
    """Rank 0 prints the CUDA kernels inside the replayed graphs with their mean time per call on
    every rank (NMOE_BENCH_GRAPH_PROFILE=1): a kernel that ends in a barrier or waits for peers
    carries the other ranks' lateness, so the ranks' columns show where the skew sits."""
    from torch.profiler import ProfilerActivity, profile

    _barrier(device)  # else the first replay carries the ranks' skew entering the profiler
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            dispatch_graph.replay()
            combine_graph.replay()
        torch.cuda.synchronize(device)
    mine = {e.key: e.device_time_total / max(1, e.count) for e in prof.key_averages()
            if e.device_time_total > 0}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        names = sorted(ranks[0], key=lambda k: -ranks[0][k])
        print("kernel (mean us per call)".ljust(48)
              + "".join(f"rank {r}".rjust(10) for r in range(len(ranks))), flush=True)
        for name in names:
            found = re.search(r"(\w+_kernel)", name)
            short = (found.group(1) if found else name)[:46]
            print(short.ljust(48) + "".join(f"{k.get(name, 0.0):10.1f}" for k in ranks),
                  flush=True)


def _slowest(value: float, device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _mean(value: float, device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _bench_shape(shape, variants, args, world, rank, device, meta):
    tokens, hidden, top_k = shape
    sets = _inputs(shape, args.experts, rank, device)
    y_pool = None  # bfloat16 expert outputs to combine after an FP8 dispatch
    if any(v[1] for v in variants):  # (backend, fp8, sync, dedup, graph)
        y_pool = torch.randn(_capacity(tokens, top_k), hidden, device=device).to(torch.bfloat16)
    rows, baseline = [], None
    for backend, fp8, sync, dedup, graph in variants:
        name = (backend + ("+fp8" if fp8 else "")
                + ("+owner" if dedup == "owner" else "+dedup" if dedup else "")
                + (":graph" if graph else "" if sync else ":sync_free"))
        try:
            dispatcher = _make(backend, shape, args.experts, world, rank, dedup)
        except (nmoe_comm.BackendUnavailableError, RuntimeError) as err:
            if rank == 0:
                print(f"  {name}: unavailable: {err}")
            continue
        if graph:
            d_ms, c_ms, outs = _run_graph(dispatcher, sets, args.iters, args.warmup, device)
        else:
            d_ms, c_ms, outs = _run(dispatcher, sets, fp8, sync, args.iters, args.warmup,
                                    device, y_pool)
        dispatcher.destroy()
        payload = hidden + hidden // 32 if fp8 else hidden * 2
        send, back = _cross_bytes(sets[0][1], args.experts, world, rank, hidden * 2)
        send = send // (hidden * 2) * payload
        if backend == "nccl" and not fp8 and sync and not dedup and not graph:
            baseline = outs
        match = None
        if baseline is not None and not fp8:
            if dedup == "owner":  # the combine rounds each owner's partial sum to bfloat16
                scale = float(baseline[1].float().abs().max()) or 1.0
                close = torch.allclose(outs[1].float(), baseline[1].float(), rtol=2.0**-7,
                                       atol=2.0**-7 * scale)
                match = bool(torch.equal(outs[0], baseline[0]) and close)
            else:
                match = bool(torch.equal(outs[0], baseline[0])
                             and torch.equal(outs[1], baseline[1]))
            match = _slowest(0.0 if match else 1.0, device) == 0.0
        d_ms, c_ms = _slowest(d_ms, device), _slowest(c_ms, device)
        send, back = _mean(send, device), _mean(back, device)
        for op, ms, nbytes in (("dispatch", d_ms, send), ("combine", c_ms, back),
                               ("dispatch+combine", d_ms + c_ms, send + back)):
            rows.append(dict(op=op, backend=name, shape=list(shape), experts=args.experts,
                             dtype="bfloat16", time_us=ms * 1e3, gb_per_s=nbytes / ms / 1e6,
                             match=match, **meta))
    base = {r["op"]: r["time_us"] for r in rows if r["backend"] == "nccl"}
    for r in rows:
        r["baseline"] = "nccl"
        r["baseline_us"] = base.get(r["op"])
        r["ratio"] = base[r["op"]] / r["time_us"] if r["op"] in base else None
    return rows


def _verdicts(rows) -> list[str]:
    def row(backend, shape, op="dispatch+combine"):
        for r in rows:
            if r["backend"] == backend and tuple(r["shape"]) == shape and r["op"] == op:
                return r
        return None

    def time(backend, shape, op="dispatch+combine"):
        found = row(backend, shape, op)
        return found["time_us"] if found else None

    lines = []
    for shape in LARGE:
        nccl, ipc = time("nccl", shape), time("ipc", shape)
        if nccl and ipc:
            ok = nccl / ipc >= 1.3
            lines.append(f"ipc >= 1.3x nccl end to end at {shape}: {nccl / ipc:.2f}x "
                         f"{'PASS' if ok else 'MISS'}")
    # GB/s per rank of the bytes that cross: one row per slot, so rows of deduplicated or
    # owner-summed variants (fewer bytes cross) are left out of this target.
    for backend in ("ipc", "ipc:sync_free", "ipc:graph", "ipc/zc", "ipc/zc:sync_free",
                    "ipc/zc:graph"):
        found = row(backend, LARGE[0])
        if found:
            ok = found["gb_per_s"] >= 320.0
            shown = math.floor(found["gb_per_s"] * 10) / 10  # never rounded up to the bound
            lines.append(f"{backend} >= 320 GB/s per rank at {LARGE[0]} (crossing bytes): "
                         f"{shown:.1f} {'PASS' if ok else 'MISS'}")
    for backend in ("ipc", "ipc:sync_free", "ipc+dedup", "ipc+dedup:sync_free", "ipc:graph",
                    "ipc+dedup:graph", "ipc+owner:sync_free", "ipc+owner:graph", "ipc/zc:graph"):
        for op, limit in (("dispatch", 60.0), ("combine", 80.0)):
            us = time(backend, DECODE, op)
            if us:
                lines.append(f"{backend} decode {op} < {limit:.0f} us: {us:.1f} us "
                             f"{'PASS' if us < limit else 'MISS'}")
    for shape in SHAPES:
        ipc, nvs = time("ipc", shape), time("nvshmem", shape)
        if ipc and nvs:
            lines.append(f"nvshmem within 15% of ipc at {shape}: {nvs / ipc:.2f}x "
                         f"{'PASS' if nvs <= 1.15 * ipc else 'MISS'}")
    return lines


def _stage_times(dispatcher, sets, sync, iters, warmup, device):
    """Per-stage (host_us, gpu_us) medians of this rank; also the cost of one mark."""
    marks: list = []

    def mark(stage: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((stage, time.perf_counter_ns(), event))

    def hooked(prefix: str):
        return lambda stage: mark(f"{prefix}{stage}")

    samples: dict[str, list[tuple[float, float]]] = {}
    for j in range(warmup + iters):
        x, ids, gates = sets[j % ROTATIONS]
        _barrier(device)
        marks.clear()
        mark("start")
        dispatcher.stage_hook = hooked("dispatch: ")
        received = dispatcher.dispatch(x, ids, gates, sync=sync)
        mark("dispatch: (return)")
        dispatcher.stage_hook = hooked("combine: ")
        dispatcher.combine(received.x_RD, received.handle)
        mark("combine: (return)")
        mark("mark cost")
        dispatcher.stage_hook = None
        marks[-1][2].synchronize()
        if j < warmup:
            continue
        for (_, t0, e0), (stage, t1, e1) in zip(marks, marks[1:]):
            samples.setdefault(stage, []).append(((t1 - t0) / 1e3, e0.elapsed_time(e1) * 1e3))
    return {stage: (statistics.median(v[0] for v in values),
                    statistics.median(v[1] for v in values))
            for stage, values in samples.items()}


def _breakdown_main(args, shapes, world, rank, device) -> None:
    """``--breakdown``: the stage table for each ipc/nvshmem backend, synchronous and sync-free."""
    backends = [b for b in args.backends if b.partition("/")[0] in ("ipc", "nvshmem")] or [
        "ipc"]
    if args.two_kernel:
        backends += [b + mode for b in backends for mode in ("/2k", "/pl")]
    if rank == 0:
        print(f"{torch.cuda.get_device_name(device)} x{world}, torch {torch.__version__}; "
              f"medians over {args.iters} iterations; host = time on the CPU between marks, "
              f"GPU = time between the marks' CUDA events")
    for shape in shapes:
        sets = _inputs(shape, args.experts, rank, device)
        for backend in backends:
            configs = [(True, False), (False, False)] + ([(False, True)] if args.dedup else [])
            for sync, dedup in configs:
                dispatcher = _make(backend, shape, args.experts, world, rank, dedup)
                times = _stage_times(dispatcher, sets, sync, args.iters, args.warmup, device)
                dispatcher.destroy()
                stages = list(times)  # the same order on every rank
                mine = torch.tensor([v for s in stages for v in times[s]], dtype=torch.float64,
                                    device=device)
                slowest = mine.clone()
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if rank != 0:
                    continue
                print(f"\n{backend} sync={sync} dedup_rows={dedup} "
                      f"T x D x K = {'x'.join(map(str, shape))}, "
                      f"E={args.experts}, {world} GPUs")
                print(f"{'stage':<26}{'host us':>10}{'GPU us':>10}{'host us':>10}{'GPU us':>10}")
                print(f"{'':<26}{'(slowest rank)':>20}{'(rank 0)':>20}")
                totals = {"dispatch": [0.0] * 4, "combine": [0.0] * 4}
                for i, stage in enumerate(stages):
                    row = [float(slowest[2 * i]), float(slowest[2 * i + 1]),
                           float(mine[2 * i]), float(mine[2 * i + 1])]
                    print(f"{stage:<26}" + "".join(f"{v:>10.1f}" for v in row))
                    op = stage.split(":")[0]
                    if op in totals:
                        totals[op] = [a + b for a, b in zip(totals[op], row)]
                for op, row in totals.items():
                    print(f"{op + ' (sum of stages)':<26}" + "".join(f"{v:>10.1f}" for v in row))
                python = sum(float(mine[2 * i]) for i, s in enumerate(stages)
                             if s.split(": ")[-1] in ("checks", "alloc", "handle", "(return)"))
                print(f"rank 0 host time outside kernel launches and the sync (checks, alloc, "
                      f"handle, return; marks included): {python:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["nccl", "ipc", "nvshmem"])
    parser.add_argument("--fp8", action="store_true", help="also time FP8 dispatch")
    parser.add_argument("--sync-free", action="store_true",
                        help="also time dispatch(sync=False) (ipc, nvshmem)")
    parser.add_argument("--graph", action="store_true",
                        help="also time ipc/nvshmem sync-free dispatch and combine captured in "
                             "CUDA graphs (replayed; no host work per call)")
    parser.add_argument("--dedup", action="store_true",
                        help="also time ipc/nvshmem with dedup_rows=True (one row per token and "
                             "owner); with --sync-free the sync-free rows use it too")
    parser.add_argument("--owner", action="store_true",
                        help="also time ipc/nvshmem with reduce_on_owner=True (one row per token "
                             "and owner both ways; its match column allows the bfloat16 "
                             "rounding of each owner's partial sum) in the --sync-free and "
                             "--graph modes given")
    parser.add_argument("--two-kernel", action="store_true",
                        help="also time each ipc/nvshmem variant with pipelined=False (rows "
                             "NAME/2k: scatter, barrier, unpack; return, barrier, reduce) and "
                             "pipelined=True (NAME/pl)")
    parser.add_argument("--zero-copy", action="store_true",
                        help="also time each ipc/nvshmem variant with zero_copy=True (rows "
                             "NAME/zc: x_RD a view of the buffer; one row per slot is stored "
                             "straight at its final row on the owner)")
    parser.add_argument("--grids", nargs="*", default=[], metavar="DB,DP,CB,CP[,CR[,PH]]",
                        help="also time ipc (ipc/zc with --zero-copy) with these pipelined-kernel "
                             "grids (dispatch blocks per SM, percent senders, combine blocks per "
                             "SM, percent senders, optionally the dispatch's rows per chunk and "
                             "the combine's token phases)")
    parser.add_argument("--breakdown", action="store_true",
                        help="per-stage host/GPU times of ipc/nvshmem dispatch + combine "
                             "(default shape: the decode size) instead of the table")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", default="all", help="'all' or e.g. '4096x7168x8,128x7168x8'")
    parser.add_argument("--json", help="rank 0 writes the result rows here")
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.breakdown and args.shapes == "all":
        args.shapes = "x".join(map(str, DECODE))
    shapes = SHAPES if args.shapes == "all" else [
        tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if "nccl" not in args.backends and not args.breakdown:
        args.backends.insert(0, "nccl")  # the baseline is always measured in the same run
    if "nvshmem" in args.backends:  # one heap for the whole run (dispatchers come and go)
        largest = max(BufferLayout.plan(capacity=_capacity(t, k), hidden=d, dtype=torch.bfloat16,
                                        world_size=world, num_experts=args.experts,
                                        max_send_rows=t * k).total_bytes for t, d, k in shapes)
        os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(int(largest * 1.25) + (512 << 20)))
    if args.breakdown:
        _breakdown_main(args, shapes, world, rank, device)
    else:
        _table_main(args, shapes, world, rank, device)
    if "nvshmem" in args.backends:
        from nmoe_comm import nvshmem

        nvshmem.finalize()
    dist.destroy_process_group()


def _table_main(args, shapes, world, rank, device) -> None:
    """The default run: the timing table of every variant against nccl, the verdicts, JSON."""
    variants = [(b, False, True, False, False) for b in args.backends]
    if args.fp8:
        variants += [(b, True, True, False, False) for b in args.backends]
    rdep_backends = [b for b in args.backends if b != "nccl"]
    if args.two_kernel:  # both paths forced, beside the dispatcher's own choice, same run
        extra = [b + mode for b in rdep_backends for mode in ("/2k", "/pl")]
        variants += [(b, False, True, False, False) for b in extra]
        rdep_backends += extra
    if args.zero_copy:  # zero-copy outputs beside the dispatcher's own, same run
        extra = [b + "/zc" for b in rdep_backends if "/" not in b]
        variants += [(b, False, True, False, False) for b in extra]
        rdep_backends += extra
    for grid in args.grids:  # pipelined grid variants of ipc, same run
        extra = [f"ipc{'/zc' if args.zero_copy else ''}@{grid}"]
        variants += [(b, False, True, False, False) for b in extra]
        rdep_backends += extra
    if args.dedup:
        variants += [(b, False, True, True, False) for b in rdep_backends]
    if args.sync_free:
        variants += [(b, False, False, args.dedup, False) for b in rdep_backends]
    if args.graph:  # with --dedup: both, the decode verdicts name each
        variants += [(b, False, False, dedup, True) for b in rdep_backends
                     for dedup in ((False, True) if args.dedup else (False,))]
    if args.owner:
        variants += [(b, False, False, "owner", graph) for b in rdep_backends
                     for graph, on in ((False, args.sync_free), (True, args.graph)) if on]
    meta = dict(device=torch.cuda.get_device_name(device), gpus=world, torch=torch.__version__,
                cuda=torch.version.cuda, driver=_driver_version() if rank == 0 else None)
    rows = []
    for shape in shapes:
        if rank == 0:
            print(f"shape T={shape[0]} D={shape[1]} K={shape[2]}, E={args.experts}, {world} GPUs")
        rows += _bench_shape(shape, variants, args, world, rank, device, meta)
    if rank == 0:
        print(f"\n{meta['device']} x{world}, torch {meta['torch']}, CUDA {meta['cuda']}, "
              f"driver {meta['driver']}")
        print(f"{'backend':<18}{'T x D x K':>18}{'op':>18}{'us':>10}{'GB/s/rank':>11}"
              f"{'x nccl':>8}{'match':>7}")
        for r in rows:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            print(f"{r['backend']:<18}{'x'.join(map(str, r['shape'])):>18}{r['op']:>18}"
                  f"{r['time_us']:>10.1f}{r['gb_per_s']:>11.1f}{ratio:>8}{str(r['match']):>7}")
        print("\n" + "\n".join(_verdicts(rows)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
