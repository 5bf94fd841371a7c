"""SwiGLU references against a float64 formula, and the interleaved W13 convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmoe_kernels import reference as ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_float64_formula(dtype):
    """Computed in float32: the float32 result is within ~4 ulp (2^-21 relative) of the exact
    value before the final rounding to ``dtype``; bfloat16 output (8 significant bits) adds half
    an ulp, 2^-8 relative."""
    gate = (torch.randn(64, 96) * 4).to(dtype)
    up = torch.randn(64, 96).to(dtype)
    got = ref.swiglu(gate, up)
    assert got.dtype == dtype
    g, u = gate.double(), up.double()
    exact = g * torch.sigmoid(g) * u
    rel = 2.0**-21 + (2.0**-8 if dtype == torch.bfloat16 else 0.0)
    tol = exact.abs() * rel + 1e-30
    worst = ((got.double() - exact).abs() / tol).max().item()
    assert worst <= 1.0, f"max err/tol = {worst}"


def test_swiglu_interleaved_uses_even_gate_odd_up_columns():
    h = torch.randn(7, 2 * 24, dtype=torch.bfloat16)
    got = ref.swiglu_interleaved(h)
    assert got.shape == (7, 24)
    assert torch.equal(got, ref.swiglu(h[:, 0::2], h[:, 1::2]))
    for j in (0, 5, 23):
        assert torch.equal(got[:, j], ref.swiglu(h[:, 2 * j], h[:, 2 * j + 1]))


def test_interleave_w13_layout_and_gemm():
    w1 = torch.randn(3, 16, 8)
    w3 = torch.randn(3, 16, 8)
    w13 = ref.interleave_w13(w1, w3)
    assert w13.shape == (3, 16, 16)
    for j in range(8):
        assert torch.equal(w13[..., 2 * j], w1[..., j])
        assert torch.equal(w13[..., 2 * j + 1], w3[..., j])
    back1, back3 = ref.split_w13(w13)
    assert torch.equal(back1, w1) and torch.equal(back3, w3)
    x = torch.randn(5, 16, dtype=torch.float64)
    fused = ref.swiglu_interleaved(x @ w13[1].double())
    separate = ref.swiglu(x @ w1[1].double(), x @ w3[1].double())
    assert torch.allclose(fused, separate, rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="even"):
        ref.swiglu_interleaved(torch.randn(2, 5))
    with pytest.raises(ValueError, match="gate's shape"):
        ref.swiglu(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="must match"):
        ref.interleave_w13(torch.randn(2, 4), torch.randn(2, 5))


def _gated_swiglu_inputs(num_rows: int, num_features: int):
    """h with gates spread over [-12, 12] (both sigmoid tails and the zero of silu' near -1.28),
    da with per-row magnitudes 2^-8..2^8, gates in [0, 1) with one exact zero."""
    h = (torch.randn(num_rows, 2 * num_features) * 4).clamp(-12, 12).to(torch.bfloat16)
    row_scale = torch.exp2(torch.randint(-8, 9, (num_rows, 1)).float())
    da = (torch.randn(num_rows, num_features) * row_scale).to(torch.bfloat16)
    gates = torch.rand(num_rows)
    gates[0] = 0.0
    return h, da, gates


@pytest.mark.parametrize("num_features", [128, 384])
def test_swiglu_backward_gated_matches_float64_autograd(num_features):
    """dh, ag and dgate against float64 autograd of sum(gates * silu(g) * u * d).

    Tolerances: each output is a float32 chain of <= 10 operations (each 2^-24 relative, exp
    within a few ulps) before its final rounding. dh and ag are rounded to bf16 (half an ulp:
    2^-9 relative, allowed 2^-8). silu'(g) = s * (1 + g * (1 - s)) cancels near g = -1.28, so the
    float32 part is bounded absolutely by 2^-18 (64 float32 ulps) times the size of the terms,
    |dA| * (|u| * (1 + |g|) + |g|). dgate is a float32 sum of F products: each lane adds
    F / 32 terms and the butterfly 5 more, so (F / 32 + 5 + 6 per-term roundings) float32
    ulps of sum |a * d|, doubled."""
    num_rows = 37
    h, da, gates = _gated_swiglu_inputs(num_rows, num_features)
    dh, ag, dgate = ref.swiglu_backward_gated(h, da, gates)
    assert dh.dtype == torch.bfloat16 and ag.dtype == torch.bfloat16
    assert dgate.dtype == torch.float32 and dgate.shape == (num_rows,)

    h64 = h.double().requires_grad_(True)
    g64 = gates.double().requires_grad_(True)
    gate_in, up = h64[:, 0::2], h64[:, 1::2]
    a64 = torch.nn.functional.silu(gate_in) * up
    z = g64[:, None] * a64
    (z * da.double()).sum().backward()
    exact_dh, exact_dgate, exact_ag = h64.grad, g64.grad, z.detach()

    g, u = gate_in.detach(), up.detach()
    d_act = (gates.double()[:, None] * da.double()).abs()
    term = torch.empty_like(exact_dh)
    term[:, 0::2] = d_act * (u.abs() * (1 + g.abs()) + g.abs())
    term[:, 1::2] = d_act * (u.abs() * (1 + g.abs()) + g.abs())
    tol_dh = exact_dh.abs() * 2.0**-8 + term * 2.0**-18 + 1e-37
    worst = ((dh.double() - exact_dh).abs() / tol_dh).max().item()
    assert worst <= 1.0, f"dh: max err/tol = {worst}"

    tol_ag = exact_ag.abs() * (2.0**-8 + 2.0**-18) + 1e-37
    worst = ((ag.double() - exact_ag).abs() / tol_ag).max().item()
    assert worst <= 1.0, f"ag: max err/tol = {worst}"

    magnitude = (a64.detach() * da.double()).abs().sum(dim=1)
    tol_dgate = 2 * (num_features / 32 + 11) * 2.0**-24 * magnitude + 1e-37
    worst = ((dgate.double() - exact_dgate).abs() / tol_dgate).max().item()
    assert worst <= 1.0, f"dgate: max err/tol = {worst}"


@pytest.mark.parametrize("num_features", [128, 384, 1408])
def test_swiglu_backward_gated_dgate_order_is_the_documented_one(num_features):
    """dgate equals, bit for bit, a scalar float32 loop in the documented order: lane
    (j // 8) % 32 accumulates term j in increasing j from +0, then v[i] += v[i + w] for
    w = 16, 8, 4, 2, 1. F = 384 and 1408 end with a half-warp step (16 active lanes)."""
    num_rows = 3
    h, da, gates = _gated_swiglu_inputs(num_rows, num_features)
    _, _, dgate = ref.swiglu_backward_gated(h, da, gates)
    hf = h.float()
    s = 1.0 / (1.0 + torch.exp(-hf[:, 0::2]))
    terms = (hf[:, 0::2] * s * hf[:, 1::2] * da.float()).numpy()
    for row in range(num_rows):
        lanes = [np.float32(0.0)] * 32
        for j in range(num_features):
            lane = (j // 8) % 32
            lanes[lane] = np.float32(lanes[lane] + terms[row, j])
        width = 32
        while width > 1:
            width //= 2
            lanes = [np.float32(lanes[i] + lanes[i + width]) for i in range(width)]
        want = torch.tensor(lanes[0], dtype=torch.float32)
        assert torch.equal(dgate[row], want), (row, dgate[row].item(), float(lanes[0]))


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("scale_layout", ["mn_major_tma_aligned", "row_major"])
def test_swiglu_backward_gated_quantize_dh_is_quantize_of_bf16_dh(ue8m0, scale_layout):
    """quantize_dh appends exactly quantize_fp8_1x128 of the returned bf16 dh (1x128 blocks along
    2F: 64 gate/up pairs per block) and leaves the first three outputs unchanged."""
    h, da, gates = _gated_swiglu_inputs(9, 256)
    plain = ref.swiglu_backward_gated(h, da, gates)
    dh, ag, dgate, dh_fp8, scales = ref.swiglu_backward_gated(
        h, da, gates, quantize_dh=True, ue8m0=ue8m0, scale_layout=scale_layout
    )
    for got, want in zip((dh, ag, dgate), plain):
        assert torch.equal(got, want)
    want_fp8, want_scales = ref.quantize_fp8_1x128(dh, ue8m0=ue8m0, scale_layout=scale_layout)
    assert torch.equal(dh_fp8.view(torch.uint8), want_fp8.view(torch.uint8))
    assert torch.equal(scales, want_scales) and scales.stride() == want_scales.stride()
    deq = ref.dequantize_fp8_1x128(dh_fp8, scales)
    # E4M3 keeps 4 significant bits: within 2^-4 of each value, or of the block's smallest normal
    assert ((deq.float() - dh.float()).abs() <= dh.float().abs() * 2.0**-4
            + scales.repeat_interleave(128, dim=1) * 2.0**-9 + 1e-37).all()


def test_swiglu_backward_gated_rejects_bad_shapes():
    h = torch.zeros(4, 2 * 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="F % 128"):
        ref.swiglu_backward_gated(h, torch.zeros(4, 96, dtype=torch.bfloat16), torch.zeros(4))
    h = torch.zeros(4, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="da_RF"):
        ref.swiglu_backward_gated(h, torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(4))
    with pytest.raises(ValueError, match="gates_R"):
        ref.swiglu_backward_gated(h, torch.zeros(4, 128, dtype=torch.bfloat16), torch.zeros(5))
