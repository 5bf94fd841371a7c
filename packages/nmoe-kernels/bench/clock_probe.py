"""Sustained-load probe: each workload's time per call next to the SM clock and power it ran at.

The H100 this package is measured on runs under a driver power cap that pulls the SM clock down
during long GEMMs (`bench/results/bf16_H100_dsv3_clocks.txt`). A kernel that does more work per
second draws more power and is slowed more, so a same-run ratio to a slower baseline can shrink
exactly when a kernel gets faster. This script separates the two: it runs every workload back
to back for ``--seconds`` (CUDA events around each call) while ``nvidia-smi`` samples the SM
clock, the power draw and the clock-event reasons every ``--sample-ms``, and reports per
workload

- the median time of the first calls (cool card) and of the second half (sustained),
- the sustained TFLOP/s, the median SM clock and power over the second half, the share of
  samples with the driver's software power cap active (reason bit 0x4),
- TFLOP/s per GHz of SM clock: the rate per clock cycle, which a power cap does not move.

    python bench/clock_probe.py --workloads fp8_dense,fp8_w13_dsv3,fp8_w13_dsv3_torch --json p.json

Workloads (`WORKLOADS`): the dense ceilings (``fp8_dense``: torch._scaled_mm 8192^3 on
``randn`` cast to e4m3 with tensor scales, as the benches' ceiling; ``fp8_dense_scaled``: rows
scaled to amax 448 with rowwise scales, the grouped ops' data;
``bf16_dense``: torch.mm 8192^3), the FP8 W13 GEMM at dsv3-local and DeepGEMM's shape (ours:
the public op; ``_torch``: torch._scaled_grouped_mm rowwise; ``_noepi``: our kernel without its
epilogue, variant ``1x1eWhs``; ``@<variant>``: any kernel variant, e.g. ``fp8_w13_dsv3@2x1eWh``),
and the BF16 expert MLP forward at dsv3-local (ours and torch).
Between workloads the card idles ``--gap`` seconds; ``--rounds`` repeats the list, odd rounds in
reverse order.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMI_FIELDS = ["timestamp", "clocks.sm", "power.draw", "temperature.gpu",
              "clocks_event_reasons.active"]
SMI_LIMITS = ["power.limit", "enforced.power.limit", "power.default_limit", "power.max_limit",
              "clocks.max.sm"]
SW_POWER_CAP = 0x4
HW_SLOWDOWN = 0x8 | 0x40 | 0x80  # HW slowdown, HW thermal slowdown, HW power brake


def parse_smi_line(line: str) -> dict | None:
    """One ``--format=csv,noheader,nounits`` line of `SMI_FIELDS` -> {t, mhz, watts, temp,
    reasons}; None for a line that does not parse (nvidia-smi prints "[N/A]" for some fields)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(SMI_FIELDS):
        return None
    try:
        stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
        return dict(t=stamp.timestamp(), mhz=float(parts[1]), watts=float(parts[2]),
                    temp=float(parts[3]), reasons=int(parts[4], 16))
    except ValueError:
        return None


def window_stats(samples: list[dict], t0: float, t1: float) -> dict:
    """Median SM clock, median and max power, and the share of samples with the software
    power cap / a hardware slowdown active, over the samples taken in [t0, t1]."""
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    if not inside:
        return dict(samples=0, mhz=None, watts=None, watts_max=None, power_cap=None,
                    hw_slowdown=None, temp=None)
    return dict(
        samples=len(inside),
        mhz=statistics.median(s["mhz"] for s in inside),
        watts=statistics.median(s["watts"] for s in inside),
        watts_max=max(s["watts"] for s in inside),
        power_cap=sum(bool(s["reasons"] & SW_POWER_CAP) for s in inside) / len(inside),
        hw_slowdown=sum(bool(s["reasons"] & HW_SLOWDOWN) for s in inside) / len(inside),
        temp=max(s["temp"] for s in inside),
    )


def summarize_run(name: str, flops: int, call_ms: list[float], spans: list[tuple[float, float]],
                  samples: list[dict], first: int = 5) -> dict:
    """One workload's row: ``call_ms`` and ``spans`` (host start/end time of each call, known
    after the fact from the events) give the cool-start and sustained medians and the sampling
    window of the sustained half."""
    half = len(call_ms) // 2
    sustained = call_ms[half:]
    ms_sustained = statistics.median(sustained)
    stats = window_stats(samples, spans[half][0], spans[-1][1])
    tflops = flops / ms_sustained / 1e9
    return dict(
        workload=name, calls=len(call_ms), ms_first=statistics.median(call_ms[:first]),
        ms_sustained=ms_sustained, tflops=tflops,
        tflops_per_ghz=tflops / (stats["mhz"] / 1000) if stats["mhz"] else None, **stats,
    )


