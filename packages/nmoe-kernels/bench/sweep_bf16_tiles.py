"""Sweep the BF16 grouped GEMM's output tile width (BN), tile order and thread-block cluster at
the shapes where the default misses its target, against torch._grouped_mm in the same run (one
Hopper GPU).

    python packages/nmoe-kernels/bench/sweep_bf16_tiles.py [--json out.json] [--iters 20] \
        [--passes 3] [--cases dsv3-local:wgrad_w2,...] [--tile-n 256 ...] \
        [--rasters n m b4 ...] [--clusters 1x1 2x1 1x2] [--base-kernel old/grouped_gemm_bf16.py]

Every configuration asked for (BN in {128, 192, 256}; tile orders "n", "m" and bands "b<G>",
`nmoe_kernels.cute.scheduler`; clusters "<along M>x<along N>"; what is not asked for stays at
each case's default) is compiled and checked bitwise
against the default configuration's output (none of them changes the K order of an output
element's sum). Then ``--passes`` round-robin passes time torch and every configuration, each a
CUDA-event median of ``--iters`` calls, in an order that rotates from pass to pass; the table
gives the median over the passes (and their spread), so configurations are compared under the
same clock and power state. The row marked ``*`` is the default (`choose_tile_n`, `RASTER`,
`CLUSTER`). ``--base-kernel`` adds a row "base": the kernel module at that path (e.g. another
commit's ``grouped_gemm_bf16.py``, from ``git show``) compiled with each case's default BN and
order, one CTA, timed in the same passes: an A/B of a kernel change. Shapes and inputs as in
bench_grouped_bf16.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import statistics
import sys

import torch
from bench_common import finish_report, median_ms  # same directory
from bench_grouped_bf16 import SHAPES, expert_offsets

import nmoe_kernels
from nmoe_kernels import grouped_gemm
from nmoe_kernels.cute import grouped_gemm_bf16 as kmod
from nmoe_kernels.cute.scheduler import RASTERS

OPS = ("fwd_w2", "swiglu_w13", "dgrad_w13", "dgrad_w2", "wgrad_w13", "wgrad_w2")
KERNEL_OP = {"fwd_w2": "fwd", "swiglu_w13": "swiglu", "dgrad_w13": "dgrad", "dgrad_w2": "dgrad",
             "wgrad_w13": "wgrad", "wgrad_w2": "wgrad"}
# (shape, op): the default cases, rows that missed their targets in an H100 table
# (bench/results/bf16_H100*.txt).
CASES = (
    ("dsv3-local", "fwd_w2"),
    ("dsv3-local", "wgrad_w2"),
    ("dsv3-local", "wgrad_w13"),
    ("dsv3-local", "dgrad_w2"),
    ("moonlight", "dgrad_w2"),
)


def parse_cluster(text: str) -> tuple[int, int]:
    m, _, n = text.partition("x")
    if not (m.isdigit() and n.isdigit()) or int(m) not in (1, 2) or int(n) not in (1, 2):
        raise argparse.ArgumentTypeError(f"cluster must be <1|2>x<1|2>, got {text!r}")
    return int(m), int(n)


class Config:
    """One (BN, tile order, cluster) configuration of the public ops, with its own compiled
    kernels (swapped into `grouped_gemm`'s cache while it runs)."""

    def __init__(self, tile_n: int, raster: str, cluster: tuple[int, int], module=None):
        self.tile_n, self.raster, self.cluster = tile_n, raster, cluster
        self.module = module  # another kernel module (--base-kernel), or None for this tree's
        self.cache: dict = {}

    def run(self, fn):
        saved = (kmod.choose_tile_n, dict(grouped_gemm.RASTER), dict(grouped_gemm.CLUSTER),
                 dict(grouped_gemm._compiled), grouped_gemm.wgrad_tile_n)
        if self.module is not None:  # the public ops import compile_kernel at compile time
            sys.modules[kmod.__name__] = self.module
        kmod.choose_tile_n = lambda gemm_n, op: self.tile_n
        grouped_gemm.wgrad_tile_n = lambda dim_n, num_rows, num_experts: self.tile_n
        for op in grouped_gemm.RASTER:
            grouped_gemm.RASTER[op] = self.raster
            grouped_gemm.CLUSTER[op] = self.cluster
        grouped_gemm._compiled.clear()
        grouped_gemm._compiled.update(self.cache)
        try:
            return fn()
        finally:
            sys.modules[kmod.__name__] = kmod
            self.cache.update(grouped_gemm._compiled)
            kmod.choose_tile_n = saved[0]
            grouped_gemm.wgrad_tile_n = saved[4]
            grouped_gemm.RASTER.update(saved[1])
            grouped_gemm.CLUSTER.update(saved[2])
            grouped_gemm._compiled.clear()
            grouped_gemm._compiled.update(saved[3])


def load_base_kernel(path: str):
    """The kernel module at ``path`` under a name of its own, wrapped so that the public ops can
    compile from it: keyword arguments its ``compile_kernel`` lacks (``cluster``, ``tile_n``)
    must be at their defaults (one CTA, the kernel's own BN) and are dropped."""
    spec = importlib.util.spec_from_file_location("nmoe_base_grouped_gemm_bf16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accepted = set(inspect.signature(module.compile_kernel).parameters)
    compile_base = module.compile_kernel

    def compile_kernel(*args, **kwargs):
        defaults = {"cluster": (1, 1), "tile_n": None}
        for name in set(kwargs) - accepted:
            value = kwargs[name]
            if name not in defaults or (tuple(value) if name == "cluster" else value) != (
                    defaults[name]):
                raise ValueError(f"--base-kernel: its compile_kernel has no {name!r}")
            del kwargs[name]
        return compile_base(*args, **kwargs)

    module.compile_kernel = compile_kernel
    module.choose_tile_n = kmod.choose_tile_n  # patched per configuration like this tree's
    return module


def make_case(shape: str, op: str, wgrad_dtype: torch.dtype = torch.float32):
    """(ours, baseline, flops, GEMM N, default tile order, default cluster) for one case, on
    fresh random inputs; wgrad writes ``wgrad_dtype`` (the trainer's float32 by default)."""
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
                lambda: torch._grouped_mm(a, w, offs=ends), 2 * rows * dim * ffn, dim,
                grouped_gemm.RASTER["fwd"],
                grouped_gemm.choose_cluster("fwd", ffn, dim, rows, experts))
    if op == "swiglu_w13":
        x = torch.randn(rows, dim, **bf)
        w = torch.randn(experts, dim, 2 * ffn, **bf) / dim**0.5

        def torch_swiglu():
            h = torch._grouped_mm(x, w, offs=ends)
            return torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
        return (lambda: nmoe_kernels.grouped_gemm_bf16_swiglu(x, w, offsets), torch_swiglu,
                2 * rows * dim * 2 * ffn, 2 * ffn, grouped_gemm.RASTER["swiglu"],
                grouped_gemm.choose_cluster("swiglu", dim, 2 * ffn, rows, experts))
    if op in ("dgrad_w2", "dgrad_w13"):
        k_in, n = (ffn, dim) if op == "dgrad_w2" else (dim, 2 * ffn)
        dy = torch.randn(rows, n, **bf)
        w = torch.randn(experts, k_in, n, **bf) / k_in**0.5
        return (lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dy, w, offsets),
                lambda: torch._grouped_mm(dy, w.transpose(-2, -1), offs=ends),
                2 * rows * k_in * n, k_in, grouped_gemm.RASTER["dgrad"],
                grouped_gemm.choose_cluster("dgrad", k_in, n, rows, experts))
    n = dim if op == "wgrad_w2" else 2 * ffn
    k_in = ffn if op == "wgrad_w2" else dim
    xa = torch.randn(rows, k_in, **bf)
    dy = torch.randn(rows, n, **bf)
    # The trainer's wgrad writes float32 (no rounding of the master weights' gradient).
    return (lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(xa, dy, offsets, out_dtype=wgrad_dtype),
            lambda: torch._grouped_mm(xa.t(), dy, offs=ends), 2 * rows * k_in * n, n,
            grouped_gemm.wgrad_raster(k_in, n, rows, experts),
            grouped_gemm.choose_cluster("wgrad", k_in, n, rows, experts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3,
                        help="round-robin passes over torch and every configuration")
    parser.add_argument("--cases", help="shape:op list, comma separated (default: the misses)")
    parser.add_argument("--tile-n", type=int, nargs="+", choices=[128, 192, 256],
                        help="tile widths (default: each case's own, `choose_tile_n`)")
    parser.add_argument("--rasters", nargs="+", choices=RASTERS,
                        help="tile orders inside an expert (bands b<G>: G row blocks per band; "
                             "default: each case's own)")
    parser.add_argument("--clusters", nargs="+", type=parse_cluster,
                        help="thread-block clusters <CTAs along M>x<CTAs along N>, e.g. 2x1 "
                             "(default: each case's own, `choose_cluster`)")
    parser.add_argument("--wgrad-dtype", choices=["f32", "bf16"], default="f32",
                        help="dw's dtype in the wgrad cases (the trainer's float32 by default)")
    parser.add_argument("--base-kernel", help="path of another grouped_gemm_bf16.py to time "
                        "as row 'base' (one CTA, each case's default BN and order)")
    args = parser.parse_args()
    cases = CASES
    if args.cases:
        cases = tuple(tuple(c.split(":")) for c in args.cases.split(","))
        for shape, op in cases:
            if shape not in SHAPES or op not in OPS:
                parser.error(f"--cases: want shape:op with shape in {sorted(SHAPES)} and op in "
                             f"{OPS}, got {shape}:{op}")
    base_module = load_base_kernel(args.base_kernel) if args.base_kernel else None
    rows_out = []
    print(f"{'shape':<11}{'op':<11}{'BN':>4}{'order':>6}{'clus':>5}{'ms':>9}{'spread':>14}"
          f"{'TFLOP/s':>9}{'torch ms':>10}{'ratio':>7}  same bits")
    for shape, op in cases:
        ours, base, flops, gemm_n, default_raster, default_cluster = make_case(
            shape, op, torch.float32 if args.wgrad_dtype == "f32" else torch.bfloat16)
        tokens, top_k, _, _, experts = SHAPES[shape]
        default_bn = kmod.choose_tile_n(gemm_n, KERNEL_OP[op])
        if KERNEL_OP[op] == "wgrad":
            default_bn = grouped_gemm.wgrad_tile_n(gemm_n, tokens * top_k, experts) or default_bn
        reference = ours()
        configs = [Config(t, r, c) for t in args.tile_n or [default_bn]
                   for r in args.rasters or [default_raster]
                   for c in args.clusters or [default_cluster]]
        if base_module is not None:
            configs.append(Config(default_bn, default_raster, (1, 1), base_module))
        same = []
        for config in configs:  # compile, and check the bits
            got = config.run(ours)
            torch.cuda.synchronize()
            same.append(bool(torch.equal(got, reference)))
            del got
        del reference
        times = [[] for _ in configs]
        base_times = []
        for p in range(args.passes):
            base_times.append(median_ms(base, args.iters, 3))
            order = list(range(len(configs)))
            order = order[p % len(order):] + order[:p % len(order)]
            for i in order:
                times[i].append(configs[i].run(functools.partial(median_ms, ours, args.iters, 3)))
        base_ms = statistics.median(base_times)
        for config, ts, ok in zip(configs, times, same):
            ms = statistics.median(ts)
            is_default = (config.tile_n == default_bn and config.raster == default_raster
                          and config.cluster == default_cluster and config.module is None)
            cl = "base" if config.module else f"{config.cluster[0]}x{config.cluster[1]}"
            row = dict(shape=shape, op=op, tile_n=config.tile_n, raster=config.raster,
                       cluster=cl, default=is_default, time_ms=ms, pass_ms=ts,
                       tflops=flops / ms / 1e9, baseline="torch._grouped_mm", baseline_ms=base_ms,
                       baseline_pass_ms=base_times, ratio=base_ms / ms, same_bits_as_default=ok)
            rows_out.append(row)
            spread = f"{min(ts):.3f}-{max(ts):.3f}"
            print(f"{shape:<11}{op:<11}{config.tile_n:>4}{config.raster:>6}{cl:>5}{ms:>9.3f}"
                  f"{spread:>14}{row['tflops']:>9.1f}{base_ms:>10.3f}{row['ratio']:>7.2f}  {ok}"
                  f"{'  *' if is_default else ''}", flush=True)
    grouped_gemm._compiled.clear()
    finish_report(rows_out, args.json)


if __name__ == "__main__":
    main()
