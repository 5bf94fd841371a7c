"""FP8 blockscaled grouped GEMMs for MoE experts on Hopper (CuTeDSL kernels, sm_90a).

Shape letters: M rows (tokens routed here, sorted by expert), K input dim, N output dim, E experts,
F expert intermediate dim (the W13 GEMM has N = 2F), Kb = K / 128, Nb = N / 128, Fb = F / 128.

Formats (DeepSeek-V3 recipe):

- Activations: FP8 E4M3 ``x_fp8_MK`` with one float32 scale per 1x128 block along K,
  ``x_scales_MKb`` [M, Kb] as an MN-major view with strides (1, M_al) over storage [Kb, M_al],
  M_al = M rounded up to 4 -- what ``quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")``
  returns (or `nmoe_kernels.reference.to_mn_major_tma_aligned` of row-major scales).
- Weights: FP8 E4M3 ``w_fp8_ENK`` [E, N, K] (K-major, what FP8 wgmma reads) with one float32
  scale per 128x128 block, ``w_scales_ENbKb`` [E, Nb, Kb]. `fp8_weights_to_nk` converts the model's
  [E, K, N] layout (and its [E, Kb, Nb] scales) once, at load time.
- ``offsets_E1`` [E + 1] int32 on the GPU: rows offsets[e]:offsets[e+1] belong to expert e (any
  length, 0 included); rows offsets[E]:M are padding and get zero output. The offsets are never
  read on the host (no sync); they must be valid (0 = offsets[0] <= ... <= offsets[E] <= M).

Accumulation: fp32, with per-128-K-block promotion (wgmma accumulates one K block in fresh
registers, then ``acc += x_scale[m, kb] * w_scale[e, n // 128, kb] * partial``). Kernels compile
on first use per (epilogue, ue8m0, cluster) with M, N, K, E symbolic, and are cached for the
process; the CTA tile (128 x 256 wherever N % 256 == 0, else 128 x 128) and, on 128 x 128, the
cluster (TMA multicast between two CTAs) are chosen per call from N, K and the rows per expert
(`choose_config`), the same bits either way.
"""

from __future__ import annotations

import functools

import torch

from nmoe_kernels._launch import capability, device_index

__all__ = [
    "grouped_gemm_fp8_blockscaled",
    "grouped_gemm_fp8_swiglu_quant",
    "fp8_weights_to_nk",
]

_FP8 = torch.float8_e4m3fn


# On 128 x 128 tiles (N % 256 == 128) the public ops pick the cluster per call (`choose_cluster`):
# long reductions or long segments run L2-bound there (32 KiB of operands per 4 MFLOP K block),
# and a cluster of two CTAs that multicasts one operand cuts those reads by a quarter. On one
# H100, against one CTA launched without a cluster attribute in the same 5 round-robin passes
# (bench/results/fp8_H100_launch_fix_clusters.txt): (2, 1) ran 4-8% faster at DeepGEMM's shape
# (4 x 8192 rows, N 4096) for K 2048-7168 and at dsv3-local's W2 (K 2048, 2048 rows per expert),
# 3% at moonlight's W2 (K 1408, 1536 rows); one CTA was fastest or tied at moonlight's W13 (K 2048,
# 1536 rows) and super's. (The earlier 7-26% of bench/results/fp8_H100_clusters_k.txt compared
# against a one-CTA launch that carried a 1 x 1 x 1 cluster attribute, itself up to 9% slower.)
LONG_CLUSTER = {"bf16": (2, 1), "swiglu_quant": (1, 2)}
CLUSTER_MIN_K = 4096
CLUSTER_MIN_ROWS_PER_EXPERT = 2048
# The CTA tile: wherever N % 256 == 0 both epilogues run one CTA on 128 x 256 tiles
# (`cute.grouped_gemm_fp8_wide`, 25% fewer operand bytes per FLOP than 128 x 128) with both
# column halves' scales read before a K block's first wait (`kernel_config(early_scales=True)`).
# On one H100, in paired rounds (bench/ab_fp8.py, bench/results/fp8_H100_ab_wide.txt), one CTA
# on 128 x 256 ran 4-7% faster than the (2, 1) cluster on it at every W13 and W2 shape and at
# DeepGEMM's (40 of 40 rounds each), and 10-14% faster than one CTA on 128 x 128 at super's and
# moonlight's W13; swiglu_quant on it was 2-3% faster than the 128 x 128 kernel at moonlight and
# super and 5-6% faster at dsv3-local. (The clusters had won against a one-CTA launch that
# carried a cluster attribute; the wide tile was not re-measured on one CTA after that fix.)
WIDE_TILE = (128, 256)


