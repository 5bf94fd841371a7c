"""Benchmark the CuTeDSL BF16 grouped GEMMs against torch._grouped_mm on one Hopper GPU.

    python packages/nmoe-kernels/bench/bench_grouped_bf16.py [--json out.json] [--shapes super,...]

Shapes (tokens T, top-k, hidden D, expert dim F, experts E; M = T * k rows spread evenly over the
experts): super (32768, 7, 768, 384, 256), moonlight (16384, 6, 2048, 1408, 64), dsv3-local
(8192, 8, 7168, 2048, 32). Rows per expert vary by +-25 % around M / E (fixed seed).

Cases, each against a baseline measured in the same run on the same inputs:
- w13_swiglu: fused W13 GEMM + SwiGLU vs torch._grouped_mm(x, w13) then F.silu(g) * u (torch gets
  gate and up as contiguous halves, its best layout);
- mlp_fwd: the whole expert MLP forward (W13 + SwiGLU + W2) vs the same torch path;
- dgrad_w13 / dgrad_w2: dX = dY W^T vs torch._grouped_mm(dy, w.transpose(-2, -1));
- wgrad_w13 / wgrad_w2: dW[e] = X_e^T dY_e vs torch._grouped_mm(x.t(), dy) (K-grouped);
- "[nk]" rows: the same ops with every weight stored [E, N, K] (passed as the transposed view),
  for torch too; "[m]" rows (--raster-experiment): the grouped-M kernels with the "m" tile order.
Timing: CUDA events around each call, warm-up first, median of the repetitions; with
``--rounds R`` each case is timed R times, ours and torch alternating which goes first, and the
table gives the medians over the rounds (this card's clock and power state drift between
back-to-back timings). The inputs (hundreds of MB) exceed the L2 cache. Each case also checks
that both paths agree (relative RMS).

Under the table: issue 4's BF16 targets (`bench_targets.BF16_TARGETS`: mlp_fwd >= 1.2x, dgrad
and wgrad >= 1.0x at every shape), each met or missed and by how much, and each row's floor
(column ``floor``: % of the floor set by ``c`` compute or ``b`` bytes, from the dense BF16 GEMM
rate and copy bandwidth measured at the start of the run; ``--no-ceilings`` skips them). The
JSON is ``{"rows", "ceilings", "targets"}`` (before 2026-11-28 the bare row list).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from bench_common import median_ms  # same directory
from bench_targets import (  # same directory
    BF16_TARGETS,
    evaluate,
    floor_column,
    floor_fields,
    measure_ceilings,
    print_verdicts,
)

import nmoe_kernels
from nmoe_kernels import grouped_gemm

FUSED = ("w13_swiglu", "mlp_fwd")
SHAPES = {
    "super": (32768, 7, 768, 384, 256),
    "moonlight": (16384, 6, 2048, 1408, 64),
    "dsv3-local": (8192, 8, 7168, 2048, 32),
}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def expert_offsets(num_rows: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    weights = 0.75 + 0.5 * torch.rand(num_experts, generator=gen)
    counts = (weights / weights.sum() * num_rows).floor().long()
    counts[: num_rows - int(counts.sum())] += 1
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()


def min_bytes(op: str, m: int, d: int, f: int, e: int) -> int:
    """Fewest bytes of bf16 case ``op`` (its name without a "[...]" suffix): every input read
    once, the output written once."""
    w13, w2 = e * d * 2 * f, e * f * d
    elements = {
        "w13_swiglu": m * d + w13 + m * f,
        "mlp_fwd": m * d + w13 + w2 + m * d,
        "dgrad_w13": m * 2 * f + w13 + m * d,
        "dgrad_w2": m * d + w2 + m * f,
        "wgrad_w13": m * d + m * 2 * f + w13,
        "wgrad_w2": m * f + m * d + w2,
    }[op.split("[")[0]]
    return 2 * elements


def bench_shape(name: str, iters: int, raster_experiment: bool = False,
                rounds: int = 1, ceilings: dict | None = None) -> list[dict]:
    tokens, top_k, dim, ffn, experts = SHAPES[name]
    rows = tokens * top_k
    gen = torch.Generator().manual_seed(0)
    offsets = expert_offsets(rows, experts, gen).cuda()
    ends = offsets[1:].contiguous()  # torch._grouped_mm takes the segment ends
    dev = "cuda"
    x = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
    w1 = torch.randn(experts, dim, ffn, device=dev, dtype=torch.bfloat16) / dim**0.5
    w3 = torch.randn(experts, dim, ffn, device=dev, dtype=torch.bfloat16) / dim**0.5
    w2 = torch.randn(experts, ffn, dim, device=dev, dtype=torch.bfloat16) / ffn**0.5
    w13 = torch.stack((w1, w3), dim=-1).flatten(-2)  # interleaved (ours)
    w13_cat = torch.cat((w1, w3), dim=-1)  # [gate | up] halves (torch's best layout)
    del w1, w3
    dy2 = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)  # grad of the MLP output
    dh = torch.randn(rows, 2 * ffn, device=dev, dtype=torch.bfloat16)  # grad of x @ w13
    act = torch.randn(rows, ffn, device=dev, dtype=torch.bfloat16)

    def torch_w13_swiglu():
        h = torch._grouped_mm(x, w13_cat, offs=ends)
        return F.silu(h[:, :ffn]) * h[:, ffn:]

    def ours_w13_swiglu():
        return nmoe_kernels.grouped_gemm_bf16_swiglu(x, w13, offsets)

    def torch_mlp():
        return torch._grouped_mm(torch_w13_swiglu(), w2, offs=ends)

    def ours_mlp():
        return nmoe_kernels.grouped_gemm_bf16(ours_w13_swiglu(), w2, offsets)

    w13_t, w2_t = w13.transpose(-2, -1), w2.transpose(-2, -1)
    cases = [
        ("w13_swiglu", 4 * rows * dim * ffn, ours_w13_swiglu, torch_w13_swiglu),
        ("mlp_fwd", 6 * rows * dim * ffn, ours_mlp, torch_mlp),
        (
            "dgrad_w13",
            4 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dh, w13, offsets),
            lambda: torch._grouped_mm(dh, w13_t, offs=ends),
        ),
        (
            "dgrad_w2",
            2 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dy2, w2, offsets),
            lambda: torch._grouped_mm(dy2, w2_t, offs=ends),
        ),
        (
            "wgrad_w13",
            4 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(x, dh, offsets),
            lambda: torch._grouped_mm(x.t(), dh, offs=ends),
        ),
        (
            "wgrad_w2",
            2 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(act, dy2, offsets),
            lambda: torch._grouped_mm(act.t(), dy2, offs=ends),
        ),
    ]
    # The same ops with the weights stored [E, N, K] (nn.Linear layout), for torch as well.
    w13_nk = w13.transpose(1, 2).contiguous().transpose(1, 2)
    w13_cat_nk = w13_cat.transpose(1, 2).contiguous().transpose(1, 2)
    w2_nk = w2.transpose(1, 2).contiguous().transpose(1, 2)

    def torch_w13_swiglu_nk():
        h = torch._grouped_mm(x, w13_cat_nk, offs=ends)
        return F.silu(h[:, :ffn]) * h[:, ffn:]

    def torch_mlp_nk():
        return torch._grouped_mm(torch_w13_swiglu_nk(), w2_nk, offs=ends)

    cases += [
        (
            "w13_swiglu[nk]",
            4 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_swiglu(x, w13_nk, offsets),
            torch_w13_swiglu_nk,
        ),
        (
            "mlp_fwd[nk]",
            6 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16(
                nmoe_kernels.grouped_gemm_bf16_swiglu(x, w13_nk, offsets), w2_nk, offsets
            ),
            torch_mlp_nk,
        ),
        (
            "dgrad_w13[nk]",
            4 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dh, w13_nk, offsets),
            lambda: torch._grouped_mm(dh, w13_nk.transpose(-2, -1), offs=ends),
        ),
        (
            "dgrad_w2[nk]",
            2 * rows * dim * ffn,
            lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dy2, w2_nk, offsets),
            lambda: torch._grouped_mm(dy2, w2_nk.transpose(-2, -1), offs=ends),
        ),
    ]
    if raster_experiment:
        # The same kernels with the other tile order inside an expert (scheduler "m" raster).
        def with_raster(fn):
            def run():
                saved = dict(grouped_gemm.RASTER)
                grouped_gemm.RASTER.update(fwd="m", swiglu="m", dgrad="m")
                try:
                    return fn()
                finally:
                    grouped_gemm.RASTER.update(saved)

            return run

        cases += [
            (op + "[m]", flops, with_raster(ours), baseline)
            for op, flops, ours, baseline in cases
            if not op.startswith("wgrad") and "[" not in op
        ]
    results = []
    for op, flops, ours, baseline in cases:
        got, want = ours(), baseline()
        agree = rel_rms(got, want)
        ours_ms, torch_ms = [], []
        for r in range(rounds):  # ours first in even rounds, torch first in odd ones
            for fn, times in ((ours, ours_ms), (baseline, torch_ms))[:: 1 - 2 * (r % 2)]:
                times.append(median_ms(fn, iters, 3))
        ms, base_ms = statistics.median(ours_ms), statistics.median(torch_ms)
        results.append(
            dict(
                op=op,
                case=name,
                shape=name,
                dims=dict(tokens=tokens, top_k=top_k, D=dim, F=ffn, E=experts, M=rows),
                dtype="bfloat16",
                time_ms=ms,
                tflops=flops / ms / 1e9,
                baseline="torch._grouped_mm"
                + (" + F.silu(g) * u" if op.split("[")[0] in FUSED else ""),
                baseline_ms=base_ms,
                baseline_tflops=flops / base_ms / 1e9,
                ratio=base_ms / ms,
                round_ms=ours_ms,
                baseline_round_ms=torch_ms,
                rel_rms_vs_baseline=agree,
                **floor_fields(flops, min_bytes(op, rows, dim, ffn, experts), ms, ceilings),
            )
        )
        r = results[-1]
        print(
            f"{name:<11}{op:<14}{ms:>9.3f}{r['tflops']:>9.1f}{base_ms:>10.3f}"
            f"{r['baseline_tflops']:>9.1f}{r['ratio']:>8.2f}{agree:>10.1e}{floor_column(r):>8}",
            flush=True,
        )
        del got, want
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write result rows to this file")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each case this many times, alternating ours and torch")
    parser.add_argument(
        "--raster-experiment",
        action="store_true",
        help="also time the grouped-M kernels with the M-major tile order inside each expert",
    )
    parser.add_argument(
        "--no-ceilings",
        action="store_true",
        help="skip measuring the card's dense BF16 GEMM rate and copy bandwidth (the rows' "
        "floors are then left out)",
    )
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    env = dict(
        device=torch.cuda.get_device_name(),
        sms=props.multi_processor_count,
        torch=torch.__version__,
        cuda=torch.version.cuda,
    )
    print(f"{env['device']} ({env['sms']} SMs), torch {env['torch']}, CUDA {env['cuda']}")
    ceilings = None
    if not args.no_ceilings:
        try:
            ceilings = measure_ceilings("bf16", lambda fn: median_ms(fn, args.iters, 3))
            print(f"ceilings: {ceilings['dense']} {ceilings['dense_tflops']:.0f} TFLOP/s, "
                  f"device copy {ceilings['copy_gbs']:.0f} GB/s")
        except Exception as err:  # the table is still worth having without floors
            print(f"  ceiling measurement failed ({type(err).__name__}: {err}); no floors")
        torch.cuda.empty_cache()
    print(
        f"{'shape':<11}{'op':<14}{'ours ms':>9}{'TFLOP/s':>9}{'torch ms':>10}{'TFLOP/s':>9}"
        f"{'ratio':>8}{'rel rms':>10}{'floor':>8}"
    )
    rows = []
    for name in args.shapes.split(","):
        rows += [dict(r, **env) for r in bench_shape(
            name, args.iters, args.raster_experiment, args.rounds, ceilings)]
        torch.cuda.empty_cache()
    verdicts = evaluate(rows, BF16_TARGETS, ceilings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, ceilings=ceilings, targets=verdicts), f, indent=1)
    print_verdicts(verdicts, ceilings)


if __name__ == "__main__":
    main()
