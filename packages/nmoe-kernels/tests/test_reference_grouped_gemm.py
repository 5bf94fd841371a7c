"""Grouped GEMM references against per-expert float64 matmul loops.

Tolerance: the reference accumulates in float32. For a length-K dot product the float32 result
differs from the exact one by at most gamma_K * sum|x_i w_i| with gamma_K ~ K * 2^-24 (standard
forward error bound of recursive summation, which also covers blocked/pairwise orders), so we
check |ref - exact| <= K * 2^-23 * (|x| @ |w|) elementwise (a 2x margin), plus half an ulp of the
output dtype (2^-9 relative for bfloat16) when the output is rounded to bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_kernels import reference as ref

SEGMENT_LENGTHS = [0, 1, 127, 128, 129]


def offsets_from_counts(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


def layouts():
    """(name, counts per expert) including empty experts and all rows on one expert."""
    random_counts = torch.randint(0, 40, (6,)).tolist()
    return [
        ("edge_lengths", SEGMENT_LENGTHS),
        ("random", random_counts),
        ("all_on_one", [0, 0, 200, 0]),
        ("single_expert", [50]),
    ]


def assert_within_fp32_bound(got, exact, bound_terms, num_terms, out_dtype, what):
    tol = num_terms * 2.0**-23 * bound_terms + 1e-300
    if out_dtype == torch.bfloat16:
        tol = tol + exact.abs() * 2.0**-8
    err = (got.double() - exact).abs()
    ratio = (err / tol).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"{what}: max err/tol = {ratio}"


@pytest.mark.parametrize("name,counts", layouts())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_fwd_dgrad_wgrad_match_loops(name, counts, out_dtype):
    num_experts, hidden, out_dim = len(counts), 48, 40
    num_rows = sum(counts) + 3  # 3 padding rows past offsets[E]
    offsets = offsets_from_counts(counts)
    x = torch.randn(num_rows, hidden)
    w = torch.randn(num_experts, hidden, out_dim)
    dy = torch.randn(num_rows, out_dim)
    x_in, w_in, dy_in = (t.to(out_dtype) for t in (x, w, dy))
    x64, w64, dy64 = (t.double() for t in (x_in, w_in, dy_in))

    y = ref.grouped_gemm(x_in, w_in, offsets)
    dx = ref.grouped_gemm_dgrad(dy_in, w_in, offsets)
    dw = ref.grouped_gemm_wgrad(x_in, dy_in, offsets)
    assert y.dtype == dx.dtype == dw.dtype == out_dtype
    assert dw.shape == (num_experts, hidden, out_dim)

    y_exact, y_abs = (
        torch.zeros(num_rows, out_dim, dtype=torch.float64),
        torch.zeros(num_rows, out_dim, dtype=torch.float64),
    )
    dx_exact, dx_abs = (
        torch.zeros(num_rows, hidden, dtype=torch.float64),
        torch.zeros(num_rows, hidden, dtype=torch.float64),
    )
    dw_exact = torch.zeros(num_experts, hidden, out_dim, dtype=torch.float64)
    dw_abs = torch.zeros_like(dw_exact)
    for e in range(num_experts):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        y_exact[rows] = x64[rows] @ w64[e]
        y_abs[rows] = x64[rows].abs() @ w64[e].abs()
        dx_exact[rows] = dy64[rows] @ w64[e].t()
        dx_abs[rows] = dy64[rows].abs() @ w64[e].abs().t()
        dw_exact[e] = x64[rows].t() @ dy64[rows]
        dw_abs[e] = x64[rows].abs().t() @ dy64[rows].abs()
    assert_within_fp32_bound(y, y_exact, y_abs, hidden, out_dtype, f"fwd {name}")
    assert_within_fp32_bound(dx, dx_exact, dx_abs, out_dim, out_dtype, f"dgrad {name}")
    max_rows = max(counts)
    assert_within_fp32_bound(dw, dw_exact, dw_abs, max(max_rows, 1), out_dtype, f"wgrad {name}")
    assert torch.all(y[sum(counts) :] == 0) and torch.all(dx[sum(counts) :] == 0)
    for e, count in enumerate(counts):
        if count == 0:
            assert torch.all(dw[e] == 0)


def test_grouped_gemm_fp8_blockscaled_matches_dequantized_loop():
    counts = [0, 129, 1, 126]
    offsets = offsets_from_counts(counts)
    x = torch.randn(sum(counts), 256)
    w = torch.randn(len(counts), 256, 128) * 0.05
    x_fp8, x_scales = ref.quantize_fp8_1x128(x)
    w_fp8, w_scales = ref.quantize_fp8_128x128(w)
    y = ref.grouped_gemm_fp8_blockscaled(x_fp8, x_scales, w_fp8, w_scales, offsets)
    assert y.dtype == torch.bfloat16
    xd = x_fp8.double() * x_scales.double().repeat_interleave(128, 1)
    wd = w_fp8.double() * w_scales.double().repeat_interleave(128, 1).repeat_interleave(128, 2)
    exact = torch.zeros(sum(counts), 128, dtype=torch.float64)
    bound = torch.zeros_like(exact)
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        exact[rows] = xd[rows] @ wd[e]
        bound[rows] = xd[rows].abs() @ wd[e].abs()
    assert_within_fp32_bound(y, exact, bound, 256, torch.bfloat16, "fp8 grouped gemm")
    # The MN-major scale layout gives the identical result.
    mn_scales = ref.to_mn_major_tma_aligned(x_scales)
    y_mn = ref.grouped_gemm_fp8_blockscaled(x_fp8, mn_scales, w_fp8, w_scales, offsets)
    assert torch.equal(y_mn, y)


def test_offsets_are_validated():
    x, w = torch.randn(10, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"shape \[E \+ 1\]"):
        ref.grouped_gemm(x, w, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ref.grouped_gemm(x, w, torch.tensor([0, 6, 4]))
    with pytest.raises(ValueError, match="end at <= M=10"):
        ref.grouped_gemm(x, w, torch.tensor([0, 6, 11]))
    with pytest.raises(ValueError, match="int32 or int64"):
        ref.grouped_gemm(x, w, torch.tensor([0.0, 5.0, 10.0]))
    with pytest.raises(ValueError, match="must have K=8"):
        ref.grouped_gemm(x, torch.randn(2, 7, 4), torch.tensor([0, 5, 10]))
