"""The grouped GEMMs on a GPU that is not the current device (two GPUs; skipped on one).

A process that drives several GPUs calls the ops with tensors on a device other than
`torch.cuda.current_device()`. The wrappers must launch under the tensors' device, and each
device gets its own compiled function (CuTeDSL loads a compiled module into the context it first
runs in). Checked: every op on cuda:1 while cuda:0 is current gives the bits it gives with
cuda:1 current, after the same op already ran on cuda:0 (so a function compiled and loaded for
one device is never reused on the other). Inputs drawn fresh each run (seed from conftest).
"""

from __future__ import annotations

import pytest
import torch

from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _require_two_hoppers():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    if any(torch.cuda.get_device_capability(i) != (9, 0) for i in range(2)):
        pytest.skip("the grouped GEMM kernels need sm_90a GPUs (H100/H200)")


def _offsets(gen, num_experts: int, max_rows: int) -> torch.Tensor:
    counts = torch.randint(0, max_rows, (num_experts,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)


def _on_each_device(fn, *cpu_args):
    """fn's result with the inputs on cuda:0 (current), then on cuda:1 while cuda:0 is current,
    then on cuda:1 with cuda:1 current; all three moved to the CPU."""
    out = []
    with torch.cuda.device(0):
        out.append(fn(*(a.to("cuda:0") for a in cpu_args)).cpu())
        out.append(fn(*(a.to("cuda:1") for a in cpu_args)).cpu())
    with torch.cuda.device(1):
        out.append(fn(*(a.to("cuda:1") for a in cpu_args)).cpu())
    return out


def test_bf16_ops_on_a_non_current_device(torch_seed):
    import nmoe_kernels

    gen = torch.Generator().manual_seed(torch_seed)
    num_experts, k, n = 6, 256, 384
    offsets = _offsets(gen, num_experts, 300)
    rows = int(offsets[-1]) + 5
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(num_experts, k, n, generator=gen) / k**0.5).bfloat16()
    dy = torch.randn(rows, n, generator=gen).bfloat16()
    cases = {
        "fwd": (nmoe_kernels.grouped_gemm_bf16, (x, w, offsets)),
        "dgrad": (nmoe_kernels.grouped_gemm_bf16_dgrad, (dy, w, offsets)),
        "wgrad": (nmoe_kernels.grouped_gemm_bf16_wgrad, (x, dy, offsets)),
    }
    for name, (fn, args) in cases.items():
        on0, on1_from0, on1 = _on_each_device(fn, *args)
        assert torch.equal(on1_from0, on1), name
        assert torch.equal(on0, on1), name  # same kernel, same bits on either GPU
    want = ref.grouped_gemm(x.float(), w.float(), offsets)
    got = _on_each_device(nmoe_kernels.grouped_gemm_bf16, x, w, offsets)[1]
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7)


def test_fp8_ops_on_a_non_current_device(torch_seed):
    import nmoe_kernels

    gen = torch.Generator().manual_seed(torch_seed)
    num_experts, k, n = 5, 512, 512
    offsets = _offsets(gen, num_experts, 260)
    rows = int(offsets[-1])  # no padding rows: only the experts' rows are compared
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(num_experts, n, k, generator=gen) / k**0.5).bfloat16()
    for op in (nmoe_kernels.grouped_gemm_fp8_blockscaled,
               nmoe_kernels.grouped_gemm_fp8_swiglu_quant):

        def run(x, w, offsets, op=op):
            """Quantize on the inputs' device (the scale layout is padded: no .to() of it),
            run the op, return every output's bytes."""
            xq, xs = ref.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")
            wq, ws = ref.quantize_fp8_128x128(w)
            out = op(xq, xs, wq, ws, offsets)
            out = out if isinstance(out, tuple) else (out,)
            return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in out])

        on0, on1_from0, on1 = _on_each_device(run, x, w, offsets)
        assert torch.equal(on1_from0, on1), op.__name__
        assert torch.equal(on0, on1), op.__name__
