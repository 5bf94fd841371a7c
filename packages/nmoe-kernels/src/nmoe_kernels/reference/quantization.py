"""Pure-torch reference for the blockscaled quantization formats (CPU or GPU).

Shape letters: M rows, K the dim the blocks run along (the GEMM reduction dim), N the other
weight dim, E experts, Kb = K / block size, F the SwiGLU output dim (its input h_M2F is [M, 2F]).

Formats (one function pair per format; the compiled ops are tested bitwise against these):

- FP8 1x128 (activations): E4M3 elements, one float32 scale per 1x128 block along K.
- FP8 128x128 (weights): E4M3 elements, one float32 scale per 128x128 block of the last two dims
  (weights [..., N, K], K-major; optionally read from [..., K, N] and transposed).
- SwiGLU + FP8 1x128: SwiGLU of an interleaved W13 GEMM output, then the FP8 1x128 format.
- MXFP8 1x32: E4M3 elements, one UE8M0 scale (uint8 exponent byte, bias 127) per 32 elements.
- NVFP4: E2M1 elements packed two per uint8 (low nibble first), one E4M3 scale per 16 elements,
  and one float32 global scale per tensor.

The FP8 scale rule (all FP8 formats; the CUDA kernel performs the same float32 operations):

    amax  = max |x| over the block                     (float32)
    scale = amax / 448                                 (IEEE float32 division)
    scale = 2^-126 where scale < 2^-126                (smallest normal float32)
    ue8m0: scale = 2^ceil(log2(scale))                 (round the bit pattern up to a power of 2)
    x_fp8 = E4M3(clamp(x * (1 / scale), -448, 448))    (float32 reciprocal and product, RNE)

The 2^-126 floor keeps 1 / scale finite for any finite block, so an all-zero block quantizes to
zeros with scale 2^-126 (and dequantizes to zeros), and tiny blocks are never flushed. Inputs must
be finite; a NaN or Inf in a block makes that block's result unspecified.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
MIN_SCALE = 2.0**-126
SCALE_LAYOUTS = ("row_major", "mn_major_tma_aligned")

# E2M1 magnitudes by 3-bit code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _check_input(op: str, name: str, x: torch.Tensor, block: int, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, got {tuple(x.shape)}")
    if x.shape[-1] % block != 0:
        raise ValueError(
            f"{op}: the last dim of {name} ({x.shape[-1]}) must be a multiple of {block}; pad it"
        )


def _check_dtype(op: str, name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != dtype:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a {dtype} tensor, got {got}")


def _divide(x: torch.Tensor, constant: float) -> torch.Tensor:
    # Divide by a tensor, not a Python scalar: on CUDA torch turns `t / scalar` into a multiply
    # by the reciprocal, which rounds differently from the kernels' IEEE division.
    return x / torch.full_like(x, constant)


def _round_up_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(scale)) for positive normal float32 ``scale``, by integer ops on the bits."""
    bits = scale.view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    has_mantissa = (bits & 0x007FFFFF) != 0
    rounded = (bits + 0x00800000) & 0x7F800000
    return torch.where(finite & has_mantissa, rounded, bits).view(torch.float32)


