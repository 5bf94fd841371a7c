"""FP8 blockscaled grouped GEMMs (CuTeDSL, sm_90a) against the torch references (one GPU).

Inputs are drawn fresh per run (seed printed by conftest): activations with per-row magnitudes
spread over 2^-4..2^4, weights ~N(0, 1) * 2^-4 with per-128-block magnitudes spread over 2^-2..2^2,
quantized with `reference.quantize_fp8_1x128` (MN-major scales) and
`reference.quantize_fp8_128x128`, so kernel and reference see the same FP8 codes and scales.
Outputs are poisoned (NaN / 0xFF codes) before each call. Expert segments cover lengths 0, 1,
127, 128, 129, random, all rows on one expert, E in {1, 8, 32, 256}, and padding rows after the
last expert (which must come back zero, as in the reference).

Tolerances. Only the accumulation order differs from the reference, but Hopper's FP8 wgmma keeps
about 14 mantissa bits inside one 128-deep K block (the reason the DeepSeek-V3 recipe promotes
every 128 K into fp32; the reference accumulates in fp32, error ~K * 2^-24). So:

- bf16 GEMM: |y - y64| <= 2^-8 |y64| + 2^-11 (|x| @ |w|)(m, n), against a float64 GEMM of the
  dequantized operands: one bf16 rounding (unit roundoff 2^-8 relative) plus per-block partial
  sums rounded to ~14 bits (a few roundings of 2^-14 relative to the block's sum |x_k w_k|).
- fused SwiGLU + quantize: see `test_grouped_gemm_fp8_swiglu_quant` -- near-bitwise against the
  unfused chain on the bf16 kernel's output (same accumulators), and a propagated error bound
  against float64 (E4M3 codes of small values may move by many steps under GEMM-level
  differences, so codes are only compared step-wise against the same-accumulator chain).
"""

from __future__ import annotations

import functools

import pytest
import torch

from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

E4M3_MIN_SCALE = 2.0**-126


@pytest.fixture(autouse=True)
def _require_hopper():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the FP8 grouped GEMM kernels need an sm_90a GPU (H100/H200)")


def segment_counts(case: str, gen: torch.Generator) -> tuple[list[int], int]:
    """(rows per expert, padding rows after the last expert) for a named case."""
    if case == "E1":
        return [333], 3
    if case == "E8_edges":
        return [0, 1, 127, 128, 129, 0, 64, 255], 5
    if case == "E8_all_on_one":
        return [0, 0, 0, 1000, 0, 0, 0, 0], 0
    if case == "E32_random":
        return torch.randint(0, 300, (32,), generator=gen).tolist(), 7
    if case == "E256_random":
        counts = torch.randint(0, 40, (256,), generator=gen)
        counts[torch.randperm(256, generator=gen)[:64]] = 0
        return counts.tolist(), 1
    raise ValueError(case)


CASES = ["E1", "E8_edges", "E8_all_on_one", "E32_random", "E256_random"]


