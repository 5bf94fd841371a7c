"""The gated SwiGLU backward of the fused MoE expert MLP on the GPU (CUDA kernel in `_C`).

Shape letters: R rows (received by this rank's experts), F expert hidden size (F % 128 == 0); the
W13 GEMM output h_R2F has 2F interleaved (gate, up) columns, see
`nmoe_kernels.reference.activation`.

The op replaces the chain of float32 elementwise passes of the expert MLP backward (SiLU,
products, gating, the gate-gradient row dot, casts) with one memory-bound pass. It is bitwise
equal to `nmoe_kernels.reference.swiglu_backward_gated` evaluated on the GPU.
"""

from __future__ import annotations

import torch

from nmoe_kernels import _extension
from nmoe_kernels.reference.quantization import SCALE_LAYOUTS

__all__ = ["swiglu_backward_gated"]


def _check_matrix(op: str, name: str, t: torch.Tensor, shape: tuple[int, int], what: str):
    if t.dtype != torch.bfloat16:
        raise ValueError(f"{op}: {name} must be bfloat16 ({what}), got {t.dtype}; cast it")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must be {what} = {list(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")
    if t.data_ptr() % 16 != 0:
        raise ValueError(f"{op}: {name} must start at a 16-byte aligned address; .clone() it")


def swiglu_backward_gated(
    h_R2F: torch.Tensor,
    da_RF: torch.Tensor,
    gates_R: torch.Tensor,
    *,
    quantize_dh: bool = False,
    ue8m0: bool = False,
    scale_layout: str = "mn_major_tma_aligned",
) -> tuple[torch.Tensor, ...]:
    """Backward of ``z_R = gates_R * (swiglu(h_R2F) @ W2)`` through the gates and the SwiGLU (CUDA).

    Per row r and feature j, g = h[r, 2j], u = h[r, 2j+1], d = da[r, j], in float32 with one
    rounding per operation: s = 1 / (1 + expf(-g)), silu = g * s, a = silu * u,
    dA = gates[r] * d, ds = s * (1 + g * (1 - s));
    dh[r, 2j] = (dA * u) * ds, dh[r, 2j+1] = dA * silu, ag[r, j] = gates[r] * a (both rounded to
    bf16), dgate[r] = sum_j a * d in float32 in a fixed order (lane-strided partial sums, then a
    32-way butterfly; see `nmoe_kernels.reference.activation._dgate_fixed_order`), so results
    are bitwise reproducible across runs and launch configurations. Bitwise equal to
    `nmoe_kernels.reference.swiglu_backward_gated` evaluated on the GPU.

    In the MoE backward: dH = dh feeds dW13 = x^T dH and dX = dH @ W13^T, ag = gates * a gives
    dW2 = ag^T dz, and dgate is the gradient of each row's gate.

    Args:
        h_R2F: [R, 2F] bfloat16 CUDA tensor, contiguous, 16-byte aligned, F % 128 == 0: the
            recomputed W13 GEMM output, column 2j = gate_j, 2j+1 = up_j. Finite values.
        da_RF: [R, F] bfloat16, contiguous, 16-byte aligned, same device: dA before gating
            (dz @ W2^T, the W2 dgrad output).
        gates_R: [R] float32, contiguous, same device: the gate of each row.
        quantize_dh: also write dh as FP8 E4M3 with one float32 scale per 1x128 block along 2F,
            exactly ``quantize_fp8_1x128(dh, ue8m0=ue8m0, scale_layout=scale_layout)`` of the
            returned bf16 dh (same pass), for the FP8 dgrad GEMM dX = dH @ W13^T.
        ue8m0: with quantize_dh, round the scales up to powers of two.
        scale_layout: with quantize_dh, "mn_major_tma_aligned" (default: a [R, 2F/128] view with
            strides (1, R_aligned) over zero-padded storage [2F/128, R_aligned], R_aligned = R
            rounded up to 4, what the FP8 GEMMs read) or "row_major" ([R, 2F/128] contiguous).

    Returns:
        quantize_dh=False: (dh_R2F bf16 [R, 2F], ag_RF bf16 [R, F], dgate_R float32 [R]).
        quantize_dh=True: (dh_R2F, ag_RF, dgate_R, dh_fp8_R2F float8_e4m3fn [R, 2F],
        dh_scales float32 [R, 2F/128] in ``scale_layout``): the first three as without
        quantization, the FP8 copy of dh appended (the BF16 wgrad dW13 = x^T dH still needs
        the bf16 dh).
    """
    op = "swiglu_backward_gated"
    device = _extension.check_cuda_tensors(op, h_R2F=h_R2F, da_RF=da_RF, gates_R=gates_R)
    if h_R2F.dim() != 2 or h_R2F.shape[1] % 256 != 0:
        raise ValueError(
            f"{op}: h_R2F must be [R, 2F] with F % 128 == 0 (2F a multiple of 256), got shape "
            f"{tuple(h_R2F.shape)}; pad F"
        )
    num_rows, num_features = h_R2F.shape[0], h_R2F.shape[1] // 2
    _check_matrix(op, "h_R2F", h_R2F, (num_rows, 2 * num_features), "[R, 2F]")
    _check_matrix(op, "da_RF", da_RF, (num_rows, num_features), "[R, F]")
    if gates_R.dtype != torch.float32:
        raise ValueError(f"{op}: gates_R must be float32, got {gates_R.dtype}; use .float()")
    if tuple(gates_R.shape) != (num_rows,):
        raise ValueError(f"{op}: gates_R must be [R] = [{num_rows}], got {tuple(gates_R.shape)}")
    if not gates_R.is_contiguous():
        raise ValueError(f"{op}: gates_R must be contiguous; call .contiguous() first")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"{op}: scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    compiled = _extension.compiled_module(op)

    dh = torch.empty(num_rows, 2 * num_features, dtype=torch.bfloat16, device=device)
    ag = torch.empty(num_rows, num_features, dtype=torch.bfloat16, device=device)
    dgate = torch.empty(num_rows, dtype=torch.float32, device=device)
    dh_fp8 = scales = storage = None
    mn_major = scale_layout == "mn_major_tma_aligned"
    if quantize_dh:
        num_blocks = 2 * num_features // 128
        dh_fp8 = torch.empty(num_rows, 2 * num_features, dtype=torch.float8_e4m3fn, device=device)
        if mn_major:
            storage = torch.empty(num_blocks, (num_rows + 3) // 4 * 4, dtype=torch.float32,
                                  device=device)
            scales = storage[:, :num_rows].t()
        else:
            storage = scales = torch.empty(num_rows, num_blocks, dtype=torch.float32,
                                           device=device)
    compiled.swiglu_backward_gated(
        _extension.capsule(h_R2F),
        _extension.capsule(da_RF),
        _extension.capsule(gates_R),
        _extension.capsule(dh),
        _extension.capsule(ag),
        _extension.capsule(dgate),
        None if dh_fp8 is None else _extension.capsule(dh_fp8),
        None if storage is None else _extension.capsule(storage),
        bool(ue8m0),
        mn_major,
        _extension.stream_handle(device),
    )
    if quantize_dh:
        return dh, ag, dgate, dh_fp8, scales
    return dh, ag, dgate
