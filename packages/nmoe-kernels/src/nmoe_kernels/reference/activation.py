"""Pure-torch reference for the expert MLP activation (SwiGLU) and the W13 column convention.

Shape letters: M rows, F expert intermediate dim, K input dim, E experts.

W13 convention (binding for every fused kernel in nmoe-kernels): the expert up-projection is one
weight ``w13_EK2F`` [E, K, 2F] whose columns are INTERLEAVED per output feature:

    column 2j   = gate projection (W1) of feature j
    column 2j+1 = up projection   (W3) of feature j

so the GEMM output ``h_M2F = x @ w13[e]`` holds (gate_j, up_j) in adjacent columns and
``swiglu_interleaved(h_M2F)[:, j] = silu(h[:, 2j]) * h[:, 2j+1]``. Adjacent columns land in the
same thread's accumulator registers on Hopper (wgmma) and Blackwell (tcgen05) MMAs, so a fused
epilogue can apply SwiGLU (and quantize the F/2-wide result) without exchanging data between
threads or tiles. Build it with `interleave_w13(w1_EKF, w3_EKF)`; `split_w13` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 and cast back to gate's dtype.

    Args:
        gate: [..., F] float tensor.
        up: [..., F] float tensor, same shape as gate.

    Returns:
        [..., F] in gate's dtype.
    """
    if not isinstance(gate, torch.Tensor) or gate.dtype not in _FLOATS:
        raise ValueError("swiglu: gate must be a floating tensor")
    if not isinstance(up, torch.Tensor) or up.shape != gate.shape:
        raise ValueError(f"swiglu: up must have gate's shape {tuple(gate.shape)}")
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu_interleaved(h_M2F: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a W13 GEMM output with interleaved (gate, up) columns (module docstring).

    Args:
        h_M2F: [..., 2F] float tensor; column 2j is gate_j, column 2j+1 is up_j.

    Returns:
        [..., F] in h's dtype: silu(h[..., 0::2]) * h[..., 1::2] computed in float32.
    """
    if not isinstance(h_M2F, torch.Tensor) or h_M2F.dim() < 1 or h_M2F.shape[-1] % 2:
        raise ValueError("swiglu_interleaved: h_M2F must be a tensor whose last dim is even (2F)")
    return swiglu(h_M2F[..., 0::2], h_M2F[..., 1::2])


def interleave_w13(w1_EKF: torch.Tensor, w3_EKF: torch.Tensor) -> torch.Tensor:
    """Stack gate (W1) and up (W3) projections into the interleaved W13 layout.

    Args:
        w1_EKF: [..., K, F] gate projection weights (e.g. [E, K, F]).
        w3_EKF: [..., K, F] up projection weights, same shape and dtype.

    Returns:
        w13_EK2F [..., K, 2F] with w13[..., 2j] = w1[..., j] and w13[..., 2j+1] = w3[..., j].
    """
    if w1_EKF.shape != w3_EKF.shape or w1_EKF.dtype != w3_EKF.dtype:
        raise ValueError(
            f"interleave_w13: w1 {w1_EKF.dtype}{tuple(w1_EKF.shape)} and w3 "
            f"{w3_EKF.dtype}{tuple(w3_EKF.shape)} must match in shape and dtype"
        )
    return torch.stack((w1_EKF, w3_EKF), dim=-1).flatten(-2)


def split_w13(w13_EK2F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_w13`: [..., K, 2F] -> (w1 [..., K, F], w3 [..., K, F]) copies."""
    if w13_EK2F.shape[-1] % 2:
        raise ValueError(f"split_w13: the last dim of w13 ({w13_EK2F.shape[-1]}) must be even")
    return w13_EK2F[..., 0::2].contiguous(), w13_EK2F[..., 1::2].contiguous()


def _dgate_fixed_order(terms_RF: torch.Tensor) -> torch.Tensor:
    """``terms.sum(dim=1)`` (float32) in the fixed order of the CUDA `swiglu_backward_gated`.

    Feature j lies in chunk c = j // 8 of lane c % 32. Each lane sums its terms from +0 in
    increasing j (chunk by chunk), then the 32 lane sums combine as v[i] += v[i + w] for
    w = 16, 8, 4, 2, 1 and v[0] is the result. Every addition is one float32 rounding.
    """
    num_rows, num_features = terms_RF.shape
    lanes = torch.zeros(num_rows, 32, dtype=torch.float32, device=terms_RF.device)
    num_chunks = num_features // 8
    for base in range(0, num_chunks, 32):
        active = min(32, num_chunks - base)
        chunk = terms_RF[:, base * 8 : (base + active) * 8].reshape(num_rows, active, 8)
        for i in range(8):
            lanes[:, :active] = lanes[:, :active] + chunk[:, :, i]
    width = 32
    while width > 1:
        width //= 2
        lanes = lanes[:, :width] + lanes[:, width : 2 * width]
    return lanes[:, 0].contiguous()


def swiglu_backward_gated(
    h_R2F: torch.Tensor,
    da_RF: torch.Tensor,
    gates_R: torch.Tensor,
    *,
    quantize_dh: bool = False,
    ue8m0: bool = False,
    scale_layout: str = "mn_major_tma_aligned",
) -> tuple[torch.Tensor, ...]:
    """Backward of ``z = gates * (swiglu(h) @ W2)`` through the gate and the SwiGLU, per row.

    Shape letters: R rows, F features (h has 2F interleaved columns, see the module docstring).
    With ``h = h_R2F.float()``, g = h[:, 0::2], u = h[:, 1::2], d = da_RF.float() and
    gate = gates_R[:, None], in float32 with one rounding per operation (written out so that the
    CUDA kernel can repeat it operation for operation):

        s    = 1 / (1 + exp(-g))          sigmoid (torch.exp; on a GPU the same expf as CUDA)
        silu = g * s;  a = silu * u
        dA   = gate * d
        ds   = s * (1 + g * (1 - s))      silu'(g)
        dh[:, 0::2] = (dA * u) * ds;  dh[:, 1::2] = dA * silu       -> bfloat16
        ag   = gate * a                                             -> bfloat16
        dgate = sum_j a * d               (float32, fixed order: `_dgate_fixed_order`)

    i.e. dh = d(gate * a)/dh . d, ag = gate * a and dgate = d(gate * a)/dgate . d = <a, d>.
    With ``quantize_dh`` the bf16 dh is also quantized exactly like
    ``quantize_fp8_1x128(dh, ue8m0=ue8m0, scale_layout=scale_layout)``.

    Args:
        h_R2F: [R, 2F] bfloat16 (float32 accepted), the recomputed W13 GEMM output; F % 128 == 0.
        da_RF: [R, F] bfloat16 (float32 accepted), dA before gating (dz @ W2^T).
        gates_R: [R] float32, the gate of each row.
        quantize_dh: also return dh in FP8 E4M3 with 1x128 scales.
        ue8m0: round those scales up to powers of two.
        scale_layout: "mn_major_tma_aligned" (default) or "row_major", as in quantize_fp8_1x128.

    Returns:
        (dh_R2F bf16 [R, 2F], ag_RF bf16 [R, F], dgate_R float32 [R]), followed by
        (dh_fp8_R2F float8_e4m3fn [R, 2F], dh_scales float32 [R, 2F/128] in ``scale_layout``)
        when ``quantize_dh``.
    """
    from nmoe_kernels.reference.quantization import quantize_fp8_1x128

    op = "swiglu_backward_gated"
    if not isinstance(h_R2F, torch.Tensor) or h_R2F.dim() != 2 or h_R2F.shape[1] % 256:
        raise ValueError(f"{op}: h_R2F must be a 2-D [R, 2F] tensor with F % 128 == 0")
    num_rows, num_features = h_R2F.shape[0], h_R2F.shape[1] // 2
    if not isinstance(da_RF, torch.Tensor) or tuple(da_RF.shape) != (num_rows, num_features):
        raise ValueError(f"{op}: da_RF must be [R, F] = [{num_rows}, {num_features}]")
    if not isinstance(gates_R, torch.Tensor) or tuple(gates_R.shape) != (num_rows,):
        raise ValueError(f"{op}: gates_R must be [R] = [{num_rows}]")
    h = h_R2F.float()
    gate_in, up = h[:, 0::2], h[:, 1::2]
    d = da_RF.float()
    gate = gates_R.float()[:, None]
    one = torch.ones_like(gate_in)
    s = one / (1.0 + torch.exp(-gate_in))
    silu = gate_in * s
    a = silu * up
    d_act = gate * d
    dsilu = s * (1.0 + gate_in * (1.0 - s))
    dh = torch.empty(num_rows, 2 * num_features, dtype=torch.bfloat16, device=h.device)
    dh[:, 0::2] = (d_act * up * dsilu).to(torch.bfloat16)
    dh[:, 1::2] = (d_act * silu).to(torch.bfloat16)
    ag = (gate * a).to(torch.bfloat16)
    dgate = _dgate_fixed_order(a * d)
    if not quantize_dh:
        return dh, ag, dgate
    dh_fp8, dh_scales = quantize_fp8_1x128(dh, ue8m0=ue8m0, scale_layout=scale_layout)
    return dh, ag, dgate, dh_fp8, dh_scales
