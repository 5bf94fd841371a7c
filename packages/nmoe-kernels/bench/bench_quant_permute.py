"""Benchmark the CUDA weight quantization, SwiGLU + FP8 quantization and permute / unpermute /
gather ops against the torch references on the GPU.

    python packages/nmoe-kernels/bench/bench_quant_permute.py [--json out.json] [--quick]

Baseline: `nmoe_kernels.reference` run eagerly on the same GPU (torch ops, same inputs). Times
are medians over CUDA-event-timed calls after warm-up; every input is larger than L2 (50 MB on
H100/H200), so no rotation is needed. GB/s counts the bytes an op must move once:

- quantize_fp8_128x128: read w, write w_fp8 and scales.
- swiglu_quantize_fp8_1x128: read h [M, 2F], write y_fp8 [M, F] and scales.
- permute: read the ids and the R routed source rows, write x_RD, src_index and counts
  (a source row routed to k experts is counted k times: the kernel reads it k times).
- unpermute: read y_RD, src_index and the gates, write out_TD.
- gather_rows: read the index and R source rows, write R rows.

Prints a table and optionally writes JSON rows (op, shape, dtype, time, GB/s, baseline, ratio,
device, torch and CUDA versions).
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_common import median_ms  # same directory

import nmoe_kernels
from nmoe_kernels import reference as ref


def weight_cases(quick: bool):
    shapes = [(256, 768, 768), (32, 7168, 4096)] if not quick else [(64, 768, 768)]
    for num_mats, n, k in shapes:
        w_ENK = torch.randn(num_mats, n, k, device="cuda", dtype=torch.bfloat16)
        nbytes = w_ENK.numel() * 3 + num_mats * (n // 128) * (k // 128) * 4
        yield (
            "quantize_fp8_128x128",
            f"[{num_mats}, {n}, {k}]",
            nbytes,
            lambda w=w_ENK: nmoe_kernels.quantize_fp8_128x128(w),
            lambda w=w_ENK: ref.quantize_fp8_128x128(w),
        )
        del w_ENK
        w_EKN = torch.randn(num_mats, k, n, device="cuda", dtype=torch.bfloat16)
        yield (
            "quantize_fp8_128x128 (transpose)",
            f"[{num_mats}, {k}, {n}]->[{num_mats}, {n}, {k}]",
            nbytes,
            lambda w=w_EKN: nmoe_kernels.quantize_fp8_128x128(w, transpose=True),
            lambda w=w_EKN: ref.quantize_fp8_128x128(w, transpose=True),
        )
        del w_EKN


def swiglu_cases(quick: bool):
    shapes = [(32768 * 7, 384), (8192 * 8, 2048)] if not quick else [(16384, 768)]
    for rows, features in shapes:
        h = torch.randn(rows, 2 * features, device="cuda", dtype=torch.bfloat16)
        nbytes = h.numel() * 2 + rows * features + rows * (features // 128) * 4
        yield (
            "swiglu_quantize_fp8_1x128",
            f"[{rows}, {2 * features}]",
            nbytes,
            lambda h=h: nmoe_kernels.swiglu_quantize_fp8_1x128(h),
            lambda h=h: ref.swiglu_quantize_fp8_1x128(h),
        )
        del h


def routing_cases(quick: bool):
    shapes = [(32768, 7, 768, 64), (8192, 8, 7168, 256)] if not quick else [(8192, 4, 1024, 64)]
    for num_tokens, top_k, hidden, num_experts in shapes:
        x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
        scores = torch.rand(num_tokens, num_experts, device="cuda")
        ids = scores.topk(top_k, dim=1).indices
        rows = num_tokens * top_k
        shape = f"T={num_tokens} K={top_k} D={hidden} E={num_experts}"
        row_bytes = hidden * 2
        yield (
            "permute",
            shape,
            ids.numel() * 8 + 2 * rows * row_bytes + rows * 8 + num_experts * 8,
            lambda x=x, ids=ids, e=num_experts: nmoe_kernels.permute(x, ids, e),
            lambda x=x, ids=ids, e=num_experts: ref.permute(x, ids, e),
        )
        _, _, src = nmoe_kernels.permute(x, ids, num_experts)
        y = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        gates = torch.rand(num_tokens, top_k, device="cuda")
        yield (
            "unpermute",
            shape,
            rows * row_bytes + rows * 8 + gates.numel() * 4 + num_tokens * row_bytes,
            lambda y=y, s=src, g=gates, t=num_tokens: nmoe_kernels.unpermute(y, s, g, t),
            lambda y=y, s=src, g=gates, t=num_tokens: ref.unpermute(y, s, g, t),
        )
        token_index = torch.div(src, top_k, rounding_mode="floor")
        yield (
            "gather_rows",
            f"T={num_tokens} R={rows} D={hidden}",
            rows * 8 + 2 * rows * row_bytes,
            lambda x=x, i=token_index: nmoe_kernels.gather_rows(x, i),
            lambda x=x, i=token_index: ref.gather_rows(x, i),
        )
        del x, y, src, token_index


def time_cases(cases, baseline: str, baseline_iters: int) -> list[dict]:
    """Time each ``(op, shape, bytes, kernel_fn, baseline_fn)`` case against its baseline on the
    current GPU; print one table row per case and return the JSON rows."""
    device = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    rows = []
    for op, shape, nbytes, kernel, reference in cases:
        ms = median_ms(kernel, iters=30, warmup=5)
        base_ms = median_ms(reference, iters=baseline_iters, warmup=1)
        row = dict(
            op=op,
            shape=shape,
            dtype="bfloat16",
            time_us=ms * 1e3,
            gb_per_s=nbytes / ms / 1e6,
            bytes=nbytes,
            baseline=baseline,
            baseline_us=base_ms * 1e3,
            ratio=base_ms / ms,
            device=device,
            compute_capability=f"{props.major}.{props.minor}",
            torch=torch.__version__,
            cuda=torch.version.cuda,
        )
        rows.append(row)
        print(
            f"{op:<36}{shape:>34}{row['time_us']:>10.1f}{row['gb_per_s']:>8.0f}"
            f"{row['baseline_us']:>11.1f}{row['ratio']:>8.1f}"
        )
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write result rows to this file")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument(
        "--groups",
        default="weights,swiglu,routing",
        help="comma-separated subset of: weights, swiglu, routing",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    rows = []
    header = f"{'op':<36}{'shape':>34}{'us':>10}{'GB/s':>8}{'base us':>11}{'x base':>8}"
    print(header)
    print("-" * len(header))
    groups = {"weights": weight_cases, "swiglu": swiglu_cases, "routing": routing_cases}
    for name in args.groups.split(","):
        rows += time_cases(groups[name](args.quick),
                           "nmoe_kernels.reference (eager torch, same GPU)", baseline_iters=5)
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