def fp8_scale(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """The FP8 block scale for block maxima ``amax`` (float32, any shape); see the module rule."""
    scale = _divide(amax.float(), FP8_E4M3_MAX)
    scale = torch.where(scale < MIN_SCALE, torch.full_like(scale, MIN_SCALE), scale)
    return _round_up_to_power_of_two(scale) if ue8m0 else scale


def to_e4m3_saturating(values: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn with round-to-nearest-even, saturating to +-448 (not NaN)."""
    return values.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def _quantize_blocks(blocks: torch.Tensor, amax: torch.Tensor, ue8m0: bool):
    """Quantize ``blocks`` (float32) given ``amax`` broadcastable to it; returns (fp8, scale)."""
    scale = fp8_scale(amax, ue8m0)
    inv_scale = torch.reciprocal(scale)
    return to_e4m3_saturating(blocks * inv_scale), scale


def to_mn_major_tma_aligned(scales_MKb: torch.Tensor) -> torch.Tensor:
    """Re-lay 1x128 scales [M, Kb] as DeepGEMM-style MN-major, TMA-aligned scales.

    Returns a [M, Kb] float32 view with strides (1, M_aligned), M_aligned = M rounded up to a
    multiple of 4 (16 bytes), over zero-padded storage [Kb, M_aligned] (row-major).
    """
    num_rows, num_blocks = scales_MKb.shape
    aligned = (num_rows + 3) // 4 * 4
    storage = scales_MKb.new_zeros(num_blocks, aligned)
    storage[:, :num_rows] = scales_MKb.t()
    return storage[:, :num_rows].t()


def quantize_fp8_1x128(
    x_MK: torch.Tensor, *, ue8m0: bool = False, scale_layout: str = "row_major"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 E4M3 with one float32 scale per 1x128 block along K.

    Args:
        x_MK: [M, K] float32, bfloat16 or float16, K % 128 == 0, finite values. Any device.
        ue8m0: round each scale up to a power of two (exactly representable as UE8M0).
        scale_layout: "row_major" gives scales [M, K/128] contiguous; "mn_major_tma_aligned"
            gives the same logical [M, K/128] as a view with strides (1, M_aligned) over
            zero-padded storage [K/128, M_aligned], M_aligned = M rounded up to 4.

    Returns:
        (x_fp8 [M, K] float8_e4m3fn, scales [M, K/128] float32) with x ~= x_fp8 * scales
        broadcast over each block; the scale rule is in the module docstring.
    """
    op = "quantize_fp8_1x128"
    _check_input(op, "x_MK", x_MK, 128, min_dim=2)
    if x_MK.dim() != 2:
        raise ValueError(f"{op}: x_MK must be 2-D [M, K], got shape {tuple(x_MK.shape)}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"{op}: scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    num_rows, num_cols = x_MK.shape
    blocks = x_MK.float().reshape(num_rows, num_cols // 128, 128)
    x_fp8, scales = _quantize_blocks(blocks, blocks.abs().amax(dim=-1, keepdim=True), ue8m0)
    scales = scales.reshape(num_rows, num_cols // 128)
    if scale_layout == "mn_major_tma_aligned":
        scales = to_mn_major_tma_aligned(scales)
    return x_fp8.reshape(num_rows, num_cols), scales


def dequantize_fp8_1x128(
    x_fp8_MK: torch.Tensor, scales_MKb: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize_fp8_1x128`: ``x_fp8 * scale`` in float32, rounded to ``out_dtype``.

    Args:
        x_fp8_MK: [M, K] float8_e4m3fn, K % 128 == 0.
        scales_MKb: [M, K/128] float32, any strides (row-major or MN-major).
        out_dtype: output dtype (bfloat16, float32, float16).

    Returns:
        [M, K] ``out_dtype``.
    """
    op = "dequantize_fp8_1x128"
    _check_dtype(op, "x_fp8_MK", x_fp8_MK, torch.float8_e4m3fn)
    _check_dtype(op, "scales_MKb", scales_MKb, torch.float32)
    if x_fp8_MK.dim() != 2 or x_fp8_MK.shape[1] % 128 != 0:
        raise ValueError(
            f"{op}: x_fp8_MK must be [M, K] with K % 128 == 0, got {tuple(x_fp8_MK.shape)}"
        )
    expected = (x_fp8_MK.shape[0], x_fp8_MK.shape[1] // 128)
    if tuple(scales_MKb.shape) != expected:
        raise ValueError(
            f"{op}: scales_MKb must have shape {expected}, got {tuple(scales_MKb.shape)}"
        )
    scale = scales_MKb.repeat_interleave(128, dim=1)
    return (x_fp8_MK.float() * scale).to(out_dtype)


def quantize_fp8_128x128(
    w: torch.Tensor, *, ue8m0: bool = False, transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights to FP8 E4M3 with one float32 scale per 128x128 block of the last 2 dims.

    The result is laid out [..., N, K] (K-major, the layout Hopper FP8 WGMMA reads for the B
    operand) with K the GEMM reduction dim. Blocks are aligned at row 0 and column 0; when N is
    not a multiple of 128 the last block row holds the remaining N % 128 rows (its amax runs over
    those rows only), so scales are [..., ceil(N/128), K/128].

    Args:
        w: float32, bfloat16 or float16 weights, finite values. With ``transpose=False``:
            [..., N, K], e.g. one weight [N, K] or experts [E, N, K]. With ``transpose=True``:
            [..., K, N] (e.g. expert weights [E, K, N] as used by ``x @ w``), quantized as
            ``w.transpose(-1, -2)`` and returned transposed, i.e. [..., N, K] contiguous.
            K % 128 == 0; N is any size.
        ue8m0: round each scale up to a power of two.
        transpose: read ``w`` as [..., K, N] (see ``w``).

    Returns:
        (w_fp8 [..., N, K] float8_e4m3fn contiguous, scales [..., ceil(N/128), K/128] float32).
    """
    op = "quantize_fp8_128x128"
    _check_input(op, "w", w, 1, min_dim=2)
    if transpose:
        w = w.transpose(-1, -2)
    *lead, rows, cols = w.shape
    if cols % 128 != 0:
        dims = "[..., K, N] (transpose=True): dim -2" if transpose else "[..., N, K]: dim -1"
        raise ValueError(f"{op}: K of w {dims} is {cols}, it must be a multiple of 128; pad it")
    row_blocks = (rows + 127) // 128
    padded = w.float().new_zeros(*lead, row_blocks * 128, cols)
    padded[..., :rows, :] = w.float()  # zero rows do not change any block's amax
    blocks = padded.reshape(*lead, row_blocks, 128, cols // 128, 128)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)
    w_fp8, scales = _quantize_blocks(blocks, amax, ue8m0)
    w_fp8 = w_fp8.reshape(*lead, row_blocks * 128, cols)[..., :rows, :].contiguous()
    return w_fp8, scales.reshape(*lead, row_blocks, cols // 128)


def dequantize_fp8_128x128(
    w_fp8: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize_fp8_128x128`.

    Args:
        w_fp8: [..., N, K] float8_e4m3fn, K % 128 == 0, N any size.
        scales: [..., ceil(N/128), K/128] float32.
        out_dtype: output dtype.

    Returns:
        [..., N, K] ``out_dtype`` = w_fp8 * scale (float32 product, then rounded).
    """
    op = "dequantize_fp8_128x128"
    _check_dtype(op, "w_fp8", w_fp8, torch.float8_e4m3fn)
    _check_dtype(op, "scales", scales, torch.float32)
    *lead, rows, cols = w_fp8.shape
    row_blocks = (rows + 127) // 128
    if cols % 128 or tuple(scales.shape) != (*lead, row_blocks, cols // 128):
        raise ValueError(
            f"{op}: w_fp8 {tuple(w_fp8.shape)} and scales {tuple(scales.shape)} "
            "must be [..., N, K] and [..., ceil(N/128), K/128] with K % 128 == 0"
        )
    scale = scales.repeat_interleave(128, dim=-2)[..., :rows, :].repeat_interleave(128, dim=-1)
    return (w_fp8.float() * scale).to(out_dtype)


def swiglu_quantize_fp8_1x128(
    h_M2F: torch.Tensor, *, ue8m0: bool = False, scale_layout: str = "row_major"
) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU of an interleaved W13 output, quantized to FP8 E4M3 with 1x128 scales along F.

    With ``h = h_M2F.float()``, gate = h[:, 0::2] and up = h[:, 1::2] (the W13 convention of
    `nmoe_kernels.reference.activation`), this is exactly the float32 sequence

        e    = exp(-gate)                  (torch.exp)
        silu = gate / (1 + e)              (float32 add, then IEEE float32 division)
        y    = silu * up                   (float32 product; never rounded to bf16)
        (y_fp8, scales) = quantize_fp8_1x128(y, ue8m0=ue8m0, scale_layout=scale_layout)

    i.e. ``quantize_fp8_1x128(swiglu_interleaved(h_M2F.float()))`` with SiLU written out. The
    CUDA op performs the same operations one by one (``expf``, ``__fadd_rn``, ``__fdiv_rn``,
    ``__fmul_rn``): on a GPU, where torch.exp is CUDA's ``expf``, the two agree bitwise; the CPU
    torch.exp may differ from ``expf`` by a few ulps, which can move an FP8 code by one step
    and a (non-UE8M0) scale by a few ulps.

    Args:
        h_M2F: [M, 2F] float32, bfloat16 or float16, F % 128 == 0, finite values whose SwiGLU
            products stay finite.
        ue8m0: round each scale up to a power of two.
        scale_layout: "row_major" or "mn_major_tma_aligned", as in `quantize_fp8_1x128`.

    Returns:
        (y_fp8 [M, F] float8_e4m3fn, scales [M, F/128] float32 in ``scale_layout``).
    """
    op = "swiglu_quantize_fp8_1x128"
    _check_input(op, "h_M2F", h_M2F, 256, min_dim=2)
    if h_M2F.dim() != 2:
        raise ValueError(f"{op}: h_M2F must be 2-D [M, 2F], got shape {tuple(h_M2F.shape)}")
    h = h_M2F.float()
    gate, up = h[:, 0::2], h[:, 1::2]
    silu = gate / (1.0 + torch.exp(-gate))
    return quantize_fp8_1x128(silu * up, ue8m0=ue8m0, scale_layout=scale_layout)


def e8m0_to_float(scale_bytes: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 exponent bytes (uint8) to float32 2^(byte - 127); 0 -> 2^-127, 255 -> NaN."""
    biased = scale_bytes.to(torch.int32)
    bits = torch.where(biased == 0, torch.full_like(biased, 0x00400000), biased << 23)
    bits = torch.where(biased == 255, torch.full_like(biased, 0x7FC00000), bits)
    return bits.view(torch.float32)


def quantize_mxfp8_1x32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to MXFP8: E4M3 elements, one UE8M0 scale per 32 consecutive elements along K.

    The scale is 2^ceil(log2(amax / 448)) (the module's FP8 rule with ue8m0, block 32), so no
    element saturates; it is stored as its biased exponent byte (bias 127, never 0 or 255 for
    finite inputs).

    Args:
        x: [..., K] float32, bfloat16 or float16, K % 32 == 0.

    Returns:
        (x_fp8 [..., K] float8_e4m3fn, scales [..., K/32] uint8 exponent bytes).
    """
    _check_input("quantize_mxfp8_1x32", "x", x, 32)
    *lead, cols = x.shape
    blocks = x.float().reshape(*lead, cols // 32, 32)
    x_fp8, scales = _quantize_blocks(blocks, blocks.abs().amax(dim=-1, keepdim=True), True)
    scale_bytes = (scales.view(torch.int32) >> 23).to(torch.uint8).reshape(*lead, cols // 32)
    return x_fp8.reshape(x.shape), scale_bytes


def dequantize_mxfp8_1x32(
    x_fp8: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of `quantize_mxfp8_1x32`.

    Args:
        x_fp8: [..., K] float8_e4m3fn, K % 32 == 0.
        scales: [..., K/32] uint8 UE8M0 exponent bytes.
        out_dtype: output dtype.

    Returns:
        [..., K] ``out_dtype``.
    """
    op = "dequantize_mxfp8_1x32"
    _check_dtype(op, "x_fp8", x_fp8, torch.float8_e4m3fn)
    _check_dtype(op, "scales", scales, torch.uint8)
    if x_fp8.shape[-1] % 32 or tuple(scales.shape) != (*x_fp8.shape[:-1], x_fp8.shape[-1] // 32):
        raise ValueError(
            f"{op}: x_fp8 {tuple(x_fp8.shape)} and scales {tuple(scales.shape)} "
            "must be [..., K] and [..., K/32] with K % 32 == 0"
        )
    scale = e8m0_to_float(scales).repeat_interleave(32, dim=-1)
    return (x_fp8.float() * scale).to(out_dtype)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """float32 -> 4-bit E2M1 codes (uint8, bit 3 = sign), round-to-nearest-even, saturating at 6.

    Representable magnitudes: 0, 0.5, 1, 1.5, 2, 3, 4, 6. Ties go to the even code (0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); the sign of zero is kept.
    """
    mag = values.abs()
    code = (
        (mag > 0.25).to(torch.uint8)
        + (mag >= 0.75)
        + (mag > 1.25)
        + (mag >= 1.75)
        + (mag > 2.5)
        + (mag >= 3.5)
        + (mag > 5.0)
    ).to(torch.uint8)
    return code | (torch.signbit(values).to(torch.uint8) << 3)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode 4-bit E2M1 codes (uint8 holding 0..15) to float32."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [..., K] (K even) into bytes [..., K/2]: element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: bytes [..., K/2] -> codes [..., K] (uint8, 0..15)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """The NVFP4 per-tensor scale: max(amax(|x|) / (448 * 6), 2^-126) as a 0-dim float32 tensor."""
    amax = x.float().abs().amax()
    scale = _divide(amax, FP8_E4M3_MAX * FP4_E2M1_MAX)
    return torch.where(scale < MIN_SCALE, torch.full_like(scale, MIN_SCALE), scale)


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize to NVFP4: E2M1 elements, one E4M3 scale per 16 elements, a float32 global scale.

    Per 16-element block b, in float32:

        g       = global_scale (default `nvfp4_global_scale(x)` = amax / 2688, floored at 2^-126)
        s_b     = E4M3((amax_b / 6) / g)          (RNE, saturating at 448)
        eff_b   = float(s_b) * g
        q       = E2M1(x * (1 / eff_b))           (RNE, saturating at 6; q = 0 where eff_b == 0)

    Dequantized value: E2M1 value * eff_b. Blocks whose scale underflows E4M3 (amax_b below about
    2^-10 * 6 * g) quantize to zeros.

    Args:
        x: [..., K] float32, bfloat16 or float16, K % 16 == 0.
        global_scale: optional 0-dim float32 tensor (e.g. from calibration); its value must be
            positive and finite.

    Returns:
        (x_packed [..., K/2] uint8 with element 2i in the low nibble of byte i (bit 3 of each
        nibble is the sign), scales [..., K/16] float8_e4m3fn, global_scale 0-dim float32).
    """
    op = "quantize_nvfp4"
    _check_input(op, "x", x, 16)
    if global_scale is None:
        global_scale = nvfp4_global_scale(x)
    else:
        _check_dtype(op, "global_scale", global_scale, torch.float32)
        if global_scale.dim() != 0:
            raise ValueError(
                f"{op}: global_scale must be a 0-dim tensor, got {tuple(global_scale.shape)}"
            )
    global_scale = global_scale.to(x.device)
    *lead, cols = x.shape
    blocks = x.float().reshape(*lead, cols // 16, 16)
    block_amax = blocks.abs().amax(dim=-1)
    scales = to_e4m3_saturating(_divide(block_amax, FP4_E2M1_MAX) / global_scale)
    effective = scales.float() * global_scale
    inv = torch.where(effective == 0, torch.zeros_like(effective), torch.reciprocal(effective))
    codes = e2m1_codes(blocks * inv.unsqueeze(-1)).reshape(x.shape)
    return pack_fp4(codes), scales, global_scale


def dequantize_nvfp4(
    x_packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Inverse of `quantize_nvfp4`: E2M1 value * (float(scale) * global_scale), then rounded.

    Args:
        x_packed: [..., K/2] uint8, two E2M1 codes per byte, element 2i in the low nibble.
        scales: [..., K/16] float8_e4m3fn.
        global_scale: 0-dim float32 tensor.
        out_dtype: output dtype.

    Returns:
        [..., K] ``out_dtype``.
    """
    op = "dequantize_nvfp4"
    _check_dtype(op, "x_packed", x_packed, torch.uint8)
    _check_dtype(op, "scales", scales, torch.float8_e4m3fn)
    _check_dtype(op, "global_scale", global_scale, torch.float32)
    cols = x_packed.shape[-1] * 2
    if cols % 16 or tuple(scales.shape) != (*x_packed.shape[:-1], cols // 16):
        raise ValueError(
            f"{op}: x_packed {tuple(x_packed.shape)} and scales "
            f"{tuple(scales.shape)} must be [..., K/2] and [..., K/16], K % 16 == 0"
        )
    effective = (scales.float() * global_scale).repeat_interleave(16, dim=-1)
    return (e2m1_to_float(unpack_fp4(x_packed)) * effective).to(out_dtype)
