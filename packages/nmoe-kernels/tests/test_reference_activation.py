"""SwiGLU references against a float64 formula, and the interleaved W13 convention."""

from __future__ import annotations

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