def choose_config(
    epilogue: str, num_rows: int, n: int, k: int, num_experts: int
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(cluster, tile) the public ops launch: one CTA on `WIDE_TILE` where N % 256 == 0;
    otherwise 128 x 128 tiles (None) with `choose_cluster`'s cluster. Every cluster and tile
    writes the same bits (GPU tests), so the choice only moves time."""
    cluster = choose_cluster(epilogue, num_rows, k, num_experts)  # also checks the epilogue
    if n % WIDE_TILE[1] == 0:
        return (1, 1), WIDE_TILE
    return cluster, None


def choose_cluster(epilogue: str, num_rows: int, k: int, num_experts: int) -> tuple[int, int]:
    """The cluster of the 128 x 128 tile (N % 256 == 128, `choose_config`): `LONG_CLUSTER`
    where K >= `CLUSTER_MIN_K` or the experts average at least `CLUSTER_MIN_ROWS_PER_EXPERT`
    rows, else one CTA. Every cluster shape writes the same bits (GPU test), so the choice only
    moves time."""
    if epilogue not in LONG_CLUSTER:
        raise ValueError(f"epilogue must be one of {tuple(LONG_CLUSTER)}, got {epilogue!r}")
    if k >= CLUSTER_MIN_K or num_rows >= CLUSTER_MIN_ROWS_PER_EXPERT * max(num_experts, 1):
        return LONG_CLUSTER[epilogue]
    return (1, 1)


@functools.cache
def _compiled(epilogue: str, ue8m0: bool, cluster: tuple[int, int], tile=None, device: int = 0):
    """The compiled kernel, one per device (CuTeDSL loads its module into the context of the
    device it first runs on; a compiled function must not be called on several devices)."""
    from nmoe_kernels.cute.grouped_gemm_fp8 import compile_kernel

    return compile_kernel(epilogue, ue8m0, cluster=cluster, tile=tile)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    device = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(
                f"{op}: {name} must be a CUDA tensor, got one on {t.device}; on CPU use "
                "nmoe_kernels.reference.grouped_gemm_fp8_blockscaled"
            )
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    assert device is not None
    major, minor = capability(device_index(device))
    if (major, minor) != (9, 0):
        raise RuntimeError(
            f"{op}: needs an sm_90a GPU (H100/H200), got compute capability {major}.{minor}; "
            "use nmoe_kernels.reference.grouped_gemm_fp8_blockscaled instead"
        )
    return device


def _check_aligned(op: str, name: str, t: torch.Tensor) -> None:
    if t.data_ptr() % 16:
        raise ValueError(f"{op}: {name} must start at a 16-byte aligned address; .clone() it")


def _check_inputs(op, x_fp8_MK, x_scales_MKb, w_fp8_ENK, w_scales_ENbKb, offsets_E1, n_align):
    device = _check_device(
        op,
        x_fp8_MK=x_fp8_MK,
        x_scales_MKb=x_scales_MKb,
        w_fp8_ENK=w_fp8_ENK,
        w_scales_ENbKb=w_scales_ENbKb,
        offsets_E1=offsets_E1,
    )
    if x_fp8_MK.dtype != _FP8 or x_fp8_MK.dim() != 2:
        raise ValueError(
            f"{op}: x_fp8_MK must be a 2-D float8_e4m3fn tensor [M, K], got "
            f"{x_fp8_MK.dtype}{tuple(x_fp8_MK.shape)}"
        )
    num_rows, k = x_fp8_MK.shape
    if k == 0 or k % 128:
        raise ValueError(f"{op}: K = x_fp8_MK.shape[1] = {k} must be a positive multiple of 128")
    if not x_fp8_MK.is_contiguous():
        raise ValueError(f"{op}: x_fp8_MK must be contiguous (row-major); call .contiguous()")
    _check_aligned(op, "x_fp8_MK", x_fp8_MK)

    kb = k // 128
    aligned = (num_rows + 3) // 4 * 4
    if x_scales_MKb.dtype != torch.float32 or tuple(x_scales_MKb.shape) != (num_rows, kb):
        raise ValueError(
            f"{op}: x_scales_MKb must be float32 [M, K/128] = [{num_rows}, {kb}], got "
            f"{x_scales_MKb.dtype}{tuple(x_scales_MKb.shape)}"
        )
    stride_m, stride_k = x_scales_MKb.stride()
    # No rows (an expert-parallel rank that receives none): any strides, nothing is read.
    if num_rows > 0 and (num_rows > 1 and stride_m != 1 or kb > 1 and stride_k != aligned):
        raise ValueError(
            f"{op}: x_scales_MKb must be MN-major with strides (1, {aligned}) (M rounded up to "
            f"4), got strides {x_scales_MKb.stride()}; quantize with "
            "quantize_fp8_1x128(x, scale_layout='mn_major_tma_aligned') or convert with "
            "nmoe_kernels.reference.to_mn_major_tma_aligned"
        )
    _check_aligned(op, "x_scales_MKb", x_scales_MKb)

    if w_fp8_ENK.dtype != _FP8 or w_fp8_ENK.dim() != 3 or w_fp8_ENK.shape[2] != k:
        raise ValueError(
            f"{op}: w_fp8_ENK must be float8_e4m3fn [E, N, K] with K = {k} (K-major weights; "
            f"convert [E, K, N] with fp8_weights_to_nk), got {w_fp8_ENK.dtype}"
            f"{tuple(w_fp8_ENK.shape)}"
        )
    num_experts, n, _ = w_fp8_ENK.shape
    if num_experts == 0 or n == 0 or n % n_align:
        raise ValueError(
            f"{op}: w_fp8_ENK [E, N, K] needs E >= 1 and N a positive multiple of {n_align}, "
            f"got {tuple(w_fp8_ENK.shape)}"
        )
    if not w_fp8_ENK.is_contiguous():
        raise ValueError(f"{op}: w_fp8_ENK must be contiguous; call .contiguous()")
    _check_aligned(op, "w_fp8_ENK", w_fp8_ENK)
    want = (num_experts, n // 128, kb)
    if w_scales_ENbKb.dtype != torch.float32 or tuple(w_scales_ENbKb.shape) != want:
        raise ValueError(
            f"{op}: w_scales_ENbKb must be float32 [E, N/128, K/128] = {list(want)}, got "
            f"{w_scales_ENbKb.dtype}{tuple(w_scales_ENbKb.shape)}"
        )
    if not w_scales_ENbKb.is_contiguous():
        raise ValueError(f"{op}: w_scales_ENbKb must be contiguous; call .contiguous()")

    if offsets_E1.dtype not in (torch.int32, torch.int64) or offsets_E1.shape != (
        num_experts + 1,
    ):
        raise ValueError(
            f"{op}: offsets_E1 must be an int32 tensor [E + 1] = [{num_experts + 1}], got "
            f"{offsets_E1.dtype}{tuple(offsets_E1.shape)}"
        )
    offsets = offsets_E1.to(torch.int32).contiguous()
    if num_rows >= 2**31:
        raise ValueError(f"{op}: M = {num_rows} must be < 2^31")
    return device, num_rows, n, k, num_experts, aligned, offsets


def _launch(epilogue, ue8m0, device, x, xs, w, ws, out, out_scales, offsets, dims):
    from nmoe_kernels.cute.grouped_gemm_fp8 import launch

    num_rows, n, k, num_experts, aligned = dims
    cluster, tile = choose_config(epilogue, num_rows, n, k, num_experts)
    index = device_index(device)
    if index != torch.cuda.current_device():  # the kernel launches into the current context
        with torch.cuda.device(index):
            return _launch(epilogue, ue8m0, device, x, xs, w, ws, out, out_scales, offsets, dims)
    launch(
        _compiled(epilogue, ue8m0, cluster, tile, index),
        epilogue,
        x.data_ptr(),
        xs.data_ptr(),
        w.data_ptr(),
        ws.data_ptr(),
        out.data_ptr(),
        out_scales.data_ptr(),
        offsets.data_ptr(),
        num_rows,
        n,
        k,
        num_experts,
        aligned,
        _num_sms(index),
        torch.cuda.current_stream(device).cuda_stream,
        cluster=cluster,
        tile=tile,
    )


def grouped_gemm_fp8_blockscaled(
    x_fp8_MK: torch.Tensor,
    x_scales_MKb: torch.Tensor,
    w_fp8_ENK: torch.Tensor,
    w_scales_ENbKb: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 blockscaled grouped GEMM: y[rows of e] = dequant(x[rows of e]) @ dequant(w[e])^T.

    Equal to `nmoe_kernels.reference.grouped_gemm_fp8_blockscaled(x, xs, w.transpose(1, 2),
    ws.transpose(1, 2), offsets)` up to fp32 accumulation order, then rounded to bf16.

    Args:
        x_fp8_MK: [M, K] float8_e4m3fn CUDA tensor, contiguous, K % 128 == 0, rows sorted by
            expert.
        x_scales_MKb: [M, K/128] float32 1x128 scales, MN-major: strides (1, M_al) with
            M_al = M rounded up to 4 (``scale_layout="mn_major_tma_aligned"``).
        w_fp8_ENK: [E, N, K] float8_e4m3fn, contiguous, N % 128 == 0 (`fp8_weights_to_nk`).
        w_scales_ENbKb: [E, N/128, K/128] float32 128x128 block scales, contiguous.
        offsets_E1: [E + 1] int32 (int64 is converted) cumulative expert row offsets on the GPU.
        out: optional [M, N] bfloat16 contiguous tensor to write into.

    Returns:
        y_MN [M, N] bfloat16; padding rows (>= offsets[E]) are zero.
    """
    op = "grouped_gemm_fp8_blockscaled"
    device, num_rows, n, k, num_experts, aligned, offsets = _check_inputs(
        op, x_fp8_MK, x_scales_MKb, w_fp8_ENK, w_scales_ENbKb, offsets_E1, 128
    )
    if out is None:
        out = torch.empty(num_rows, n, dtype=torch.bfloat16, device=device)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype != torch.bfloat16
        or tuple(out.shape) != (num_rows, n)
        or out.device != device
        or not out.is_contiguous()
    ):
        raise ValueError(f"{op}: out must be a contiguous bfloat16 [{num_rows}, {n}] on {device}")
    _check_aligned(op, "out", out)
    if num_rows == 0:
        return out
    _launch(
        "bf16", False, device, x_fp8_MK, x_scales_MKb, w_fp8_ENK, w_scales_ENbKb, out, out,
        offsets, (num_rows, n, k, num_experts, aligned),
    )
    return out


