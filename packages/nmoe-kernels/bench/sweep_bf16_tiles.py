"""Sweep the BF16 grouped GEMM's output tile width (BN) and tile order at the shapes where the
default misses its target, against torch._grouped_mm in the same run (one Hopper GPU).

    python packages/nmoe-kernels/bench/sweep_bf16_tiles.py [--json out.json] [--iters 20] \
        [--cases dsv3-local:wgrad_w2,...] [--tile-n 256 ...] [--rasters n m b4 ...]

For each (shape, op) the kernel is compiled with every BN in {128, 192, 256} and every tile
order asked for (default "n" and "m"; bands "b<G>", `nmoe_kernels.cute.scheduler`), timed with
CUDA events (median), and checked bitwise against
the default configuration's output (BN only changes which CTA computes an output element, not
the K order of its sum). The row marked ``*`` is the default (`choose_tile_n`, `RASTER`).
Shapes and inputs as in bench_grouped_bf16.py.
"""

from __future__ import annotations

import argparse
import functools

import torch
from bench_common import finish_report, median_ms  # same directory
from bench_grouped_bf16 import SHAPES, expert_offsets

import nmoe_kernels
from nmoe_kernels import grouped_gemm
from nmoe_kernels.cute import grouped_gemm_bf16 as kmod
from nmoe_kernels.cute.scheduler import RASTERS

OPS = ("fwd_w2", "dgrad_w2", "wgrad_w13", "wgrad_w2")
# (shape, op): the cases below their targets in bench/results/bf16_H100.txt.
CASES = (
    ("dsv3-local", "fwd_w2"),
    ("dsv3-local", "wgrad_w2"),
    ("dsv3-local", "wgrad_w13"),
    ("dsv3-local", "dgrad_w2"),
    ("moonlight", "dgrad_w2"),
)


def _with_config(tile_n: int, raster: str, fn):
    """Run ``fn`` with the kernels compiled for BN = ``tile_n`` and the tile order ``raster``;
    the compile cache is cleared around it so the defaults come back after."""
    saved_choose, saved_raster = kmod.choose_tile_n, dict(grouped_gemm.RASTER)
    kmod.choose_tile_n = lambda gemm_n, op: tile_n
    grouped_gemm.RASTER.update(fwd=raster, swiglu=raster, dgrad=raster, wgrad=raster)
    grouped_gemm._compiled.clear()
    try:
        out = fn()
        torch.cuda.synchronize()
        return out
    finally:
        kmod.choose_tile_n = saved_choose
        grouped_gemm.RASTER.clear()
        grouped_gemm.RASTER.update(saved_raster)


def make_case(shape: str, op: str, wgrad_dtype: torch.dtype = torch.float32):
    """(ours, baseline, flops, GEMM N, grouped-M, default tile order) for one case, on fresh
    random inputs; wgrad writes ``wgrad_dtype`` (the trainer's float32 by default)."""
    tokens, top_k, dim, ffn, experts = SHAPES[shape]
    rows = tokens * top_k
    gen = torch.Generator().manual_seed(0)
    offsets = expert_offsets(rows, experts, gen).cuda()
    ends = offsets[1:].contiguous()
    bf = dict(device="cuda", dtype=torch.bfloat16)
    if op == "fwd_w2":
        a = torch.randn(rows, ffn, **bf)
        w = torch.randn(experts, ffn, dim, **bf) / ffn**0.5
        return (lambda: nmoe_kernels.grouped_gemm_bf16(a, w, offsets),
                lambda: torch._grouped_mm(a, w, offs=ends), 2 * rows * dim * ffn, dim, True,
                grouped_gemm.RASTER["fwd"])
    if op == "dgrad_w2":
        dy = torch.randn(rows, dim, **bf)
        w = torch.randn(experts, ffn, dim, **bf) / ffn**0.5
        return (lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dy, w, offsets),
                lambda: torch._grouped_mm(dy, w.transpose(-2, -1), offs=ends),
                2 * rows * dim * ffn, ffn, True, grouped_gemm.RASTER["dgrad"])
    n = dim if op == "wgrad_w2" else 2 * ffn
    k_in = ffn if op == "wgrad_w2" else dim
    xa = torch.randn(rows, k_in, **bf)
    dy = torch.randn(rows, n, **bf)
    # The trainer's wgrad writes float32 (no rounding of the master weights' gradient).
    return (lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(xa, dy, offsets, out_dtype=wgrad_dtype),
            lambda: torch._grouped_mm(xa.t(), dy, offs=ends), 2 * rows * k_in * n, n, False,
            grouped_gemm.wgrad_raster(k_in, n, rows, experts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cases", help="shape:op list, comma separated (default: the misses)")
    parser.add_argument("--tile-n", type=int, nargs="+", default=[128, 192, 256],
                        choices=[128, 192, 256])
    parser.add_argument("--rasters", nargs="+", default=["n", "m"], choices=RASTERS,
                        help="tile orders inside an expert (bands b<G>: G row blocks per band)")
    args = parser.parse_args()
    cases = CASES
    if args.cases:
        cases = tuple(tuple(c.split(":")) for c in args.cases.split(","))
        for shape, op in cases:
            if shape not in SHAPES or op not in OPS:
                parser.error(f"--cases: want shape:op with shape in {sorted(SHAPES)} and op in "
                             f"{OPS}, got {shape}:{op}")
    rows_out = []

    def timed(fn):
        return fn(), median_ms(fn, args.iters, 3)

    print(f"{'shape':<11}{'op':<11}{'BN':>4}{'order':>6}{'ms':>9}{'TFLOP/s':>9}"
          f"{'torch ms':>10}{'ratio':>7}  same bits")
    for shape, op in cases:
        ours, base, flops, gemm_n, grouped_m, default_raster = make_case(shape, op)
        default_bn = kmod.choose_tile_n(gemm_n, "wgrad" if not grouped_m else "fwd")
        reference = ours()
        base_ms = median_ms(base, args.iters, 3)
        for tile_n in args.tile_n:
            for raster in args.rasters:
                got, ms = _with_config(tile_n, raster, functools.partial(timed, ours))
                same = bool(torch.equal(got, reference))
                del got
                is_default = tile_n == default_bn and raster == default_raster
                row = dict(shape=shape, op=op, tile_n=tile_n, raster=raster,
                           default=is_default, time_ms=ms, tflops=flops / ms / 1e9,
                           baseline="torch._grouped_mm", baseline_ms=base_ms,
                           ratio=base_ms / ms, same_bits_as_default=same)
                rows_out.append(row)
                print(f"{shape:<11}{op:<11}{tile_n:>4}{row['raster']:>6}{ms:>9.3f}"
                      f"{row['tflops']:>9.1f}{base_ms:>10.3f}{row['ratio']:>7.2f}  {same}"
                      f"{'  *' if is_default else ''}", flush=True)
        del reference
    grouped_gemm._compiled.clear()
    finish_report(rows_out, args.json)


if __name__ == "__main__":
    main()
