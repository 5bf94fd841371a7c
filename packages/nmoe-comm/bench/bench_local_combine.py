"""Benchmark the ``local`` backend's slot sum: the CUDA kernel against the torch loop (one GPU).

    python packages/nmoe-comm/bench/bench_local_combine.py [--json out.json] [--iters 50]

Shapes (tokens T, hidden D, top-k K): (32768, 768, 7) (the ``super`` preset, micro-batch 16),
(4096, 7168, 8), (16384, 2048, 6), (128, 7168, 8) (decode) and (8192, 2050, 8) (a row pitch that
is not a multiple of 16 bytes); bf16 rows, routing from a real dispatch over 64 experts (uniform,
K distinct per token). Each op is timed as the median of CUDA-event times over ``--iters`` calls
after warm-up: ``combine`` (with the dispatch's gates) and ``dispatch_backward`` (no gates), each
through `_sum_slots_cuda` (the kernel, one launch) and `_sum_slots_torch` (the baseline,
``4 K`` launches); the two results are compared bitwise first (``match``). GB/s counts the bytes
the op must move: ``T K D`` gathered row elements, ``T D`` output elements, the int64 row index
and (combine) the float32 gate of every slot. Prints a table and writes JSON rows (op, shape,
dtype, time, GB/s, baseline time, ratio, card, torch, CUDA and driver versions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

import torch

from nmoe_comm import LocalDispatcher, _extension
from nmoe_comm.local import _sum_slots_cuda, _sum_slots_torch

SHAPES = [(32768, 768, 7), (4096, 7168, 8), (16384, 2048, 6), (128, 7168, 8), (8192, 2050, 8)]
NUM_EXPERTS = 64


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(num_tokens: int, hidden: int, top_k: int, iters: int, kernel) -> list[dict]:
    dtype = torch.bfloat16
    scores = torch.rand(num_tokens, NUM_EXPERTS, device="cuda")
    gates_TK, ids_TK = scores.topk(top_k, dim=-1)
    dispatcher = LocalDispatcher(NUM_EXPERTS, capacity=num_tokens * top_k, validate=False)
    handle = dispatcher.dispatch(torch.zeros(num_tokens, 1, device="cuda"), ids_TK,
                                 gates_TK).handle
    rows_TK = handle.state.row_of_slot_TK
    y_RD = torch.randn(num_tokens * top_k, hidden, device="cuda").to(dtype)
    item = y_RD.element_size()
    rows = []
    for op, gates in (("combine", handle.gates_TK), ("dispatch_backward", None)):
        got = _sum_slots_cuda(kernel, y_RD, rows_TK, gates)
        want = _sum_slots_torch(y_RD, rows_TK, gates)
        match = torch.equal(got.view(torch.int16), want.view(torch.int16))
        fast = _median_ms(lambda g=gates: _sum_slots_cuda(kernel, y_RD, rows_TK, g), iters)
        base = _median_ms(lambda g=gates: _sum_slots_torch(y_RD, rows_TK, g), iters)
        nbytes = (num_tokens * top_k * hidden * item + num_tokens * hidden * item
                  + num_tokens * top_k * (8 + (4 if gates is not None else 0)))
        rows.append(dict(op=f"local {op} slot sum", shape=dict(T=num_tokens, D=hidden, K=top_k),
                         dtype="bfloat16", time_ms=fast, gbps=nbytes / fast / 1e6,
                         baseline="torch loop (_sum_slots_torch)", baseline_ms=base,
                         ratio=base / fast, match=match))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write the result rows here")
    args = parser.parse_args()
    kernel = _extension.slot_sum_kernel()
    if kernel is None:
        raise SystemExit(f"the slot-sum kernel is missing: {_extension.missing_slot_sum()}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, driver=_driver_version())
    print(f"{meta['device']}, torch {meta['torch']}, CUDA {meta['cuda']}, driver "
          f"{meta['driver']}")
    print(f"{'op':<32} {'T':>6} {'D':>5} {'K':>2} {'kernel ms':>10} {'GB/s':>7} "
          f"{'torch ms':>9} {'ratio':>6} match")
    results = []
    for num_tokens, hidden, top_k in SHAPES:
        for row in bench_shape(num_tokens, hidden, top_k, args.iters, kernel):
            row.update(meta)
            results.append(row)
            print(f"{row['op']:<32} {num_tokens:>6} {hidden:>5} {top_k:>2} "
                  f"{row['time_ms']:>10.3f} {row['gbps']:>7.0f} {row['baseline_ms']:>9.3f} "
                  f"{row['ratio']:>6.1f} {row['match']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not all(row["match"] for row in results):
        raise SystemExit("the kernel and the torch loop disagree on some shape (match=False)")


if __name__ == "__main__":
    main()
