"""Benchmark the FP8 blockscaled grouped GEMMs (CuTeDSL, sm_90a) against torch on one GPU.

    python packages/nmoe-kernels/bench/bench_grouped_fp8.py [--json out.json] [--shapes a,b]

Shapes (routed rows M = tokens x top-k, experts E, hidden D, expert dim F):
super (32768 x 7, D 768, F 384, E 256), moonlight (16384 x 6, D 2048, F 1408, E 64),
dsv3-local (8192 x 8, D 7168, F 2048, E 32); tokens are routed uniformly at random, so segment
lengths are arbitrary (no padding to tile multiples). Plus DeepGEMM's grouped GEMM shape
(4 groups x 8192 rows, N 4096, K 7168).

Rows:
- ``w13_fp8``: `grouped_gemm_fp8_blockscaled` on the W13 GEMM ([M, D] x [E, 2F, D]) vs
  ``torch._scaled_grouped_mm`` with rowwise scales (A [M, D] fp8 row-major, B [E, D, 2F] fp8
  column-major, scale_a [M], scale_b [E, 2F], cumulative int32 offs) -- same FLOPs, coarser
  scaling.
- ``w13_swiglu_quant_fp8``: the fused W13 + SwiGLU + FP8 quantize kernel vs the same baseline.
- ``mlp_fwd_fp8``: quantize_fp8_1x128 (CUDA) + fused W13 + W2 FP8 GEMM vs the BF16 torch path
  (``torch._grouped_mm`` W13, silu(gate) * up, ``torch._grouped_mm`` W2).
- ``deepgemm_shape``: `grouped_gemm_fp8_blockscaled` vs ``torch._scaled_grouped_mm``.
- With ``--clusters 1x1,2x2,1x2o,...``: the same GEMMs (``w13_fp8``, ``w13_swiglu_quant_fp8``,
  ``deepgemm_shape``) once more per listed kernel variant -- cluster shape (CTAs along M x along
  N; the kernel's TMA multicast setting) followed by flags (`VARIANT_FLAGS`; an absent flag is
  off, whatever the default): ``o`` overlapped promotion, ``e`` the next tile's first K block
  under the epilogue, ``f`` rcp.approx sigmoid, ``s`` no epilogue (diagnostic), ``w`` 64 x 256
  tiles (swiglu_quant's earlier layout), ``W`` 128 x 256 tiles (serial promotion), ``t`` an
  expert's row tiles of one column group first (``n_major``), ``l`` a cluster launch attribute
  for one CTA (the launch before 2026-11-27), optionally ``@S`` for S pipeline stages and
  ``%B`` for the tile order in bands of B column groups (`kernel_config`'s ``band``) -- as
  rows ``<op>[c<variant>]``, timed in the same run as the default kernel.

Time is the median of per-call CUDA-event timings after warm-up, calls enqueued back to back
(launch overhead hidden, as in triton's do_bench; before 2026-11-26 each call was timed after a
sync, which counted the host wrapper's launch overhead as GPU time); inputs are random (never
zeros) and far larger than L2. With ``--rounds R`` each shape's rows are timed in R round-robin
passes (every pass times each row once: ours and the baselines, then the variants), medians
reported: on the K = 7168 shapes a kernel's time drifts by up to ~10% within a run with the GPU's
clock and power state. (Before 2026-11-27 the variants were timed in passes of their own after
ours and the baselines, where the same kernel ran up to ~10% slower than in the first group; a
later row of one pass can still run a few % slower: bench/results/fp8_H100_wide.txt, run 5.)
TFLOP/s counts 2 * M * K * N per GEMM.

Under the table: issue 4's FP8 targets (`bench_targets.FP8_TARGETS`), each met or missed and by
how much, and every row's floor (column ``floor``: the row runs at that % of the floor set by
``c`` compute or ``b`` bytes; `bench_targets` says how, from ceilings measured at the start of
the run; ``--no-ceilings`` skips them). The JSON is ``{"rows", "ceilings", "targets"}``; rows
carry op, case, shape, dtype, time, TFLOP/s, baseline, ratio, min_bytes and the floor fields,
device name, torch, CUDA and driver versions (before 2026-11-28 the JSON was the bare row list).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess

import torch
import torch.nn.functional as F
from bench_targets import (  # same directory
    FP8_TARGETS,
    evaluate,
    floor_column,
    floor_fields,
    measure_ceilings,
    print_verdicts,
)

import nmoe_kernels
from nmoe_kernels import reference as ref

MOE_SHAPES = {
    # name: (tokens, top_k, hidden D, expert dim F, experts E)
    "super": (32768, 7, 768, 384, 256),
    "moonlight": (16384, 6, 2048, 1408, 64),
    "dsv3-local": (8192, 8, 7168, 2048, 32),
}
DEEPGEMM_SHAPE = (4, 8192, 4096, 7168)  # groups, rows per group, N, K


def cuda_quantizer_available() -> bool:
    """Whether nmoe_kernels' CUDA extension (quantize_fp8_1x128) is built and loads."""
    try:
        from nmoe_kernels import _C

        return bool(_C.WITH_CUDA)
    except (ImportError, AttributeError):
        return False


