"""Benchmark the CUDA FP8 1x128 quantize / dequantize ops against the torch reference on the GPU.

    python packages/nmoe-kernels/bench/bench_quant.py [--json out.json]

Baseline: `nmoe_kernels.reference` run eagerly on the same GPU. Prints a table (time, GB/s of
compulsory traffic, speedup vs the baseline) and optionally writes JSON rows with op, shape,
dtype, time, GB/s, baseline, ratio, device name, torch and driver versions.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_common import median_ms  # same directory

import nmoe_kernels
from nmoe_kernels import reference as ref

SHAPES = [(4096, 7168), (16384, 7168), (32768, 2048)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write result rows to this file")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    driver = torch.cuda.get_device_properties(0)
    rows = []
    print(f"{'op':<22}{'shape':>16}{'dtype':>10}{'us':>10}{'GB/s':>9}{'ref us':>10}{'x ref':>8}")
    for num_rows, num_cols in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(num_rows, num_cols, device="cuda", dtype=dtype)
            x_fp8, scales = nmoe_kernels.quantize_fp8_1x128(x)
            quant_bytes = x.numel() * (x.element_size() + 1) + scales.numel() * 4
            dequant_bytes = x.numel() * (1 + 2) + scales.numel() * 4
            cases = [
                (
                    "quantize_fp8_1x128",
                    quant_bytes,
                    lambda x=x: nmoe_kernels.quantize_fp8_1x128(x),
                    lambda x=x: ref.quantize_fp8_1x128(x),
                ),
                (
                    "dequantize_fp8_1x128",
                    dequant_bytes,
                    lambda q=x_fp8, s=scales: nmoe_kernels.dequantize_fp8_1x128(q, s),
                    lambda q=x_fp8, s=scales: ref.dequantize_fp8_1x128(q, s),
                ),
            ]
            for op, nbytes, kernel, baseline in cases:
                ms, ref_ms = median_ms(kernel, 50, 10), median_ms(baseline, iters=10, warmup=2)
                row = dict(
                    op=op,
                    shape=[num_rows, num_cols],
                    dtype=str(dtype),
                    time_us=ms * 1e3,
                    gb_per_s=nbytes / ms / 1e6,
                    baseline="nmoe_kernels.reference (eager)",
                    baseline_us=ref_ms * 1e3,
                    ratio=ref_ms / ms,
                    device=device,
                    torch=torch.__version__,
                    cuda=torch.version.cuda,
                    compute_capability=f"{driver.major}.{driver.minor}",
                )
                rows.append(row)
                print(
                    f"{op:<22}{str((num_rows, num_cols)):>16}{str(dtype)[6:]:>10}"
                    f"{row['time_us']:>10.1f}{row['gb_per_s']:>9.0f}{row['baseline_us']:>10.1f}"
                    f"{row['ratio']:>8.1f}"
                )
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
