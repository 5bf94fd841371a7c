"""Launch one BF16 grouped GEMM (ours or torch's) a few times, for a profiler (Nsight Compute).

    ncu --clock-control none -k regex:kernel_cutlass --launch-skip 2 --launch-count 1 \
        python packages/nmoe-kernels/bench/profile_bf16_op.py dsv3-local wgrad_w2 ours

Arguments: shape (a `bench_grouped_bf16.SHAPES` name), op (``fwd_w2``, ``dgrad_w2``,
``wgrad_w13``, ``wgrad_w2``: the operands and the torch call of `sweep_bf16_tiles.make_case`, with
[E, K, N] weights and a bfloat16 wgrad output), and ``ours`` or ``torch`` (torch's
``torch._grouped_mm``; its kernel is CUTLASS's ``cutlass::device_kernel``, so profile it with
``-k regex:device_kernel``); the op runs ``--iters`` times (default 4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_grouped_bf16 import SHAPES  # noqa: E402
from sweep_bf16_tiles import OPS, make_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("op", choices=OPS)
    parser.add_argument("impl", choices=["ours", "torch"])
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()
    ours, base, *_ = make_case(args.shape, args.op, wgrad_dtype=torch.bfloat16)
    fn = ours if args.impl == "ours" else base
    for _ in range(args.iters):
        fn()
    torch.cuda.synchronize()
    print(f"ran {args.shape} {args.op} [{args.impl}] x {args.iters}")


if __name__ == "__main__":
    main()