def choose_reason_field() -> None:
    """Older drivers name the clock-event reasons ``clocks_throttle_reasons``; use whichever
    this nvidia-smi accepts."""
    ok = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS[-1]}", "--format=csv", "-i", "0"],
                        capture_output=True, text=True, check=False).returncode == 0
    if not ok:
        SMI_FIELDS[-1] = "clocks_throttle_reasons.active"


class Sampler:
    """nvidia-smi in the background, one line per ``period_ms``; `stop` returns the samples."""

    def __init__(self, period_ms: int):
        # to a file, not a pipe: a full pipe (~64 KB, about 15 s of samples) would stall it
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}",
             "--format=csv,noheader,nounits", "-lms", str(period_ms), "-i", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> list[dict]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.seek(0)
        out = self.log.read()
        samples = [s for s in map(parse_smi_line, out.splitlines()) if s]
        if not samples:
            raise SystemExit(f"nvidia-smi gave no samples: {out.strip()[:300]}")
        return samples


def smi_limits() -> dict:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(SMI_LIMITS)}", "--format=csv,noheader,nounits",
         "-i", "0"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(SMI_LIMITS, values, strict=False)) if out.returncode == 0 else {}


def build_workloads(names: list[str]) -> dict:
    """{name: (callable, flops)} for the listed `WORKLOADS`, inputs built once."""
    import torch
    import torch.nn.functional as F

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import ab_fp8
    import bench_grouped_fp8 as fp8

    import nmoe_kernels

    gen = torch.Generator().manual_seed(0)
    out: dict = {}
    if "fp8_dense" in names:
        n = 8192
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")  # tensor scales, as bench_targets' ceiling
        out["fp8_dense"] = (lambda a=a, b=b, one=one:
                            torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16),
                            2 * n**3)
    if "fp8_dense_scaled" in names:  # the grouped ops' data: rows scaled to amax 448
        n = 8192
        a, sa = fp8.rowwise_quant(torch.randn(n, n, device="cuda"))
        b, sb = fp8.rowwise_quant(torch.randn(n, n, device="cuda"))
        sa, sb = sa.unsqueeze(1), sb.unsqueeze(0)  # [M, 1] and [1, N]
        out["fp8_dense_scaled"] = (
            lambda a=a, b=b, sa=sa, sb=sb:
            torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16), 2 * n**3)
    if "bf16_dense" in names:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        out["bf16_dense"] = (lambda a=a, b=b: a @ b, 2 * n**3)
    for shape, tag in (("dsv3-local", "dsv3"), ("deepgemm", "deepgemm")):
        wanted = [w for w in names if w.startswith(f"fp8_w13_{tag}")]
        if not wanted:
            continue
        xq, xs, wq, ws, offsets, flops = ab_fp8.operands(shape, "w13", gen)
        if f"fp8_w13_{tag}" in wanted:
            out[f"fp8_w13_{tag}"] = (
                lambda xq=xq, xs=xs, wq=wq, ws=ws, o=offsets:
                nmoe_kernels.grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, o), flops)
        if f"fp8_w13_{tag}_noepi" in wanted:
            out[f"fp8_w13_{tag}_noepi"] = (
                fp8.cluster_variant("bf16", "1x1eWhs", xq, xs, wq, ws, offsets), flops)
        for name in wanted:
            if "@" in name:  # a kernel variant (bench_grouped_fp8.py --clusters syntax)
                fn = fp8.cluster_variant("bf16", name.split("@", 1)[1], xq, xs, wq, ws, offsets)
                if fn is None:
                    raise SystemExit(f"--workloads: {name}: N is not a whole number of its tiles")
                out[name] = (fn, flops)
        if f"fp8_w13_{tag}_torch" in wanted:
            x = torch.randn(xq.shape, device="cuda", dtype=torch.bfloat16)
            xr, xr_s = fp8.rowwise_quant(x)
            num_experts, n, k = wq.shape
            _, _, _, w_row, w_row_s = fp8.quantized_weights(num_experts, n, k)
            ends = offsets[1:].contiguous()
            out[f"fp8_w13_{tag}_torch"] = (
                lambda xr=xr, xr_s=xr_s, w=w_row, s=w_row_s, e=ends:
                fp8.scaled_grouped_mm(xr, xr_s, w, s, e), flops)
    if any(w.startswith("bf16_mlp_dsv3") for w in names):
        tokens, top_k, d, f, num_experts = fp8.MOE_SHAPES["dsv3-local"]
        rows = tokens * top_k
        offsets = fp8.routed_offsets(tokens, top_k, num_experts, gen).cuda()
        ends = offsets[1:].contiguous()
        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
        w13 = torch.randn(num_experts, d, 2 * f, device="cuda", dtype=torch.bfloat16) / d**0.5
        w2 = torch.randn(num_experts, f, d, device="cuda", dtype=torch.bfloat16) / f**0.5
        flops = 6 * rows * d * f
        out["bf16_mlp_dsv3"] = (
            lambda: nmoe_kernels.grouped_gemm_bf16(
                nmoe_kernels.grouped_gemm_bf16_swiglu(x, w13, offsets), w2, offsets), flops)

        def torch_mlp():
            h = torch._grouped_mm(x, w13, offs=ends)
            return torch._grouped_mm(F.silu(h[:, :f]) * h[:, f:], w2, offs=ends)

        out["bf16_mlp_dsv3_torch"] = (torch_mlp, flops)
    missing = [n for n in names if n not in out]
    if missing:
        raise SystemExit(f"--workloads: unknown {missing}; known: {', '.join(WORKLOADS)}")
    return out


