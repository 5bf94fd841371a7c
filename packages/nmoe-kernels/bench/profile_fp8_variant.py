"""Launch one FP8 grouped GEMM kernel variant a few times, for a profiler (Nsight Compute).

    ncu --clock-control none -k regex:kernel_cutlass --launch-skip 2 --launch-count 1 \
        python packages/nmoe-kernels/bench/profile_fp8_variant.py moonlight swiglu_quant 1x1o

Arguments: shape (a `bench_grouped_fp8.MOE_SHAPES` name), epilogue ("bf16" or "swiglu_quant"),
variant (`bench_grouped_fp8.parse_variant`: "<M>x<N>" cluster, then flags; or ``torch`` for the
baseline ``torch._scaled_grouped_mm`` with rowwise scales, epilogue "bf16" -- profile it with
``-k regex:device_kernel`` since its kernel is not one of ours). The operands are the benchmark's
(uniform random routing, random data); the kernel runs ``--iters`` times (default 4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_grouped_fp8 import (  # noqa: E402
    MOE_SHAPES,
    cluster_variant,
    quantize_1x128,
    quantized_weights,
    routed_offsets,
    rowwise_quant,
    scaled_grouped_mm,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(MOE_SHAPES))
    parser.add_argument("epilogue", choices=["bf16", "swiglu_quant"])
    parser.add_argument("variant")
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()
    num_tokens, top_k, d, f, num_experts = MOE_SHAPES[args.shape]
    gen = torch.Generator().manual_seed(0)
    offsets = routed_offsets(num_tokens, top_k, num_experts, gen).cuda()
    x = torch.randn(num_tokens * top_k, d, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_1x128(x)
    _, wq, ws, w_row, w_row_scale = quantized_weights(num_experts, 2 * f, d)
    if args.variant == "torch":
        if args.epilogue != "bf16":
            raise SystemExit("the torch baseline has only the bf16 epilogue")
        xq_row, x_row_scale = rowwise_quant(x)
        ends = offsets[1:].contiguous()

        def fn():
            return scaled_grouped_mm(xq_row, x_row_scale, w_row, w_row_scale, ends)
    else:
        fn = cluster_variant(args.epilogue, args.variant, xq, xs, wq, ws, offsets)
    if fn is None:
        raise SystemExit(f"variant {args.variant!r} does not apply to {args.epilogue}")
    for _ in range(args.iters):
        fn()
    torch.cuda.synchronize()
    print(f"ran {args.shape} {args.epilogue} [{args.variant}] x {args.iters}")


if __name__ == "__main__":
    main()
