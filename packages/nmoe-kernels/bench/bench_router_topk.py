"""Benchmark the router top-k kernel (`nmoe_kernels.router_topk`) against torch.topk.

    python packages/nmoe-kernels/bench/bench_router_topk.py [--iters 50] [--json out.json]

Baseline: ``torch.topk(scores_TE + bias_E, k).indices``, the MoE router's torch path (an add
kernel, then torch's top-k), on the same GPU and inputs. Shapes (T, E, k): `super` (32768, 256,
7), `moonlight` (16384, 64, 6), dsv3-like (8192, 256, 8) and (32768, 1024, 8). Inputs are
sigmoid(randn) scores and a small random bias; each timed call takes the next of a pool of
distinct input tensors together larger than 4x L2 (50 MB on H100/H200), so no call finds its
scores in L2 from an earlier one. Times are medians of CUDA-event-timed calls after warm-up,
queued back to back behind a sleep kernel (GPU time, no host launch gaps: `median_us`). GB/s
counts the bytes the kernel must move: the float32 scores read once and the int64 ids written.
Prints a table and optionally writes JSON rows (shape, times, ratio, GB/s, device, versions).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_common import finish_report  # same directory

import nmoe_kernels
from nmoe_kernels import reference as ref

SHAPES = [("super", 32768, 256, 7), ("moonlight", 16384, 64, 6), ("dsv3-like", 8192, 256, 8),
          ("E=1024", 32768, 1024, 8)]
POOL_BYTES = 4 * 50 * 2**20


def median_us(fn, inputs, iters: int, warmup: int) -> float:
    """Median GPU time of ``fn(*inputs[i % len(inputs)])`` in microseconds.

    The calls are a few microseconds of GPU work each, less than their host-side launch cost, so
    they are queued behind a ~10 ms sleep kernel with an event between consecutive calls: each
    interval is one call's GPU time, back to back, without host gaps.
    """
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    torch.cuda._sleep(20_000_000)
    events[0].record()
    for i in range(iters):
        fn(*inputs[i % len(inputs)])
        events[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(events[i].elapsed_time(events[i + 1]) * 1e3 for i in range(iters))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write result rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    header = (f"{'shape':<11}{'T':>7}{'E':>6}{'k':>4}{'nmoe us':>10}{'GB/s':>7}"
              f"{'torch us':>10}{'x torch':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, num_rows, num_experts, k in SHAPES:
        pool = max(2, -(-POOL_BYTES // (num_rows * num_experts * 4)))
        inputs = [(torch.randn(num_rows, num_experts, device="cuda").sigmoid_(),
                   torch.randn(num_experts, device="cuda") * 1e-3) for _ in range(pool)]
        scores, bias = inputs[0]
        assert torch.equal(nmoe_kernels.router_topk(scores, bias, k),
                           ref.router_topk(scores, bias, k)), f"{name}: kernel != reference"
        ours = median_us(lambda s, b, k=k: nmoe_kernels.router_topk(s, b, k), inputs,
                         args.iters, 5)
        base = median_us(lambda s, b, k=k: torch.topk(s + b, k).indices, inputs, args.iters, 5)
        nbytes = num_rows * num_experts * 4 + num_rows * k * 8
        row = dict(shape=name, tokens=num_rows, experts=num_experts, top_k=k, time_us=ours,
                   gb_per_s=nbytes / ours / 1e3, baseline="torch.topk(scores + bias, k).indices",
                   baseline_us=base, ratio=base / ours, device=torch.cuda.get_device_name(),
                   compute_capability=f"{props.major}.{props.minor}", torch=torch.__version__,
                   cuda=torch.version.cuda)
        rows.append(row)
        print(f"{name:<11}{num_rows:>7}{num_experts:>6}{k:>4}{ours:>10.1f}{row['gb_per_s']:>7.0f}"
              f"{base:>10.1f}{row['ratio']:>9.2f}")
        del inputs, scores, bias
        torch.cuda.empty_cache()
    finish_report(rows, args.json)


if __name__ == "__main__":
    main()