WORKLOADS = ("fp8_dense", "fp8_dense_scaled", "fp8_w13_dsv3", "fp8_w13_dsv3_noepi",
             "fp8_w13_dsv3_torch", "fp8_w13_deepgemm", "fp8_w13_deepgemm_torch", "bf16_dense",
             "bf16_mlp_dsv3", "bf16_mlp_dsv3_torch")


def is_variant(name: str) -> bool:
    """``fp8_w13_dsv3@<variant>`` / ``fp8_w13_deepgemm@<variant>``: that kernel variant
    (`bench_grouped_fp8.parse_variant`, checked here) on the shape's W13 operands."""
    shape, _, variant = name.partition("@")
    if shape not in ("fp8_w13_dsv3", "fp8_w13_deepgemm") or not variant:
        return False
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_grouped_fp8 as fp8

    try:
        fp8.parse_variant(variant)
    except ValueError as err:
        raise SystemExit(f"--workloads: {name}: {err}") from None
    return True


def run_sustained(fn, seconds: float) -> tuple[list[float], list[tuple[float, float]]]:
    """Calls ``fn`` back to back for about ``seconds``; per call its event time (ms) and its
    host-clock span, placed by the events' offsets from a host-synchronised first event."""
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    probe = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe[0].record()
    fn()
    probe[1].record()
    torch.cuda.synchronize()
    calls = max(10, int(seconds * 1000 / max(probe[0].elapsed_time(probe[1]), 1e-3)))
    origin = torch.cuda.Event(enable_timing=True)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)]
    torch.cuda.synchronize()
    origin.record()
    origin.synchronize()
    t_origin = time.time()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    call_ms = [s.elapsed_time(e) for s, e in events]
    spans = [(t_origin + origin.elapsed_time(s) / 1e3, t_origin + origin.elapsed_time(e) / 1e3)
             for s, e in events]
    return call_ms, spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seconds", type=float, default=2.0, help="sustained run per workload")
    parser.add_argument("--gap", type=float, default=2.0, help="idle seconds between workloads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample-ms", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS and not is_variant(w)]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("clock_probe.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    choose_reason_field()
    limits = smi_limits()
    print(f"device: {card}  torch {torch.__version__}  limits: {limits}")
    fns = build_workloads(names)
    sampler = Sampler(args.sample_ms)
    time.sleep(1.0)
    runs = []
    for rnd in range(args.rounds):
        order = names[::-1] if rnd % 2 else names
        for name in order:
            time.sleep(args.gap)
            fn, flops = fns[name]
            call_ms, spans = run_sustained(fn, args.seconds)
            runs.append((rnd, name, flops, call_ms, spans))
    samples = sampler.stop()
    rows = []
    print(f"{'workload':24s} rnd calls  ms_first ms_sustd  TFLOP/s   MHz  W(med) W(max) "
          f"cap%  TF/GHz")
    for rnd, name, flops, call_ms, spans in runs:
        r = summarize_run(name, flops, call_ms, spans, samples)
        r["round"] = rnd
        rows.append(r)
        mhz = f"{r['mhz']:5.0f}" if r["mhz"] else "    -"
        watts = f"{r['watts']:6.0f} {r['watts_max']:6.0f}" if r["watts"] else "     -      -"
        cap = f"{100 * r['power_cap']:4.0f}" if r["power_cap"] is not None else "   -"
        per_ghz = f"{r['tflops_per_ghz']:7.1f}" if r["tflops_per_ghz"] else "      -"
        print(f"{name:24s} {rnd:3d} {r['calls']:5d} {r['ms_first']:9.3f} {r['ms_sustained']:8.3f}"
              f" {r['tflops']:8.1f} {mhz} {watts} {cap} {per_ghz}")
    if args.json:
        args.json.write_text(json.dumps(dict(card=card, limits=limits, rows=rows,
                                              samples=samples), indent=1))


if __name__ == "__main__":
    main()
