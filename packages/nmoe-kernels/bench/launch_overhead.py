"""Host time per call of the public grouped-GEMM ops against torch's, on small problems.

`bench_grouped_bf16.py` times each call alone (events around it, a sync after it), so the
host's time to validate the arguments and launch the kernel counts as idle GPU time; at a 1 ms
op, 40 us of host time is 4%. This script measures that host time: each op called ``--calls``
times back to back on a problem small enough that the GPU keeps up, the median host
(`time.perf_counter`) time per call, for our ops, torch's equivalents, and the layers of our
BF16 launch (argument checks, `grouped_gemm._launch`, the compiled kernel's call alone).

    python bench/launch_overhead.py [--calls 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def host_us(fn, calls: int, warmup: int = 20) -> float:
    """Median host microseconds per call of ``fn`` (calls enqueued back to back)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def gpu_us(fn, calls: int = 50) -> float:
    """GPU microseconds per call with the calls queued back to back (it must stay below the
    host time for the host time to be what the loop measures)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def cases(rows: int = 1024, experts: int = 8, k: int = 256, n: int = 256) -> dict:
    """{name: callable} on one small problem; names pair ours with torch's equivalent."""
    import bench_grouped_fp8 as fp8  # same directory
    import torch
    import torch.nn.functional as F

    import nmoe_kernels
    from nmoe_kernels import grouped_gemm as gg
    from nmoe_kernels import reference as ref

    dev = "cuda"
    offsets = torch.arange(0, rows + 1, rows // experts, dtype=torch.int32, device=dev)
    ends = offsets[1:].contiguous()
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(experts, k, n, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
    out = {
        "bf16 fwd (ours)": lambda: nmoe_kernels.grouped_gemm_bf16(x, w, offsets),
        "bf16 fwd (torch._grouped_mm)": lambda: torch._grouped_mm(x, w, offs=ends),
        "bf16 swiglu (ours)": lambda: nmoe_kernels.grouped_gemm_bf16_swiglu(x, w, offsets),
        "bf16 swiglu (torch, 3 kernels)": lambda: (
            lambda h: F.silu(h[:, : n // 2]) * h[:, n // 2:])(torch._grouped_mm(x, w, offs=ends)),
        "bf16 dgrad (ours)": lambda: nmoe_kernels.grouped_gemm_bf16_dgrad(dy, w, offsets),
        "bf16 dgrad (torch._grouped_mm)": lambda: torch._grouped_mm(
            dy, w.transpose(1, 2), offs=ends),
        "bf16 wgrad (ours)": lambda: nmoe_kernels.grouped_gemm_bf16_wgrad(x, dy, offsets),
        "bf16 wgrad (torch._grouped_mm)": lambda: torch._grouped_mm(x.t(), dy, offs=ends),
    }
    # the layers under the public dgrad: _launch (no argument checks, output preallocated)
    dx = torch.empty(rows, k, device=dev, dtype=torch.bfloat16)
    out["bf16 dgrad: _launch only"] = lambda: gg._launch(
        "dgrad", k, n, dy, w, dx, offsets, rows, experts, False)
    xq, xs = fp8.quantize_1x128(x)  # the FP8 bench's operands (CUDA quantizer or reference)
    wq, ws = ref.quantize_fp8_128x128(w.transpose(1, 2).contiguous())
    out["fp8 blockscaled (ours)"] = lambda: nmoe_kernels.grouped_gemm_fp8_blockscaled(
        xq, xs, wq, ws, offsets)
    out["fp8 swiglu_quant (ours)"] = lambda: nmoe_kernels.grouped_gemm_fp8_swiglu_quant(
        xq, xs, wq, ws, offsets)
    xr = x.to(torch.float8_e4m3fn)
    wr = w.transpose(1, 2).contiguous().to(torch.float8_e4m3fn).transpose(1, 2)
    sx = torch.ones(rows, device=dev)
    sw = torch.ones(experts, n, device=dev)
    out["fp8 rowwise (torch._scaled_grouped_mm)"] = lambda: torch._scaled_grouped_mm(
        xr, wr, sx, sw, offs=ends, out_dtype=torch.bfloat16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    print(f"device: {card}  torch {torch.__version__}  {args.calls} calls each, host us per call")
    rows = []
    for name, fn in cases().items():
        try:
            us = host_us(fn, args.calls)
        except Exception as err:  # report and go on (e.g. a torch op missing in this build)
            print(f"  {name}: failed: {type(err).__name__}: {err}")
            continue
        gpu = gpu_us(fn)
        rows.append(dict(case=name, host_us=us, gpu_us=gpu))
        print(f"{name:44s} {us:8.1f} us host {gpu:8.1f} us GPU")
    if args.json:
        args.json.write_text(json.dumps(dict(card=card, rows=rows), indent=1))


if __name__ == "__main__":
    main()
