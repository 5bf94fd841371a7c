"""Launch one BF16 grouped GEMM (ours or torch's) a few times, for a profiler (Nsight Compute).

    ncu --clock-control none -k regex:kernel_cutlass --launch-skip 2 --launch-count 1 \
        python packages/nmoe-kernels/bench/profile_bf16_op.py dsv3-local wgrad_w2 ours

Arguments: shape (a `bench_grouped_bf16.SHAPES` name), op (``w2_fwd``, ``dgrad_w2``,
``wgrad_w13``, ``wgrad_w2``: the operands and the torch call of `bench_grouped_bf16`, with
[E, K, N] weights), and ``ours`` or ``torch`` (torch's ``torch._grouped_mm``; its kernel is
CUTLASS's ``cutlass::device_kernel``, so profile it with ``-k regex:device_kernel``). The
operands are random, the expert sizes `bench_grouped_bf16.expert_offsets`'s; the op runs
``--iters`` times (default 4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_grouped_bf16 import SHAPES, expert_offsets  # noqa: E402

import nmoe_kernels  # noqa: E402

OPS = ("w2_fwd", "dgrad_w2", "wgrad_w13", "wgrad_w2")


def make_op(shape: str, op: str, impl: str):
    """A callable running ``op`` at ``shape`` with ``impl`` ("ours" or "torch")."""
    tokens, top_k, dim, ffn, experts = SHAPES[shape]
    rows = tokens * top_k
    offsets = expert_offsets(rows, experts, torch.Generator().manual_seed(0)).cuda()
    ends = offsets[1:].contiguous()

    def rand(*size):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16)

    if op == "w2_fwd":
        act, w2 = rand(rows, ffn), rand(experts, ffn, dim) / ffn**0.5
        ours = lambda: nmoe_kernels.grouped_gemm_bf16(act, w2, offsets)  # noqa: E731
        base = lambda: torch._grouped_mm(act, w2, offs=ends)  # noqa: E731
    elif op == "dgrad_w2":
        dy2, w2 = rand(rows, dim), rand(experts, ffn, dim) / ffn**0.5
        w2_t = w2.transpose(-2, -1)
        ours = lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dy2, w2, offsets)  # noqa: E731
        base = lambda: torch._grouped_mm(dy2, w2_t, offs=ends)  # noqa: E731
    elif op == "wgrad_w13":
        x, dh = rand(rows, dim), rand(rows, 2 * ffn)
        ours = lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(x, dh, offsets)  # noqa: E731
        base = lambda: torch._grouped_mm(x.t(), dh, offs=ends)  # noqa: E731
    else:
        act, dy2 = rand(rows, ffn), rand(rows, dim)
        ours = lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(act, dy2, offsets)  # noqa: E731
        base = lambda: torch._grouped_mm(act.t(), dy2, offs=ends)  # noqa: E731
    return ours if impl == "ours" else base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("op", choices=OPS)
    parser.add_argument("impl", choices=["ours", "torch"])
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()
    fn = make_op(args.shape, args.op, args.impl)
    for _ in range(args.iters):
        fn()
    torch.cuda.synchronize()
    print(f"ran {args.shape} {args.op} [{args.impl}] x {args.iters}")


if __name__ == "__main__":
    main()
