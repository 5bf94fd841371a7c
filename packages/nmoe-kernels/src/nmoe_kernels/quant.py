"""FP8 blockscaled quantization on the GPU (CUDA kernels in nmoe_kernels._C).

Shape letters: M rows, K the quantized dim (K % 128 == 0), Kb = K / 128; for weights N the output
dim, E experts, Nb = ceil(N / 128); for SwiGLU F the output features (its input is [M, 2F]),
Fb = F / 128.

Each op is bit-identical to its reference in `nmoe_kernels.reference.quantization` (same scale
rule and float32 operations; see that module's docstring). Arguments are checked here, outputs
are allocated with torch (or taken from ``out``), and the kernel runs on the current CUDA stream
of the input's device.
"""

from __future__ import annotations

import torch

from nmoe_kernels import _extension
from nmoe_kernels.reference.quantization import SCALE_LAYOUTS

__all__ = [
    "dequantize_fp8_1x128",
    "quantize_fp8_128x128",
    "quantize_fp8_1x128",
    "swiglu_quantize_fp8_1x128",
]

_QUANT_INPUTS = (torch.bfloat16, torch.float32)
_DEQUANT_OUTPUTS = (torch.bfloat16, torch.float32)


def _check_2d_blocked(op: str, name: str, t: torch.Tensor) -> tuple[int, int]:
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [M, K], got shape {tuple(t.shape)}")
    if t.shape[1] % 128 != 0:
        raise ValueError(
            f"{op}: K = {name}.shape[1] = {t.shape[1]} must be a multiple of 128; pad K"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")
    if t.data_ptr() % 16 != 0:
        raise ValueError(f"{op}: {name} must start at a 16-byte aligned address; .clone() it")
    return t.shape[0], t.shape[1]


def _check_out(op: str, name: str, t, shape, dtype, device, strides=None) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        got = f"{t.dtype}{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be {dtype}{tuple(shape)}, got {got}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if strides is not None and t.numel() and tuple(t.stride()) != tuple(strides):
        raise ValueError(f"{op}: {name} must have strides {tuple(strides)}, got {t.stride()}")


def _mn_major_storage(op: str, scales: torch.Tensor, num_blocks: int, aligned: int):
    """The [Kb, M_aligned] storage behind an MN-major [M, Kb] scales view from a previous call."""
    needed = (scales.storage_offset() + num_blocks * aligned) * scales.element_size()
    if scales.untyped_storage().nbytes() < needed:
        raise ValueError(
            f"{op}: out scales view has too small a storage for [{num_blocks}, "
            f"{aligned}]; pass the scales returned by a previous call"
        )
    return torch.as_strided(scales, (num_blocks, aligned), (aligned, 1))


def _fp8_1x128_outputs(op: str, out, num_rows: int, num_cols: int, mn_major: bool, device):
    """(x_fp8 [M, K], scales [M, Kb] view, scales storage) allocated, or checked from ``out``."""
    num_blocks = num_cols // 128
    aligned = (num_rows + 3) // 4 * 4
    if out is None:
        x_fp8 = torch.empty(num_rows, num_cols, dtype=torch.float8_e4m3fn, device=device)
        if mn_major:
            storage = torch.empty(num_blocks, aligned, dtype=torch.float32, device=device)
            return x_fp8, storage[:, :num_rows].t(), storage
        scales = torch.empty(num_rows, num_blocks, dtype=torch.float32, device=device)
        return x_fp8, scales, scales
    x_fp8, scales = out
    _check_out(
        op, "out[0]", x_fp8, (num_rows, num_cols), torch.float8_e4m3fn, device, (num_cols, 1)
    )
    expected_strides = (1, aligned) if mn_major else (num_blocks, 1)
    _check_out(
        op, "out[1]", scales, (num_rows, num_blocks), torch.float32, device, expected_strides
    )
    storage = _mn_major_storage(op, scales, num_blocks, aligned) if mn_major else scales
    return x_fp8, scales, storage


def quantize_fp8_1x128(
    x_MK: torch.Tensor,
    *,
    ue8m0: bool = False,
    scale_layout: str = "row_major",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 E4M3 with one float32 scale per 1x128 block along K (CUDA).

    scale = max(amax(|block|) / 448, 2^-126), rounded up to a power of two when ``ue8m0``;
    x_fp8 = E4M3 RNE saturating(x * (1 / scale)). Bitwise equal to
    `nmoe_kernels.reference.quantize_fp8_1x128`.

    Args:
        x_MK: [M, K] bfloat16 or float32 CUDA tensor, contiguous, K % 128 == 0, 16-byte aligned,
            finite values.
        ue8m0: round scales up to powers of two (exactly representable as UE8M0 exponents).
        scale_layout: "row_major": scales [M, Kb] contiguous. "mn_major_tma_aligned": scales as a
            [M, Kb] view with strides (1, M_aligned) over storage [Kb, M_aligned], M_aligned = M
            rounded up to 4, pad entries zero (the layout DeepGEMM-style FP8 GEMMs read via TMA).
        out: optional (x_fp8 [M, K] float8_e4m3fn, scales) to write into, as returned by an
            earlier call with the same shape and scale_layout.

    Returns:
        (x_fp8 [M, K] float8_e4m3fn, scales [M, Kb] float32 in ``scale_layout``).
    """
    op = "quantize_fp8_1x128"
    device = _extension.check_cuda_tensors(op, x_MK=x_MK)
    if x_MK.dtype not in _QUANT_INPUTS:
        raise ValueError(f"{op}: x_MK must be bfloat16 or float32, got {x_MK.dtype}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"{op}: scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    num_rows, num_cols = _check_2d_blocked(op, "x_MK", x_MK)
    mn_major = scale_layout == "mn_major_tma_aligned"
    compiled = _extension.compiled_module(op)
    x_fp8, scales, storage = _fp8_1x128_outputs(op, out, num_rows, num_cols, mn_major, device)
    compiled.quantize_fp8_1x128(
        _extension.capsule(x_MK),
        _extension.capsule(x_fp8),
        _extension.capsule(storage),
        bool(ue8m0),
        mn_major,
        _extension.stream_handle(device),
    )
    return x_fp8, scales


def dequantize_fp8_1x128(
    x_fp8_MK: torch.Tensor,
    scales_MKb: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize FP8 1x128 blocks: out = float(x_fp8) * scale, rounded to ``out_dtype`` (CUDA).

    Bitwise equal to `nmoe_kernels.reference.dequantize_fp8_1x128`.

    Args:
        x_fp8_MK: [M, K] float8_e4m3fn CUDA tensor, contiguous, K % 128 == 0.
        scales_MKb: [M, K/128] float32 on the same device, row-major or MN-major (strides
            (1, ld) with ld >= M, as returned with scale_layout="mn_major_tma_aligned").
        out_dtype: torch.bfloat16 or torch.float32.
        out: optional [M, K] ``out_dtype`` contiguous tensor to write into.

    Returns:
        [M, K] ``out_dtype``.
    """
    op = "dequantize_fp8_1x128"
    device = _extension.check_cuda_tensors(op, x_fp8_MK=x_fp8_MK, scales_MKb=scales_MKb)
    if x_fp8_MK.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{op}: x_fp8_MK must be float8_e4m3fn, got {x_fp8_MK.dtype}")
    if scales_MKb.dtype != torch.float32:
        raise ValueError(f"{op}: scales_MKb must be float32, got {scales_MKb.dtype}")
    if out_dtype not in _DEQUANT_OUTPUTS:
        raise ValueError(
            f"{op}: out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}"
        )
    num_rows, num_cols = _check_2d_blocked(op, "x_fp8_MK", x_fp8_MK)
    if tuple(scales_MKb.shape) != (num_rows, num_cols // 128):
        raise ValueError(
            f"{op}: scales_MKb must have shape {(num_rows, num_cols // 128)}, got "
            f"{tuple(scales_MKb.shape)}"
        )
    compiled = _extension.compiled_module(op)
    if out is None:
        out = torch.empty(num_rows, num_cols, dtype=out_dtype, device=device)
    else:
        _check_out(op, "out", out, (num_rows, num_cols), out_dtype, device, (num_cols, 1))
    compiled.dequantize_fp8_1x128(
        _extension.capsule(x_fp8_MK),
        _extension.capsule(scales_MKb),
        _extension.capsule(out),
        _extension.stream_handle(device),
    )
    return out


def quantize_fp8_128x128(
    w: torch.Tensor,
    *,
    ue8m0: bool = False,
    transpose: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights to FP8 E4M3 with one float32 scale per 128x128 block (CUDA).

    Output layout [(E,) N, K], K-major: the B-operand layout Hopper FP8 WGMMA (and the nmoe FP8
    grouped GEMM) reads, with scales [(E,) Nb, Kb]. Blocks start at row 0; when N % 128 != 0 the
    last block row covers the remaining rows. Per block: scale = max(amax / 448, 2^-126), rounded
    up to a power of two when ``ue8m0``; w_fp8 = E4M3 RNE saturating(w * (1 / scale)). Bitwise
    equal to `nmoe_kernels.reference.quantize_fp8_128x128` (same arguments).

    Args:
        w: bfloat16 or float32 CUDA tensor, contiguous, 16-byte aligned, finite values.
            ``transpose=False``: [N, K] or [E, N, K] (N any size, K % 128 == 0).
            ``transpose=True``: [K, N] or [E, K, N] (the ``x @ w`` layout; K % 128 == 0,
            N % 8 == 0); the result is its transpose [(E,) N, K], written by the kernel (no torch
            transpose).
        ue8m0: round scales up to powers of two (exactly representable as UE8M0 exponents).
        transpose: read ``w`` as [(E,) K, N], see ``w``.
        out: optional (w_fp8 [(E,) N, K] float8_e4m3fn, scales [(E,) Nb, Kb] float32), both
            contiguous, to write into.

    Returns:
        (w_fp8 [(E,) N, K] float8_e4m3fn contiguous, scales [(E,) Nb, Kb] float32 contiguous),
        Nb = ceil(N / 128), Kb = K / 128; the leading E is present when ``w`` has it.
    """
    op = "quantize_fp8_128x128"
    device = _extension.check_cuda_tensors(op, w=w)
    if w.dtype not in _QUANT_INPUTS:
        raise ValueError(f"{op}: w must be bfloat16 or float32, got {w.dtype}")
    if w.dim() not in (2, 3):
        layout = "[K, N] or [E, K, N]" if transpose else "[N, K] or [E, N, K]"
        raise ValueError(f"{op}: w must be {layout}, got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{op}: w must be contiguous; call .contiguous() first")
    if w.data_ptr() % 16 != 0:
        raise ValueError(f"{op}: w must start at a 16-byte aligned address; .clone() it")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    num_mats = w3.shape[0]
    n, k = (w3.shape[2], w3.shape[1]) if transpose else (w3.shape[1], w3.shape[2])
    if k % 128 != 0:
        where = "dim -2 (transpose=True)" if transpose else "dim -1"
        raise ValueError(f"{op}: K = {k} (w {where}) must be a multiple of 128; pad K")
    if transpose and n % 8 != 0:
        raise ValueError(
            f"{op}: with transpose=True, N = w.shape[-1] = {n} must be a multiple of 8; pad N "
            "or pass w.transpose(-1, -2).contiguous() with transpose=False"
        )
    lead = (num_mats,) if w.dim() == 3 else ()
    fp8_shape = (*lead, n, k)
    scale_shape = (*lead, (n + 127) // 128, k // 128)
    compiled = _extension.compiled_module(op)
    if out is None:
        w_fp8 = torch.empty(fp8_shape, dtype=torch.float8_e4m3fn, device=device)
        scales = torch.empty(scale_shape, dtype=torch.float32, device=device)
    else:
        w_fp8, scales = out
        _check_out(op, "out[0]", w_fp8, fp8_shape, torch.float8_e4m3fn, device)
        _check_out(op, "out[1]", scales, scale_shape, torch.float32, device)
        for name, t in (("out[0]", w_fp8), ("out[1]", scales)):
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name} must be contiguous")
    compiled.quantize_fp8_128x128(
        _extension.capsule(w3),
        _extension.capsule(w_fp8.view(num_mats, n, k)),
        _extension.capsule(scales.view(num_mats, *scale_shape[-2:])),
        bool(ue8m0),
        bool(transpose),
        _extension.stream_handle(device),
    )
    return w_fp8, scales


def swiglu_quantize_fp8_1x128(
    h_M2F: torch.Tensor,
    *,
    ue8m0: bool = False,
    scale_layout: str = "row_major",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU of an interleaved W13 output, quantized to FP8 E4M3 with 1x128 scales (CUDA).

    Column 2j of ``h_M2F`` is gate_j and column 2j+1 is up_j (the W13 convention of
    `nmoe_kernels.reference.activation`). In float32, one rounding per operation:
    y = (gate / (1 + expf(-gate))) * up, then per 1x128 block of y the FP8 rule of
    `quantize_fp8_1x128`; y is never rounded to bf16. Bitwise equal to
    `nmoe_kernels.reference.swiglu_quantize_fp8_1x128` evaluated on the GPU (torch.exp on CUDA is
    the same expf); against the CPU reference, whose exp differs from expf by a few ulps at
    most, a code can move by one step (measured on an H200: 1 code in 2M) and a scale by a few
    ulps.

    Args:
        h_M2F: [M, 2F] bfloat16 or float32 CUDA tensor, contiguous, 16-byte aligned,
            F % 128 == 0, finite values whose SwiGLU products stay finite.
        ue8m0: round scales up to powers of two.
        scale_layout: "row_major" (scales [M, Fb] contiguous) or "mn_major_tma_aligned" (a
            [M, Fb] view with strides (1, M_aligned) over zero-padded storage [Fb, M_aligned],
            M_aligned = M rounded up to 4), as in `quantize_fp8_1x128`.
        out: optional (y_fp8 [M, F] float8_e4m3fn, scales) from an earlier call with the same
            shape and scale_layout.

    Returns:
        (y_fp8 [M, F] float8_e4m3fn, scales [M, Fb] float32 in ``scale_layout``).
    """
    op = "swiglu_quantize_fp8_1x128"
    device = _extension.check_cuda_tensors(op, h_M2F=h_M2F)
    if h_M2F.dtype not in _QUANT_INPUTS:
        raise ValueError(f"{op}: h_M2F must be bfloat16 or float32, got {h_M2F.dtype}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"{op}: scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    if h_M2F.dim() != 2 or h_M2F.shape[1] % 256 != 0:
        raise ValueError(
            f"{op}: h_M2F must be [M, 2F] with F % 128 == 0 (2F a multiple of 256), got shape "
            f"{tuple(h_M2F.shape)}; pad F"
        )
    if not h_M2F.is_contiguous():
        raise ValueError(f"{op}: h_M2F must be contiguous; call .contiguous() first")
    if h_M2F.data_ptr() % 16 != 0:
        raise ValueError(f"{op}: h_M2F must start at a 16-byte aligned address; .clone() it")
    num_rows, num_features = h_M2F.shape[0], h_M2F.shape[1] // 2
    mn_major = scale_layout == "mn_major_tma_aligned"
    compiled = _extension.compiled_module(op)
    y_fp8, scales, storage = _fp8_1x128_outputs(op, out, num_rows, num_features, mn_major, device)
    compiled.swiglu_quantize_fp8_1x128(
        _extension.capsule(h_M2F),
        _extension.capsule(y_fp8),
        _extension.capsule(storage),
        bool(ue8m0),
        mn_major,
        _extension.stream_handle(device),
    )
    return y_fp8, scales
