"""Paired A/B timing of FP8 grouped-GEMM kernel variants (`bench_grouped_fp8.parse_variant`).

The H100's clock and power state moves single timings by up to 30% over a run
(`bench/results/fp8_H100_first_rule.txt`), more than the few percent a kernel change is worth.
`bench_grouped_fp8.py --clusters` times each variant once per round-robin pass; this script
instead times the variants back to back in many short rounds (each variant ``--iters`` calls
per round, the order rotated every round) and reports, per variant, the median over rounds of
its time divided by the first variant's time *in the same round*: a drift slower than one round
(~0.1 s) cancels in the ratio.

    python bench/ab_fp8.py --variants 2x1eW,2x1eWh --shapes dsv3-local,deepgemm --rounds 40

Prints one line per (shape, variant) and writes them with every round's times to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grouped_fp8 as bench  # noqa: E402


def operands(shape: str, op: str, gen: torch.Generator):
    """(xq, xs, wq, ws, offsets, flops) of a MoE shape's ``op`` GEMM (w13: K = D, N = 2F;
    w2: K = F, N = D), or of DeepGEMM's shape."""
    if shape == "deepgemm":
        groups, rows_per_group, n, k = bench.DEEPGEMM_SHAPE
        num_rows = groups * rows_per_group
        offsets = torch.arange(0, num_rows + 1, rows_per_group, dtype=torch.int32, device="cuda")
        num_experts = groups
    else:
        if shape not in bench.MOE_SHAPES:
            raise SystemExit(f"--shapes: unknown shape {shape!r}; known: deepgemm, "
                             f"{', '.join(bench.MOE_SHAPES)}")
        num_tokens, top_k, d, f, num_experts = bench.MOE_SHAPES[shape]
        k, n = (d, 2 * f) if op == "w13" else (f, d)
        num_rows = num_tokens * top_k
        offsets = bench.routed_offsets(num_tokens, top_k, num_experts, gen).cuda()
    x = torch.randn(num_rows, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = bench.quantize_1x128(x)
    _, wq, ws, _, _ = bench.quantized_weights(num_experts, n, k)
    return xq, xs, wq, ws, offsets, 2 * num_rows * n * k


def ab_rounds(fns: dict, rounds: int, iters: int) -> dict:
    """{name: [ms per round]}: every round times each callable `iters` calls (median), the
    order rotated by one each round and reversed on odd rounds."""
    names = list(fns)
    times: dict = {name: [] for name in names}
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        if rnd % 2:
            order.reverse()
        for name in order:
            times[name].append(bench.median_ms(fns[name], iters=iters, warmup=2))
    return times


def summarize(times: dict, flops: int) -> list[dict]:
    """Per variant: median ms, TFLOP/s, and the median / min / max of its per-round ratio to the
    first variant's time (< 1: faster than the first)."""
    names = list(times)
    base = times[names[0]]
    out = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base, strict=True)]
        ms = statistics.median(times[name])
        out.append(dict(variant=name, ms=ms, tflops=flops / ms / 1e9,
                        ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                        ratio_max=max(ratios),
                        faster_rounds=sum(r < 1.0 for r in ratios), rounds=len(ratios)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", required=True,
                        help="comma-separated kernel variants, the first the reference, e.g. "
                        "2x1eW,2x1eWh (flags: bench_grouped_fp8.py --clusters)")
    parser.add_argument("--shapes", default="dsv3-local,deepgemm,moonlight")
    parser.add_argument("--op", default="w13", choices=("w13", "w2"),
                        help="the MoE shapes' GEMM: w13 (K = D, N = 2F) or w2 (K = F, N = D)")
    parser.add_argument("--epilogue", default="bf16", choices=("bf16", "swiglu_quant"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--iters", type=int, default=10, help="calls per variant per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if len(variants) < 2:
        raise SystemExit("--variants: list at least two, the first is the reference")
    for v in variants:
        bench.parse_variant(v)  # a clear error before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("ab_fp8.py needs a CUDA GPU (sm_90a)")
    card = torch.cuda.get_device_name()
    print(f"device: {card}  torch {torch.__version__}  rounds {args.rounds} x {args.iters} calls")
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in [s for s in args.shapes.split(",") if s]:
        *ops, flops = operands(shape, args.op, gen)
        fns = {}
        for v in variants:
            fn = bench.cluster_variant(args.epilogue, v, *ops)
            if fn is None:
                print(f"  {shape}: {v} skipped (N is not a whole number of its tiles)")
                continue
            fn()  # compile and load outside the timed rounds
            fns[v] = fn
        torch.cuda.synchronize()
        if len(fns) < 2:
            continue
        times = ab_rounds(fns, args.rounds, args.iters)
        summary = summarize(times, flops)
        for r in summary:
            print(f"{shape:11s} {args.op:3s} {args.epilogue:12s} {r['variant']:10s} "
                  f"{r['ms']:7.3f} ms "
                  f"{r['tflops']:7.1f} TFLOP/s  x{r['ratio_median']:.4f} of {next(iter(fns))} "
                  f"(min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f}, faster in "
                  f"{r['faster_rounds']}/{r['rounds']} rounds)")
        results.append(dict(shape=shape, op=args.op, epilogue=args.epilogue, card=card,
                            variants=summary, times_ms=times))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