def make_problem(counts: list[int], pad: int, k: int, n: int, gen: torch.Generator):
    num_experts = len(counts)
    num_rows = sum(counts) + pad
    x = torch.randn(num_rows, k, generator=gen, dtype=torch.float64)
    x *= torch.exp2(torch.randint(-4, 5, (num_rows, 1), generator=gen).double())
    w = torch.randn(num_experts, n, k, generator=gen, dtype=torch.float64) * 2.0**-4
    block_scale = torch.exp2(
        torch.randint(-2, 3, (num_experts, n // 128, 1, k // 128, 1), generator=gen).double()
    )
    w = (w.view(num_experts, n // 128, 128, k // 128, 128) * block_scale).view(num_experts, n, k)
    x = x.to(torch.bfloat16).cuda()
    w = w.to(torch.bfloat16).cuda()
    xq, xs = ref.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")
    wq, ws = ref.quantize_fp8_128x128(w)  # [E, N, K], scales [E, N/128, K/128]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    return xq, xs, wq, ws, offsets.cuda()


def float64_gemm(xq, xs, wq, ws, offsets):
    """(y64, |x| @ |w|) per expert in float64 on the dequantized operands; padding rows zero."""
    x = ref.dequantize_fp8_1x128(xq, xs, torch.float32).double()
    w = ref.dequantize_fp8_128x128(wq, ws, torch.float32).double()
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    bound = torch.zeros_like(y)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            y[start:end] = x[start:end] @ w[e].t()
            bound[start:end] = x[start:end].abs() @ w[e].abs().t()
    return y, bound


@pytest.mark.parametrize("case", CASES)
def test_grouped_gemm_fp8_blockscaled_matches_float64(case, torch_seed):
    from nmoe_kernels.grouped_gemm_fp8 import grouped_gemm_fp8_blockscaled

    gen = torch.Generator().manual_seed(torch_seed)
    counts, pad = segment_counts(case, gen)
    k, n = (1024, 384) if case != "E256_random" else (256, 256)
    xq, xs, wq, ws, offsets = make_problem(counts, pad, k, n, gen)
    out = torch.full((xq.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, offsets, out=out)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()

    y64, bound = float64_gemm(xq, xs, wq, ws, offsets)
    err = (y.double() - y64).abs()
    tol = 2.0**-8 * y64.abs() + 2.0**-11 * bound
    bad = ~(err <= tol)  # NaN (an unwritten poisoned element) counts as bad
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements off; first at "
        f"{bad.nonzero()[0].tolist()}: got {y[bad][0].item()}, want {y64[bad][0].item()} "
        f"(tol {tol[bad][0].item():.3g})"
    )
    end = int(offsets[-1])
    assert torch.equal(y[end:], torch.zeros_like(y[end:])), "padding rows must be zero"

    # The reference op itself (fp32 accumulation) on the [E, K, N] weights: same bound.
    w_EKN, ws_EKbNb = wq.transpose(1, 2), ws.transpose(1, 2)
    y_ref = ref.grouped_gemm_fp8_blockscaled(xq, xs, w_EKN, ws_EKbNb, offsets)
    assert ((y.double() - y_ref.double()).abs() <= tol + 2.0**-8 * y64.abs()).all()


def test_grouped_gemm_fp8_long_k(torch_seed):
    """DeepSeek-V3's K = 7168 (56 K blocks, several pipeline wraps) on a few experts."""
    from nmoe_kernels.grouped_gemm_fp8 import grouped_gemm_fp8_blockscaled

    gen = torch.Generator().manual_seed(torch_seed)
    counts = torch.randint(1, 400, (4,), generator=gen).tolist()
    xq, xs, wq, ws, offsets = make_problem(counts, 0, 7168, 512, gen)
    y = grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, offsets)
    y64, bound = float64_gemm(xq, xs, wq, ws, offsets)
    tol = 2.0**-8 * y64.abs() + 2.0**-11 * bound
    assert ((y.double() - y64).abs() <= tol).all()


def ordered_codes(q: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as integers ordered like their values (adjacent values differ by 1)."""
    bits = q.view(torch.uint8).to(torch.int32)
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


def poisoned_swiglu_out(num_rows: int, f: int):
    a = torch.full((num_rows, f), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    aligned = (num_rows + 3) // 4 * 4
    storage = torch.full((f // 128, aligned), float("nan"), device="cuda")
    storage[:, num_rows:] = 0.0
    return a, storage[:, :num_rows].t()


def swiglu_float64_tolerance(y64, bound, scales_MFb):
    """(a64, tol): float64 SwiGLU of the exact GEMM and the bound on |dequant(kernel) - a64|.

    GEMM error per output (validated by the bf16 GEMM tests): dh = 2^-8 |h| + 2^-11 (|x| @ |w|).
    Through a = silu(g) * u (|silu'| <= 1.1): |da| <= 1.1 |u| dg + (|silu(g)| + 1.1 dg) du;
    then a is rounded to bf16 (2^-8) and to E4M3 (half a step: 2^-4 relative for normals,
    2^-10 * scale below the normal range).
    """
    g, u = y64[:, 0::2], y64[:, 1::2]
    dg = 2.0**-8 * g.abs() + 2.0**-11 * bound[:, 0::2]
    du = 2.0**-8 * u.abs() + 2.0**-11 * bound[:, 1::2]
    silu = g * torch.sigmoid(g)
    a64 = silu * u
    da = 1.1 * u.abs() * dg + (silu.abs() + 1.1 * dg) * du
    scale = scales_MFb.double().repeat_interleave(128, dim=1)
    return a64, 1.1 * (da + (2.0**-4 + 2.0**-7) * a64.abs()) + 2.0**-9 * scale


@pytest.mark.parametrize("silu", ["default", "other"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_grouped_gemm_fp8_swiglu_quant(case, ue8m0, silu, torch_seed):
    """Fused W13 + SwiGLU + quantize against (1) the unfused chain on the bf16 kernel's output
    and (2) the float64 SwiGLU of the exact GEMM.

    (1) The fused and the bf16 kernel run the same wgmma on the same 64-row windows with the same
    promotion arithmetic, so their fp32 accumulators agree bit for bit and
    quantize_fp8_1x128(swiglu_interleaved(bf16 kernel output)) may differ only where silu's
    exp (torch's vs the kernel's) rounds differently: scales within 2^-6 (UE8M0: equal or one
    power of two), codes within one E4M3 step, at most 1% of codes / scales different.
    (2) |dequant(kernel) - a64| <= the propagated bound of `swiglu_float64_tolerance`.
    ``silu="other"`` runs the kernel variant with the other sigmoid (rcp.approx vs IEEE
    division; `KernelConfig.fast_silu`) through the low-level launch, under the same bounds.
    """
    from nmoe_kernels.cute.grouped_gemm_fp8 import DEFAULT_FAST_SILU
    from nmoe_kernels.grouped_gemm_fp8 import (
        grouped_gemm_fp8_blockscaled,
        grouped_gemm_fp8_swiglu_quant,
    )

    if ue8m0 and case not in ("E8_edges", "E32_random"):
        pytest.skip("UE8M0 scales are covered on two segment mixes")
    if silu == "other" and ue8m0:
        pytest.skip("the other sigmoid is covered with fp32 scales")
    gen = torch.Generator().manual_seed(torch_seed)
    counts, pad = segment_counts(case, gen)
    k, f = (768, 384) if case != "E256_random" else (256, 128)
    xq, xs, wq, ws, offsets = make_problem(counts, pad, k, 2 * f, gen)
    num_rows = xq.shape[0]
    if silu == "default":
        out = poisoned_swiglu_out(num_rows, f)
        a_fp8, a_scales = grouped_gemm_fp8_swiglu_quant(
            xq, xs, wq, ws, offsets, ue8m0=ue8m0, out=out
        )
        torch.cuda.synchronize()
        assert a_fp8.data_ptr() == out[0].data_ptr() and a_scales.data_ptr() == out[1].data_ptr()
    else:
        codes, a_scales = run_cluster_variant(
            "swiglu_quant", (1, 1), xq, xs, wq, ws, offsets, overlap=True,
            fast_silu=not DEFAULT_FAST_SILU,
        )  # fmt: skip
        a_fp8 = codes.view(torch.float8_e4m3fn)
    assert torch.isfinite(a_scales).all(), "unwritten scales (poison NaN)"

    # (1) the unfused chain on the bf16 kernel's GEMM output
    h = grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, offsets)
    q_chain, s_chain = ref.quantize_fp8_1x128(ref.swiglu_interleaved(h), ue8m0=ue8m0)
    ratio = a_scales / s_chain
    if ue8m0:
        assert ((ratio == 1) | (ratio == 2) | (ratio == 0.5)).all(), "UE8M0 scales off by > 2x"
    else:
        worst = (ratio - 1).abs().max().item()
        assert worst <= 2.0**-6, f"scales differ by {worst:.3g} relative (bound 2^-6)"
    scale_diffs = int((ratio != 1).sum())
    assert scale_diffs <= 0.01 * ratio.numel() + 1, f"{scale_diffs} scales differ"
    step = (ordered_codes(a_fp8) - ordered_codes(q_chain)).abs()
    assert step.max().item() <= 1, (
        f"an E4M3 code moved by {step.max().item()} steps at {(step > 1).nonzero()[0].tolist()}"
    )
    flips = int((step == 1).sum())
    assert flips <= 0.01 * step.numel() + 1, f"{flips} of {step.numel()} codes differ by a step"
    print(f"{case} ue8m0={ue8m0}: {flips} of {step.numel()} codes, {scale_diffs} scales differ")

    # (2) float64
    y64, bound = float64_gemm(xq, xs, wq, ws, offsets)
    a64, tol = swiglu_float64_tolerance(y64, bound, a_scales)
    deq = ref.dequantize_fp8_1x128(a_fp8, a_scales, torch.float32).double()
    bad = ~((deq - a64).abs() <= tol)
    assert not bad.any(), (
        f"{int(bad.sum())} values off; first at {bad.nonzero()[0].tolist()}: got "
        f"{deq[bad][0].item()}, want {a64[bad][0].item()} (tol {tol[bad][0].item():.3g})"
    )

    end = int(offsets[-1])
    assert (a_fp8[end:].view(torch.uint8) == 0).all(), "padding rows must quantize to zero"
    assert (a_scales[end:] == E4M3_MIN_SCALE).all(), "padding rows get the 2^-126 scale"
    aligned = (num_rows + 3) // 4 * 4
    storage = torch.as_strided(a_scales, (f // 128, aligned), (aligned, 1))
    assert (storage[:, num_rows:] == 0).all(), "scale storage padding must stay zero"


def test_fp8_expert_mlp_chains_w13_into_w2(torch_seed):
    """quantize -> W13 + SwiGLU + quantize -> W2 against the same chain on the references."""
    import nmoe_kernels
    from nmoe_kernels.grouped_gemm_fp8 import (
        grouped_gemm_fp8_blockscaled,
        grouped_gemm_fp8_swiglu_quant,
    )

    gen = torch.Generator().manual_seed(torch_seed)
    counts, pad = segment_counts("E8_edges", gen)
    d, f = 512, 256
    xq, xs, w13q, w13s, offsets = make_problem(counts, pad, d, 2 * f, gen)
    w2 = (torch.randn(8, d, f, generator=gen) * 2.0**-4).to(torch.bfloat16).cuda()
    w2q, w2s = ref.quantize_fp8_128x128(w2)
    aq, a_s = grouped_gemm_fp8_swiglu_quant(xq, xs, w13q, w13s, offsets)
    y = grouped_gemm_fp8_blockscaled(aq, a_s, w2q, w2s, offsets)
    # W2 on the kernel's own activations must match float64 exactly as the plain GEMM does.
    y64, bound = float64_gemm(aq, a_s, w2q, w2s, offsets)
    assert ((y.double() - y64).abs() <= 2.0**-8 * y64.abs() + 2.0**-11 * bound).all()
    assert callable(nmoe_kernels.grouped_gemm_fp8_swiglu_quant)


# (cluster (CTAs along M, N), overlapped promotion)
# (cluster, overlapped promotion, epilogue under the next tile's first K block, CTA tile);
# the first is the reference. Tile None = (128, 128): paired column halves for swiglu_quant.
# (cluster, overlap, epi_overlap, tile, n_major: True, or an int for bands of that many column
# groups -- 2 of the tests' 3 column groups leaves a narrower last band)
VARIANTS = [((1, 1), False, False, None, False), ((1, 2), False, False, None, False),
            ((2, 1), False, False, None, False), ((2, 2), False, False, None, False),
            ((1, 1), True, False, None, False), ((1, 2), True, False, None, False),
            ((2, 2), True, False, None, False), ((1, 1), True, True, None, False),
            ((1, 2), True, True, None, False), ((2, 1), True, True, None, False),
            ((1, 1), False, False, (64, 256), False), ((1, 1), True, True, (64, 256), False),
            ((2, 1), True, True, (64, 256), False), ((1, 1), True, True, None, True),
            ((1, 1), False, False, None, True), ((2, 2), True, True, None, True),
            ((1, 1), True, True, None, 2), ((2, 1), None, True, (128, 256), 2)]  # fmt: skip


@functools.cache
def compiled_variant(
    epilogue, cluster, overlap, epi_overlap=False, fast_silu=None, tile=None, n_major=False,
    early_scales=True,
):  # fmt: skip
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    band = 0 if isinstance(n_major, bool) else n_major
    return g.compile_kernel(
        epilogue, False, cluster=cluster, overlap=overlap, epi_overlap=epi_overlap,
        fast_silu=fast_silu, tile=tile, n_major=n_major is True, band=band,
        early_scales=early_scales,
    )  # fmt: skip


def run_cluster_variant(
    epilogue, cluster, xq, xs, wq, ws, offsets, overlap=False, epi_overlap=False, fast_silu=None,
    tile=None, n_major=False, early_scales=True,
):  # fmt: skip
    """Launch the kernel compiled for ``cluster`` (CTAs along M, N), ``overlap``,
    ``epi_overlap``, ``fast_silu`` (None: the default), ``tile`` (None: (128, 128)) and
    ``early_scales`` on poisoned outputs."""
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    num_rows, k = xq.shape
    num_experts, n, _ = wq.shape
    aligned = (num_rows + 3) // 4 * 4
    if epilogue == "bf16":
        out = torch.full((num_rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        out_sf = out
    else:
        out, out_sf = poisoned_swiglu_out(num_rows, n // 2)
    compiled = compiled_variant(epilogue, cluster, overlap, epi_overlap, fast_silu, tile, n_major,
                                early_scales)
    g.launch(
        compiled, epilogue, xq.data_ptr(), xs.data_ptr(), wq.data_ptr(), ws.data_ptr(),
        out.data_ptr(), out_sf.data_ptr(), offsets.data_ptr(), num_rows, n, k, num_experts,
        aligned, torch.cuda.get_device_properties(0).multi_processor_count,
        torch.cuda.current_stream().cuda_stream, cluster=cluster, tile=tile,
    )  # fmt: skip
    torch.cuda.synchronize()
    return out.view(torch.int16) if epilogue == "bf16" else (out.view(torch.uint8), out_sf)


@pytest.mark.parametrize("epilogue", ["bf16", "swiglu_quant"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_variants_agree_bitwise(case, epilogue, torch_seed):
    """Every cluster shape (TMA multicast of A along N, of B along M; CTA tiles past a segment or
    past N when the cluster tile overhangs), the overlapped-promotion mainloop, the epilogue
    overlapped with the next tile's first K block and the 64 x 256 tile (for swiglu_quant: the
    row maxima exchanged between warpgroups instead of carried from the first column half in
    smem) write the same bits as the one-CTA kernel: each output row sees the same wgmma K
    blocks (m64n128k32 per warpgroup) and promotion arithmetic in the same order.
    N is 3 tiles (odd), so a cluster along N has a CTA tile past N; K is 5 blocks at E <= 32
    (odd: the overlapped loop's tail) and 4 at E = 256 (even). The one-CTA bf16 kernel is
    checked against float64.
    """
    gen = torch.Generator().manual_seed(torch_seed)
    counts, pad = segment_counts(case, gen)
    k = 512 if case == "E256_random" else 640
    n = 384 if epilogue == "bf16" else 768  # 3 CTA tiles along N either way
    xq, xs, wq, ws, offsets = make_problem(counts, pad, k, n, gen)
    want = run_cluster_variant(epilogue, (1, 1), xq, xs, wq, ws, offsets)
    if epilogue == "bf16":
        y = want.view(torch.bfloat16)
        y64, bound = float64_gemm(xq, xs, wq, ws, offsets)
        assert ((y.double() - y64).abs() <= 2.0**-8 * y64.abs() + 2.0**-11 * bound).all()
    for cluster, overlap, epi_overlap, tile, n_major in VARIANTS[1:]:
        if epilogue == "bf16" and tile is not None:
            continue  # 64 x 256 bf16 tiles need N % 256 == 0 (a bench diagnostic only)
        got = run_cluster_variant(
            epilogue, cluster, xq, xs, wq, ws, offsets, overlap, epi_overlap, tile=tile,
            n_major=n_major,
        )  # fmt: skip
        name = (f"cluster {cluster}, overlap {overlap}, epi_overlap {epi_overlap}, tile {tile}, "
                f"n_major {n_major}")
        if epilogue == "bf16":
            assert torch.equal(got, want), f"{name}: bf16 output differs from the one-CTA kernel"
        else:
            assert torch.equal(got[0], want[0]), f"{name}: FP8 codes differ"
            assert torch.equal(got[1], want[1]), f"{name}: scales differ"


# (cluster, epi_overlap, early_scales) of the 128 x 256 tile
WIDE_VARIANTS = [((1, 1), True, True), ((1, 1), False, True), ((2, 1), True, True),
                 ((1, 2), True, True), ((2, 2), True, True), ((2, 1), False, True),
                 ((1, 1), True, False), ((2, 1), True, False)]  # fmt: skip


@pytest.mark.parametrize("epilogue", ["bf16", "swiglu_quant"])
@pytest.mark.parametrize("case", CASES)
def test_wide_tile_agrees_bitwise(case, epilogue, torch_seed):
    """The 128 x 256 tile (two 128-column halves per warpgroup sharing one block accumulator,
    serial promotion) writes the 128 x 128 kernel's bits for every cluster shape, with and
    without the epilogue under the next tile's first half-block: each output element sees the
    same m64n128k32 wgmma K blocks and the same promotion arithmetic in the same order. N = 768
    is 3 wide tiles (odd: a cluster along N has a CTA tile past N); K is 5 blocks at E <= 32
    (past the 3-stage bf16 pipeline) and 4 at E = 256."""
    gen = torch.Generator().manual_seed(torch_seed)
    counts, pad = segment_counts(case, gen)
    k = 512 if case == "E256_random" else 640
    n = 768
    xq, xs, wq, ws, offsets = make_problem(counts, pad, k, n, gen)
    want = run_cluster_variant(epilogue, (1, 1), xq, xs, wq, ws, offsets, overlap=True,
                               epi_overlap=True)
    for cluster, epi_overlap, early_scales in WIDE_VARIANTS:
        got = run_cluster_variant(
            epilogue, cluster, xq, xs, wq, ws, offsets, None, epi_overlap, tile=(128, 256),
            early_scales=early_scales,
        )
        name = (f"128 x 256 tile, cluster {cluster}, epi_overlap {epi_overlap}, early_scales "
                f"{early_scales}")
        if epilogue == "bf16":
            assert torch.equal(got, want), f"{name}: bf16 output differs from 128 x 128"
        else:
            assert torch.equal(got[0], want[0]), f"{name}: FP8 codes differ"
            assert torch.equal(got[1], want[1]), f"{name}: scales differ"


def test_wide_tile_long_k_matches_float64(torch_seed):
    """The 128 x 256 tile at K = 7168 (56 K blocks through a 3-stage pipeline) against float64,
    and bitwise against the 128 x 128 kernel."""
    gen = torch.Generator().manual_seed(torch_seed)
    counts = torch.randint(1, 400, (4,), generator=gen).tolist()
    xq, xs, wq, ws, offsets = make_problem(counts, 0, 7168, 512, gen)
    got = run_cluster_variant("bf16", (2, 1), xq, xs, wq, ws, offsets, None, True,
                              tile=(128, 256))
    want = run_cluster_variant("bf16", (1, 1), xq, xs, wq, ws, offsets, True, True)
    assert torch.equal(got, want)
    y64, bound = float64_gemm(xq, xs, wq, ws, offsets)
    tol = 2.0**-8 * y64.abs() + 2.0**-11 * bound
    assert ((got.view(torch.bfloat16).double() - y64).abs() <= tol).all()


@pytest.mark.parametrize(("epilogue", "n"), [("bf16", 384), ("bf16", 768), ("swiglu_quant", 768)])
@pytest.mark.parametrize("case", ["E8_edges", "E32_random"])
def test_public_ops_with_long_k_launch_the_cluster_and_agree_bitwise(case, epilogue, n, torch_seed):
    """At K >= CLUSTER_MIN_K the public ops launch one CTA on `WIDE_TILE` where N % 256 == 0
    (N = 768) and `LONG_CLUSTER` (TMA multicast between two CTAs) on 128 x 128 tiles otherwise
    (bf16 at N = 384); their outputs must be the one-CTA 128 x 128 kernel's bits, poisoned
    outputs included. N is an odd number of CTA tiles, so a cluster along N overhangs."""
    from nmoe_kernels import grouped_gemm_fp8 as ops

    gen = torch.Generator().manual_seed(torch_seed)
    counts, pad = segment_counts(case, gen)
    k = ops.CLUSTER_MIN_K + 128 * int(torch.randint(0, 4, (1,), generator=gen))
    xq, xs, wq, ws, offsets = make_problem(counts, pad, k, n, gen)
    num_rows = xq.shape[0]
    cluster, tile = ops.choose_config(epilogue, num_rows, n, k, len(counts))
    if n % 256 == 0:
        assert (cluster, tile) == ((1, 1), ops.WIDE_TILE)
    else:
        assert (cluster, tile) == (ops.LONG_CLUSTER[epilogue], None)
    want = run_cluster_variant(epilogue, (1, 1), xq, xs, wq, ws, offsets, overlap=True,
                               epi_overlap=True)
    if epilogue == "bf16":
        out = torch.full((num_rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = ops.grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, offsets, out=out)
        assert torch.equal(got.view(torch.int16), want)
    else:
        got = ops.grouped_gemm_fp8_swiglu_quant(
            xq, xs, wq, ws, offsets, out=poisoned_swiglu_out(num_rows, n // 2)
        )
        assert torch.equal(got[0].view(torch.uint8), want[0])
        assert torch.equal(got[1], want[1])
