"""Benchmark the fused gated SwiGLU backward (`nmoe_kernels.swiglu_backward_gated`) on the GPU.

    python packages/nmoe-kernels/bench/bench_swiglu_bwd.py [--json out.json] [--quick]

Baseline: the unfused torch sequence of the fused MoE backward before this op
(nmoe_core.fused._ExpertMLP.backward at the time of writing, its elementwise part only, the
GEMMs left out): upcast h to float32, silu(gate) * up, the gate-gradient row dot, gating of dA,
the SwiGLU derivative with its strided writes, and the bf16 casts of dh and a; eager torch on the
same GPU and inputs. A second row times the op with ``quantize_dh=True`` (dh also written as FP8
1x128 with MN-major scales) against the same baseline followed by
`nmoe_kernels.quantize_fp8_1x128` of its dh.

Times are medians over CUDA-event-timed calls after warm-up; every input is larger than L2. GB/s
counts the bytes the op must move once: read h [R, 2F] and da [R, F] (bf16) and gates [R]; write
dh [R, 2F] and ag [R, F] (bf16) and dgate [R] (fp32); with quantize_dh also dh_fp8 [R, 2F] and
the scales [2F/128, R]. Prints a table and optionally writes JSON rows (op, shape, dtype, time,
GB/s, baseline, ratio, device, torch and CUDA versions).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_quant_permute import time_cases  # same directory: the shared timing and table row

import nmoe_kernels


def unfused_torch(h_R2F: torch.Tensor, da_RF: torch.Tensor, gates_R: torch.Tensor):
    """The elementwise part of the pre-fusion MoE expert backward (baseline)."""
    h = h_R2F.float()
    gate, up = h[:, 0::2], h[:, 1::2]
    a = F.silu(gate) * up
    da_ungated = da_RF.float()
    dgate = (a * da_ungated).sum(dim=1)
    da = da_ungated * gates_R[:, None]
    a_bf16 = a.to(torch.bfloat16)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dh = torch.empty_like(h)
    dh[:, 0::2] = da * up * (sig * (1 + gate * (1 - sig)))
    dh[:, 1::2] = da * silu
    return dh.to(torch.bfloat16), a_bf16, dgate


def unfused_torch_quant(h_R2F, da_RF, gates_R):
    dh, a, dgate = unfused_torch(h_R2F, da_RF, gates_R)
    dh_fp8, scales = nmoe_kernels.quantize_fp8_1x128(dh, scale_layout="mn_major_tma_aligned")
    return dh, a, dgate, dh_fp8, scales


def bench_shape(num_rows: int, num_features: int):
    """Yield (op, shape, bytes, kernel_fn, baseline_fn) for one [R, F]."""
    h = torch.randn(num_rows, 2 * num_features, device="cuda").mul_(3).to(torch.bfloat16)
    da = torch.randn(num_rows, num_features, device="cuda").to(torch.bfloat16)
    gates = torch.rand(num_rows, device="cuda")
    base_bytes = num_rows * (2 * num_features * 2 * 2 + num_features * 2 * 2 + 4 + 4)
    quant_bytes = base_bytes + num_rows * 2 * num_features + num_rows * num_features // 64 * 4
    shape = f"R={num_rows} F={num_features}"
    yield (
        "swiglu_backward_gated", shape, base_bytes,
        lambda: nmoe_kernels.swiglu_backward_gated(h, da, gates),
        lambda: unfused_torch(h, da, gates),
    )
    yield (
        "swiglu_backward_gated (quantize_dh)", shape, quant_bytes,
        lambda: nmoe_kernels.swiglu_backward_gated(h, da, gates, quantize_dh=True),
        lambda: unfused_torch_quant(h, da, gates),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write result rows to this file")
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    shapes = [(131072, 384), (65536, 1408), (65536, 2048)] if not args.quick else [(16384, 768)]
    rows = []
    header = f"{'op':<36}{'shape':>34}{'us':>10}{'GB/s':>8}{'torch us':>11}{'x torch':>8}"
    print(header)
    print("-" * len(header))
    for num_rows, num_features in shapes:
        rows += time_cases(
            bench_shape(num_rows, num_features),
            "unfused eager torch sequence of the MoE expert backward (same GPU)",
            baseline_iters=10,
        )
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