HAVE_CUDA_QUANT = cuda_quantizer_available()


def quantize_1x128(x: torch.Tensor):
    """FP8 1x128 quantization with MN-major scales (CUDA kernel, else the torch reference)."""
    if HAVE_CUDA_QUANT:
        return nmoe_kernels.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")
    return ref.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")


def median_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median GPU time of ``fn`` from CUDA events around each call, the calls enqueued back to
    back (one sync at the end, as triton's do_bench): host-side launch overhead overlaps the
    previous call's kernels instead of being timed as idle GPU time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def routed_offsets(num_tokens: int, top_k: int, num_experts: int, gen) -> torch.Tensor:
    """Cumulative [E + 1] offsets of uniformly random top-k routing (distinct experts/token)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    expert_ids = scores.topk(top_k, dim=1).indices.flatten()
    counts = torch.bincount(expert_ids, minlength=num_experts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)


def quantized_weights(num_experts: int, n: int, k: int):
    """Random [E, N, K] bf16 weights -> (fp8 [E, N, K], 128x128 scales, rowwise fp8 + scales)."""
    w = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    wq, ws = ref.quantize_fp8_128x128(w)
    amax = w.float().abs().amax(dim=2).clamp_min(1e-12)  # [E, N] rowwise (per output column)
    w_row = (w.float() / (amax / 448.0).unsqueeze(2)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w, wq, ws, w_row, (amax / 448.0).contiguous()


def rowwise_quant(x: torch.Tensor):
    amax = x.float().abs().amax(dim=1).clamp_min(1e-12)
    scale = (amax / 448.0).contiguous()
    return (x.float() / scale.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def scaled_grouped_mm(xq_row, x_scale, w_row_ENK, w_scale_EN, ends):
    """torch's rowwise-scaled FP8 grouped GEMM: B passed [E, K, N] column-major."""
    return torch._scaled_grouped_mm(
        xq_row,
        w_row_ENK.transpose(-2, -1),
        x_scale,
        w_scale_EN,
        offs=ends,
        out_dtype=torch.bfloat16,
    )


VARIANT_FLAGS = {
    "o": "overlap",  # promote block kb - 1 behind block kb's wgmma
    "e": "epi_overlap",  # next tile's first K block issued before this tile's epilogue
    "f": "fast_silu",  # swiglu_quant: sigmoid through rcp.approx
    "s": "skip_epilogue",  # diagnostic: mainloop only
    "w": "wide",  # 64 x 256 tiles instead of 128 x 128 (swiglu_quant's earlier layout)
    "W": "wide",  # 128 x 256 tiles (serial promotion; needs no "o")
    "t": "n_major",  # tile order: an expert's row tiles of one column group first
    "l": "cluster_launch",  # diagnostic: one CTA launched with a 1 x 1 x 1 cluster attribute
    "h": "early_scales",  # 128 x 256: both halves' scales read before the block's first wait (the
    # public ops' default; a variant without h reads the second half's after its wgmmas)
}


def parse_variant(variant: str) -> tuple[tuple[int, int], dict, tuple[int, int] | None]:
    """"<M>x<N>[flags]" -> (cluster, kernel_config options, tile); absent flags are off."""
    match = re.fullmatch(r"(\d+)x(\d+)([a-zA-Z]*)(?:@(\d))?(?:%(\d+))?", variant)
    if match is None or set(match[3]) - set(VARIANT_FLAGS):
        raise ValueError(f"variant {variant!r}: want <M>x<N> followed by flags from "
                         f"{''.join(VARIANT_FLAGS)}, optionally @<stages> and %<band>")
    cluster = (int(match[1]), int(match[2]))
    flags = match[3]
    opts = {name: flag in flags for flag, name in VARIANT_FLAGS.items() if name != "wide"}
    tile = (64, 256) if "w" in flags else (128, 256) if "W" in flags else None
    if match[4]:  # "@S": S pipeline stages (diagnostic)
        opts["stages"] = int(match[4])
    if match[5]:  # "%B": bands of B column groups (the tile order)
        opts["band"] = int(match[5])
    return cluster, opts, tile


_COMPILED: dict = {}  # (epilogue, variant) -> compiled kernel, shared by the shapes


def cluster_variant(epilogue, variant, xq, xs, wq, ws, offsets):
    """A callable launching the low-level kernel compiled for ``variant`` (`parse_variant`)."""
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    num_rows, k = xq.shape
    num_experts, n, _ = wq.shape
    cluster, opts, tile = parse_variant(variant)
    if epilogue != "swiglu_quant":
        opts.pop("fast_silu")
    if n % g.kernel_config(epilogue, cluster=cluster, tile=tile).sched_n:
        return None  # N is not a whole number of this variant's scheduled tiles
    aligned = (num_rows + 3) // 4 * 4
    if epilogue == "bf16":
        out = torch.empty(num_rows, n, dtype=torch.bfloat16, device="cuda")
        out_sf = out
    else:
        out = torch.empty(num_rows, n // 2, dtype=torch.float8_e4m3fn, device="cuda")
        out_sf = torch.empty(n // 2 // 128, aligned, device="cuda")
    key = (epilogue, variant)
    if key not in _COMPILED:
        _COMPILED[key] = g.compile_kernel(epilogue, False, cluster=cluster, tile=tile, **opts)
    compiled = _COMPILED[key]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    ptrs = [t.data_ptr() for t in (xq, xs, wq, ws, out, out_sf, offsets)]

    def run():
        g.launch(
            compiled, epilogue, *ptrs, num_rows, n, k, num_experts, aligned, num_sms,
            torch.cuda.current_stream().cuda_stream, cluster=cluster, tile=tile,
        )  # fmt: skip

    return run


ROUNDS = 1  # --rounds
CEILINGS: dict | None = None  # measured at the start of main unless --no-ceilings


def timed_rounds(fns: dict) -> dict:
    """Median over ``ROUNDS`` round-robin passes of `median_ms` per callable (each pass times
    every callable once, so a drift of the GPU's clock hits all of them alike). Odd passes run
    in reverse order: a callable timed late in a pass had run up to ~6% slower than the same
    kernel timed early, and alternating spreads that over every row. A callable that raises is
    reported once and gets None."""
    times: dict = {name: [] for name in fns}
    failed: set = set()
    for rnd in range(ROUNDS):
        for name, fn in pass_order(fns, rnd):
            if name in failed:
                continue
            try:
                times[name].append(median_ms(fn))
            except Exception as err:  # report, keep going (e.g. a torch baseline unsupported)
                print(f"  {name} failed: {type(err).__name__}: {err}")
                failed.add(name)
    return {name: statistics.median(ts) if ts else None for name, ts in times.items()}


def pass_order(fns: dict, rnd: int) -> list:
    """(name, callable) pairs of pass ``rnd``: insertion order on even passes, reversed on odd."""
    items = list(fns.items())
    return items[::-1] if rnd % 2 else items


def variant_fns(op: str, epilogue: str, clusters, operands) -> dict:
    """{"<op>[c<variant>]": callable} for the listed kernel variants whose tile fits N."""
    fns = {}
    for variant in clusters:
        fn = cluster_variant(epilogue, variant, *operands)
        if fn is not None:
            fns[f"{op}[c{variant}]"] = fn
    return fns


def variant_rows(names, ms, case, shape, cost, base_name, base_ms, env) -> list[dict]:
    """The rows of the variants ``names`` timed in ``ms`` (a failed one has no row)."""
    return [row(name, case, shape, ms[name], cost, base_name, base_ms, env)
            for name in names if ms[name] is not None]


def fp8_bytes(rows: int, k: int) -> int:
    """Bytes of a [rows, k] FP8 operand with its 1 x 128 fp32 scales."""
    return rows * k + rows * (k // 128) * 4


def weight_bytes(experts: int, n: int, k: int) -> int:
    """Bytes of [E, N, K] FP8 weights with their 128 x 128 fp32 scales."""
    return experts * (n * k + -(-n // 128) * (k // 128) * 4)


def row(op, case, shape, ms, cost, baseline, baseline_ms, env):
    """A table / JSON row; ``cost`` = (FLOPs, fewest bytes moved)."""
    flops, nbytes = cost
    ratio = f"{baseline_ms / ms:.2f}x" if baseline_ms else "n/a"
    print(f"  {op}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s, {ratio} of baseline", flush=True)
    return dict(
        op=op,
        case=case,
        shape=shape,
        dtype="fp8_e4m3 blockscaled -> bf16",
        time_ms=ms,
        tflops=flops / ms / 1e9,
        baseline=baseline,
        baseline_ms=baseline_ms,
        baseline_tflops=flops / baseline_ms / 1e9 if baseline_ms else None,
        ratio=baseline_ms / ms if baseline_ms else None,
        **floor_fields(flops, nbytes, ms, CEILINGS),
        **env,
    )


def bench_moe(name: str, env: dict, gen, clusters=()) -> list[dict]:
    num_tokens, top_k, d, f, num_experts = MOE_SHAPES[name]
    offsets = routed_offsets(num_tokens, top_k, num_experts, gen).cuda()
    ends = offsets[1:].contiguous()
    num_rows = num_tokens * top_k
    x = torch.randn(num_rows, d, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_1x128(x)
    w13, w13q, w13s, w13_row, w13_row_scale = quantized_weights(num_experts, 2 * f, d)
    w2, w2q, w2s, _, _ = quantized_weights(num_experts, d, f)
    xq_row, x_row_scale = rowwise_quant(x)
    shape = dict(rows=num_rows, D=d, F=f, E=num_experts)
    w13_flops = 2 * num_rows * d * 2 * f
    w2_flops = 2 * num_rows * f * d
    w13_in = fp8_bytes(num_rows, d) + weight_bytes(num_experts, 2 * f, d)
    w13_cost = (w13_flops, w13_in + num_rows * 2 * f * 2)  # bf16 out
    sq_cost = (w13_flops, w13_in + fp8_bytes(num_rows, f))  # FP8 out + scales
    # The whole MLP: bf16 x in, both FP8 weights, bf16 out (the intermediates need not move).
    mlp_bytes = num_rows * d * 2 * 2 + weight_bytes(num_experts, 2 * f, d) + weight_bytes(
        num_experts, d, f)
    rows = []

    base_name = "torch._scaled_grouped_mm rowwise"

    def fp8_mlp():
        q, s = nmoe_kernels.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")
        a, a_s = nmoe_kernels.grouped_gemm_fp8_swiglu_quant(q, s, w13q, w13s, offsets)
        return nmoe_kernels.grouped_gemm_fp8_blockscaled(a, a_s, w2q, w2s, offsets)

    w13_EKN = w13.transpose(1, 2)  # [E, D, 2F] column-major view
    w2_EKN = w2.transpose(1, 2)  # [E, F, D] column-major view

    def bf16_mlp():
        h = torch._grouped_mm(x, w13_EKN, offs=ends)
        a = F.silu(h[:, 0::2]) * h[:, 1::2]
        return torch._grouped_mm(a, w2_EKN, offs=ends)

    fns = {
        "base": lambda: scaled_grouped_mm(xq_row, x_row_scale, w13_row, w13_row_scale, ends),
        "w13": lambda: nmoe_kernels.grouped_gemm_fp8_blockscaled(xq, xs, w13q, w13s, offsets),
        "sq": lambda: nmoe_kernels.grouped_gemm_fp8_swiglu_quant(xq, xs, w13q, w13s, offsets),
    }
    if HAVE_CUDA_QUANT:
        fns.update(bf16_mlp=bf16_mlp, fp8_mlp=fp8_mlp)
    else:
        print(f"  {name}: mlp_fwd_fp8 left out (nmoe_kernels._C not built)")
    operands = (xq, xs, w13q, w13s, offsets)
    w13_variants = variant_fns("w13_fp8", "bf16", clusters, operands)
    sq_variants = variant_fns("w13_swiglu_quant_fp8", "swiglu_quant", clusters, operands)
    # the variants in the same passes as the rest
    ms = timed_rounds({**fns, **w13_variants, **sq_variants})
    base_ms = ms["base"]
    rows.append(row("w13_fp8", name, shape, ms["w13"], w13_cost, base_name, base_ms, env))
    rows.append(
        row("w13_swiglu_quant_fp8", name, shape, ms["sq"], sq_cost, base_name, base_ms, env)
    )
    rows += variant_rows(w13_variants, ms, name, shape, w13_cost, base_name, base_ms, env)
    rows += variant_rows(sq_variants, ms, name, shape, sq_cost, base_name, base_ms, env)
    if HAVE_CUDA_QUANT:
        mlp_base = "bf16 torch._grouped_mm W13 + silu*up + W2"
        cost = (w13_flops + w2_flops, mlp_bytes)
        rows.append(
            row("mlp_fwd_fp8", name, shape, ms["fp8_mlp"], cost, mlp_base, ms["bf16_mlp"], env)
        )
    return rows


def bench_deepgemm(env: dict, clusters=(), shape=DEEPGEMM_SHAPE,
                   op: str = "deepgemm_shape") -> list[dict]:
    """A plain grouped GEMM of ``shape`` = (groups, rows per group, N, K): DeepGEMM's by
    default, at another K with ``--deepgemm-k``, any with ``--grouped``."""
    groups, rows_per_group, n, k = shape
    num_rows = groups * rows_per_group
    offsets = torch.arange(0, num_rows + 1, rows_per_group, dtype=torch.int32, device="cuda")
    x = torch.randn(num_rows, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_1x128(x)
    _, wq, ws, w_row, w_row_scale = quantized_weights(groups, n, k)
    xq_row, x_row_scale = rowwise_quant(x)
    cost = (2 * num_rows * n * k,
            fp8_bytes(num_rows, k) + weight_bytes(groups, n, k) + num_rows * n * 2)
    case = f"grouped {groups}:{rows_per_group}:{n}:{k}"
    if op == "deepgemm_shape":
        case = f"deepgemm K={k}"
    variants = variant_fns(op, "bf16", clusters, (xq, xs, wq, ws, offsets))
    ms = timed_rounds({
        "base": lambda: scaled_grouped_mm(xq_row, x_row_scale, w_row, w_row_scale, offsets[1:]),
        "ours": lambda: nmoe_kernels.grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, offsets),
        **variants,
    })  # fmt: skip
    shape = dict(groups=groups, rows_per_group=rows_per_group, N=n, K=k)
    base_name = "torch._scaled_grouped_mm rowwise"
    rows = [row(op, case, shape, ms["ours"], cost, base_name, ms["base"], env)]
    rows += variant_rows(variants, ms, case, shape, cost, base_name, ms["base"], env)
    return rows


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write result rows to this file")
    parser.add_argument(
        "--shapes",
        default="super,moonlight,dsv3-local,deepgemm",
        help="comma-separated subset of super,moonlight,dsv3-local,deepgemm",
    )
    parser.add_argument(
        "--clusters",
        default="",
        help="also time these kernel variants, e.g. 1x1,1x2,2x2,1x2o,1x1oef (CTAs along M x "
        "along N, then flags: o overlapped promotion, e epilogue under the next tile's first "
        "K block, f rcp.approx sigmoid, s no epilogue, w 64x256 tiles, W 128x256 tiles, t n_major "
        "tile order, l one CTA with a cluster launch attribute, h (with W) both halves' scales "
        "read before a K block's first wait; @S: S pipeline stages)",
    )
    parser.add_argument(
        "--deepgemm-k",
        default=str(DEEPGEMM_SHAPE[3]),
        help="comma-separated K values for the deepgemm shape (4 x 8192 rows, N 4096), e.g. "
        "2048,4096,7168: how the kernel variants scale with the reduction depth",
    )
    parser.add_argument(
        "--grouped",
        default="",
        help="also time plain grouped GEMMs of these shapes, E:ROWS:N:K comma-separated (E "
        "experts of ROWS rows each), e.g. the expert MLPs' W2: 32:2048:7168:2048 (dsv3-local), "
        "64:1536:2048:1408 (moonlight), 256:896:768:384 (super); rows 'grouped'",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every row (ours, the baselines, the --clusters variants) in this many "
        "round-robin passes per shape; report medians",
    )
    parser.add_argument(
        "--no-ceilings",
        action="store_true",
        help="skip measuring the card's dense FP8 GEMM rate and copy bandwidth (the rows' "
        "floors are then left out)",
    )
    args = parser.parse_args()
    global ROUNDS, CEILINGS
    ROUNDS = max(1, args.rounds)
    clusters = [c for c in args.clusters.split(",") if c]
    env = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        driver=driver_version(),
    )
    from nmoe_kernels.cute import occupancy

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.cuda.current_device()
    resident = {size: occupancy.max_active_clusters(size, device) for size in (2, 4)}
    print(f"{num_sms} SMs; co-resident clusters of 2 / 4 CTAs: {resident[2]} / {resident[4]}")
    if occupancy._probe_error:
        print(f"  occupancy query failed: {occupancy._probe_error}")
    if not args.no_ceilings:
        try:
            CEILINGS = measure_ceilings("fp8", median_ms)
            print(f"ceilings: {CEILINGS['dense']} {CEILINGS['dense_tflops']:.0f} TFLOP/s, "
                  f"device copy {CEILINGS['copy_gbs']:.0f} GB/s")
        except Exception as err:  # the table is still worth having without floors
            print(f"  ceiling measurement failed ({type(err).__name__}: {err}); no floors")
        torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        if name == "deepgemm":
            for k in (int(v) for v in args.deepgemm_k.split(",")):
                if k <= 0 or k % 128:
                    parser.error(f"--deepgemm-k: K must be a positive multiple of 128, got {k}")
                rows += bench_deepgemm(env, clusters, (*DEEPGEMM_SHAPE[:3], k))
                torch.cuda.empty_cache()
        else:
            rows += bench_moe(name, env, gen, clusters)
        torch.cuda.empty_cache()
    for spec in (s for s in args.grouped.split(",") if s):
        try:
            shape = tuple(int(v) for v in spec.split(":"))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) <= 0 or shape[2] % 128 or shape[3] % 128:
            parser.error(f"--grouped: want E:ROWS:N:K with N and K multiples of 128, got {spec}")
        rows += bench_deepgemm(env, clusters, shape=shape, op="grouped")
        torch.cuda.empty_cache()

    print(
        f"device: {env['device']}  torch {env['torch']}  CUDA {env['cuda']}  "
        f"driver {env['driver']}"
    )
    print(
        f"{'op':<28}{'shape':<44}{'ms':>9}{'TFLOP/s':>9}{'base ms':>9}{'base TF':>9}{'ratio':>7}"
        f"{'floor':>8}"
    )
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["baseline_ms"]:
            base = f"{r['baseline_ms']:9.3f}{r['baseline_tflops']:9.1f}{r['ratio']:7.2f}"
        else:
            base = f"{'n/a':>9}{'n/a':>9}{'n/a':>7}"
        print(f"{r['op']:<28}{shape:<44}{r['time_ms']:9.3f}{r['tflops']:9.1f}{base}"
              f"{floor_column(r):>8}")
    print("baselines: w13_* and deepgemm_shape vs torch._scaled_grouped_mm (rowwise scales); "
          "mlp_fwd_fp8 vs bf16 torch._grouped_mm W13 + silu*up + W2")
    verdicts = evaluate(rows, FP8_TARGETS, CEILINGS)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, ceilings=CEILINGS, targets=verdicts), fh, indent=1)
    print_verdicts(verdicts, CEILINGS)


if __name__ == "__main__":
    main()