def grouped_gemm_fp8_swiglu_quant(
    x_fp8_MK: torch.Tensor,
    x_scales_MKb: torch.Tensor,
    w13_fp8_E2FK: torch.Tensor,
    w13_scales_E2FbKb: torch.Tensor,
    offsets_E1: torch.Tensor,
    *,
    ue8m0: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W13 grouped GEMM with a fused SwiGLU and FP8 1x128 quantization of the result.

    h = the GEMM of `grouped_gemm_fp8_blockscaled` (fp32), with W13's output columns interleaved
    (column 2j = gate_j, 2j+1 = up_j; `reference.interleave_w13`). Per row, in float32 with the
    roundings of the unfused bf16 path: g, u = bf16(h[2j]), bf16(h[2j+1]);
    a_j = bf16(silu(g) * u); then `quantize_fp8_1x128` of a (scale per 128 features:
    max(amax / 448, 2^-126), a power of two with ``ue8m0``). Matches
    ``quantize_fp8_1x128(swiglu_interleaved(reference GEMM in bf16))`` up to accumulation order.

    Args:
        x_fp8_MK: [M, K] float8_e4m3fn activations, as in `grouped_gemm_fp8_blockscaled`.
        x_scales_MKb: [M, K/128] float32 MN-major scales (strides (1, M_al)).
        w13_fp8_E2FK: [E, 2F, K] float8_e4m3fn interleaved W13, contiguous, F % 128 == 0.
        w13_scales_E2FbKb: [E, 2F/128, K/128] float32 128x128 block scales.
        offsets_E1: [E + 1] int32 cumulative expert row offsets on the GPU.
        ue8m0: round the output scales up to powers of two.
        out: optional (a_fp8_MF, a_scales_MFb) to write into, as returned by an earlier call with
            the same M and F (the scales must be the MN-major view over [F/128, M_al] storage).

    Returns:
        (a_fp8_MF [M, F] float8_e4m3fn, a_scales_MFb [M, F/128] float32 as an MN-major view with
        strides (1, M_al) over zero-padded storage [F/128, M_al]) -- the activation input of the
        W2 `grouped_gemm_fp8_blockscaled`. Padding rows hold zeros with scale 2^-126.
    """
    op = "grouped_gemm_fp8_swiglu_quant"
    device, num_rows, n, k, num_experts, aligned, offsets = _check_inputs(
        op, x_fp8_MK, x_scales_MKb, w13_fp8_E2FK, w13_scales_E2FbKb, offsets_E1, 256
    )
    f = n // 2
    if out is None:
        a_fp8 = torch.empty(num_rows, f, dtype=_FP8, device=device)
        storage = torch.empty(f // 128, aligned, dtype=torch.float32, device=device)
        if aligned > num_rows:
            storage[:, num_rows:].zero_()
        a_scales = storage[:, :num_rows].t()
    else:
        a_fp8, a_scales = out
        storage = _check_swiglu_out(op, a_fp8, a_scales, num_rows, f, aligned, device)
    if num_rows == 0:
        return a_fp8, a_scales
    _launch(
        "swiglu_quant", bool(ue8m0), device, x_fp8_MK, x_scales_MKb, w13_fp8_E2FK,
        w13_scales_E2FbKb, a_fp8, storage, offsets, (num_rows, n, k, num_experts, aligned),
    )
    return a_fp8, a_scales


def _check_swiglu_out(op, a_fp8, a_scales, num_rows, f, aligned, device) -> torch.Tensor:
    """Validate ``out`` of `grouped_gemm_fp8_swiglu_quant`; returns the [F/128, M_al] storage."""
    if (
        not isinstance(a_fp8, torch.Tensor)
        or a_fp8.dtype != _FP8
        or tuple(a_fp8.shape) != (num_rows, f)
        or a_fp8.device != device
        or not a_fp8.is_contiguous()
    ):
        raise ValueError(f"{op}: out[0] must be a contiguous float8_e4m3fn [{num_rows}, {f}]")
    _check_aligned(op, "out[0]", a_fp8)
    if (
        not isinstance(a_scales, torch.Tensor)
        or a_scales.dtype != torch.float32
        or tuple(a_scales.shape) != (num_rows, f // 128)
        or a_scales.device != device
        or (num_rows > 0 and tuple(a_scales.stride()) != (1, aligned))
    ):
        raise ValueError(
            f"{op}: out[1] must be a float32 [{num_rows}, {f // 128}] view with strides "
            f"(1, {aligned}) over [{f // 128}, {aligned}] storage, as returned by a previous call"
        )
    needed = (a_scales.storage_offset() + (f // 128) * aligned) * 4
    if a_scales.untyped_storage().nbytes() < needed:
        raise ValueError(f"{op}: out[1] has too small a storage for [{f // 128}, {aligned}]")
    storage = torch.as_strided(a_scales, (f // 128, aligned), (aligned, 1))
    _check_aligned(op, "out[1]", storage)
    return storage


def fp8_weights_to_nk(
    w_fp8_EKN: torch.Tensor, w_scales_EKbNb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-lay FP8 expert weights [E, K, N] (and their 128x128 scales) as the kernels' [E, N, K].

    The 128x128 block grid is symmetric, so this is a transpose of the codes and of the scale
    grid (bitwise the same as quantizing the transposed bf16 weights).

    Args:
        w_fp8_EKN: [E, K, N] float8_e4m3fn.
        w_scales_EKbNb: [E, K/128, N/128] float32.

    Returns:
        (w_fp8_ENK [E, N, K] contiguous, w_scales_ENbKb [E, N/128, K/128] contiguous).
    """
    if w_fp8_EKN.dtype != _FP8 or w_fp8_EKN.dim() != 3:
        raise ValueError(
            f"fp8_weights_to_nk: w_fp8_EKN must be float8_e4m3fn [E, K, N], got "
            f"{w_fp8_EKN.dtype}{tuple(w_fp8_EKN.shape)}"
        )
    num_experts, k, n = w_fp8_EKN.shape
    want = (num_experts, k // 128, n // 128)
    if k % 128 or n % 128 or tuple(w_scales_EKbNb.shape) != want:
        raise ValueError(
            f"fp8_weights_to_nk: need K, N % 128 == 0 and w_scales_EKbNb of shape {list(want)}, "
            f"got w {tuple(w_fp8_EKN.shape)}, scales {tuple(w_scales_EKbNb.shape)}"
        )
    return (
        w_fp8_EKN.transpose(1, 2).contiguous(),
        w_scales_EKbNb.transpose(1, 2).contiguous(),
    )
