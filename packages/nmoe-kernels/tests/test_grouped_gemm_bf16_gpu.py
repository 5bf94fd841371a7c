"""The CuTeDSL BF16 grouped GEMMs (forward, SwiGLU-fused, dgrad, wgrad) against references (GPU).

Inputs are drawn fresh per run (seed printed by conftest). Segment layouts cover lengths 0, 1, 127,
128, 129 and random ones, every row on one expert, E in {1, 8, 64, 256}, and padding rows after
offsets[E]; shapes are the "super" expert (D = 768, 2F = 768), a moonlight-like one (2048,
2816) and an "odd" one (200, 1008) whose edges fall inside the epilogue's sub-tiles. Outputs are
poisoned with NaN before every call, so any element the kernel fails to write (padding rows
included, which must be zero) fails the test.

Tolerance, against a float64 reference built from the same bf16 inputs: bf16 products are exact
in float32, so the kernel's error is float32 accumulation (at most K * 2^-24 * sum|x_k w_k| for
any summation order; we allow 2^-23, twice that, for the tensor core's internal alignment) plus
one bf16 rounding of the output (2^-9 relative; we allow 2^-8). For SwiGLU the accumulation error
of gate and up is propagated through silu(g) * u (|silu'| <= 1.1) and the approximate exp and
reciprocal add < 2^-20 relative. On top of the element-wise bound, the relative RMS error over the
whole output must stay below 4e-3 (bf16 rounding alone gives ~1e-3), which catches systematic
errors the loose element-wise bound could hide. The pure-torch references
(`nmoe_kernels.reference`) are checked too: both round nearly the same float32 value, so they
agree within 2 bf16 ulps plus the accumulation bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nmoe_kernels
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

SHAPES = {"super": (768, 768), "moonlight": (2048, 2816),  # (K = D, N = 2F)
          # edges inside a 32-column / 64-row epilogue sub-tile: N 1008 (16 columns of the last
          # BN 256 tile's last sub-tile; SwiGLU: F 504, 24 columns), dw's K 200 (8 rows of the
          # second warpgroup's last sub-tile), x's K 200 (a partial last K tile)
          "odd": (200, 1008)}
# dgrad also at moonlight's W2 (dx [M, F = 1408]): BN 256 with a partial last column tile
# (choose_tile_n pads 1408 to 1536).
DGRAD_SHAPES = {**SHAPES, "moonlight-w2": (1408, 2048)}
ACC_REL = 2.0**-23
OUT_REL = 2.0**-8
RMS_REL = 4e-3


def make_offsets(case: str, rows_per_expert: int) -> tuple[torch.Tensor, int]:
    """(offsets_E1 int32 on CUDA, M) for a named segment layout; M includes padding rows."""
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    if case == "edges":
        lengths = [0, 1, 127, 128, 129, int(torch.randint(1, 400, (1,), generator=g)), 0, 255]
    elif case == "one_expert":
        lengths = [0, 0, 0, 777, 0, 0, 0, 0]
    else:
        num_experts = int(case.removeprefix("e"))
        total = rows_per_expert * num_experts
        probs = torch.rand(num_experts, generator=g) ** 2
        lengths = torch.multinomial(probs, total, replacement=True, generator=g)
        lengths = torch.bincount(lengths, minlength=num_experts).tolist()
        if num_experts > 1:
            lengths[int(torch.randint(0, num_experts, (1,), generator=g))] = 0
    padding = int(torch.randint(0, 70, (1,), generator=g))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return offsets.cuda(), int(offsets[-1]) + padding


CASES = ["edges", "one_expert", "e1", "e8", "e64", "e256"]


def segments(offsets: torch.Tensor):
    bounds = offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def grouped_f64(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool):
    """Float64 y[rows of e] = a[rows] @ w[e] (or w[e]^T); padding rows zero."""
    out_cols = w.shape[1] if transpose_w else w.shape[2]
    y = torch.zeros(a.shape[0], out_cols, dtype=torch.float64, device=a.device)
    for e, (s, t) in enumerate(segments(offsets)):
        if t > s:
            we = w[e].double()
            y[s:t] = a[s:t].double() @ (we.t() if transpose_w else we)
    return y


def check_close(got: torch.Tensor, exact: torch.Tensor, acc_bound: torch.Tensor, what: str,
                out_rel: float = OUT_REL):
    """``|got - exact| <= out_rel |exact| + acc_bound`` elementwise (``out_rel``: the output's
    rounding, 0 for float32 outputs that hold the accumulator) and the relative RMS bound."""
    assert not got.isnan().any(), f"{what}: NaN left in the output (an element was not written)"
    err = (got.double() - exact).abs()
    bound = out_rel * exact.abs() + acc_bound
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: {(err > bound).sum().item()} elements out of tolerance; worst at flat index "
        f"{worst.item()}: got {got.flatten()[worst].item()}, want {exact.flatten()[worst].item()}"
    )
    rms = err.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt().clamp_min(1e-30)
    assert rms <= RMS_REL, f"{what}: relative RMS error {rms.item():.2e} > {RMS_REL}"


def inputs(num_rows: int, dim_k: int, dim_n: int, num_experts: int):
    x = torch.randn(num_rows, dim_k, device="cuda").bfloat16()
    w = (torch.randn(num_experts, dim_k, dim_n, device="cuda") / dim_k**0.5).bfloat16()
    return x, w


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward(shape: str, case: str):
    dim_k, dim_n = SHAPES[shape]
    offsets, num_rows = make_offsets(case, 96)
    x, w = inputs(num_rows, dim_k, dim_n, offsets.numel() - 1)
    out = torch.full((num_rows, dim_n), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = nmoe_kernels.grouped_gemm_bf16(x, w, offsets, out=out)
    assert y.data_ptr() == out.data_ptr()
    exact = grouped_f64(x, w, offsets, transpose_w=False)
    acc = dim_k * ACC_REL * grouped_f64(x.abs(), w.abs(), offsets, transpose_w=False)
    check_close(y, exact, acc, f"grouped_gemm_bf16 {shape} {case}")
    y_ref = ref.grouped_gemm(x, w, offsets)
    check_close(y, y_ref.double(), acc + OUT_REL * exact.abs(), "vs reference.grouped_gemm")
    assert (y[int(offsets[-1]) :] == 0).all(), "padding rows must be zero"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_swiglu(shape: str, case: str):
    dim_k, dim_2f = SHAPES[shape]
    offsets, num_rows = make_offsets(case, 96)
    x, w13 = inputs(num_rows, dim_k, dim_2f, offsets.numel() - 1)
    out = torch.full((num_rows, dim_2f // 2), float("nan"), device="cuda", dtype=torch.bfloat16)
    a = nmoe_kernels.grouped_gemm_bf16_swiglu(x, w13, offsets, out=out)
    h = grouped_f64(x, w13, offsets, transpose_w=False)
    delta = dim_k * ACC_REL * grouped_f64(x.abs(), w13.abs(), offsets, transpose_w=False)
    gate, up = h[:, 0::2], h[:, 1::2]
    exact = F.silu(gate) * up
    acc = 1.1 * up.abs() * delta[:, 0::2] + F.silu(gate).abs() * delta[:, 1::2]
    acc = acc + 2.0**-20 * exact.abs()
    check_close(a, exact, acc, f"grouped_gemm_bf16_swiglu {shape} {case}")
    # The bf16 pipeline reference rounds gate and up to bf16 first (2^-9 relative each).
    a_ref = ref.swiglu_interleaved(ref.grouped_gemm(x, w13, offsets))
    ref_err = 2.0**-8 * (1.1 * up.abs() * gate.abs() + F.silu(gate).abs() * up.abs())
    check_close(a, a_ref.double(), acc + ref_err + OUT_REL * exact.abs(), "vs reference swiglu")
    assert (a[int(offsets[-1]) :] == 0).all(), "padding rows must be zero"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", list(DGRAD_SHAPES))
def test_dgrad(shape: str, case: str):
    dim_k, dim_n = DGRAD_SHAPES[shape]
    offsets, num_rows = make_offsets(case, 96)
    dy, w = inputs(num_rows, dim_n, dim_k, offsets.numel() - 1)  # dy [M, N]
    w = w.transpose(1, 2).contiguous()  # w [E, K, N]
    out = torch.full((num_rows, dim_k), float("nan"), device="cuda", dtype=torch.bfloat16)
    dx = nmoe_kernels.grouped_gemm_bf16_dgrad(dy, w, offsets, out=out)
    exact = grouped_f64(dy, w, offsets, transpose_w=True)
    acc = dim_n * ACC_REL * grouped_f64(dy.abs(), w.abs(), offsets, transpose_w=True)
    check_close(dx, exact, acc, f"grouped_gemm_bf16_dgrad {shape} {case}")
    dx_ref = ref.grouped_gemm_dgrad(dy, w, offsets)
    check_close(dx, dx_ref.double(), acc + OUT_REL * exact.abs(), "vs reference dgrad")
    assert (dx[int(offsets[-1]) :] == 0).all(), "padding rows must be zero"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_wgrad(shape: str, case: str, out_dtype: torch.dtype):
    """bf16 output: the accumulation bound plus one bf16 rounding; float32 output (the
    accumulators stored unrounded): the accumulation bound alone, and within twice it of the
    reference's float32 result (two summation orders)."""
    dim_k, dim_n = SHAPES[shape]
    f32 = out_dtype == torch.float32
    out_rel = 0.0 if f32 else OUT_REL
    offsets, num_rows = make_offsets(case, 96)
    num_experts = offsets.numel() - 1
    x = torch.randn(num_rows, dim_k, device="cuda").bfloat16()
    dy = torch.randn(num_rows, dim_n, device="cuda").bfloat16()
    # NaN in the padding rows must not leak into any expert's gradient.
    x[int(offsets[-1]) :] = float("nan")
    dy[int(offsets[-1]) :] = float("nan")
    out = torch.full((num_experts, dim_k, dim_n), float("nan"), device="cuda").to(out_dtype)
    dw = nmoe_kernels.grouped_gemm_bf16_wgrad(x, dy, offsets, out=out, out_dtype=out_dtype)
    assert dw.dtype == out_dtype and dw.data_ptr() == out.data_ptr()
    valid = int(offsets[-1])
    dw_ref = ref.grouped_gemm_wgrad(x[:valid], dy[:valid], offsets, out_dtype=out_dtype)
    bounds = segments(offsets)
    max_rows = max([1] + [t - s for s, t in bounds])
    # float64 references a few experts at a time: all 256 moonlight experts at once need ~60 GB.
    chunk = max(1, (1 << 30) // (dim_k * dim_n * 8))
    for first in range(0, num_experts, chunk):
        last = min(first + chunk, num_experts)
        exact = torch.zeros(last - first, dim_k, dim_n, dtype=torch.float64, device="cuda")
        abs_sum = torch.zeros_like(exact)
        for e in range(first, last):
            s, t = bounds[e]
            if t > s:
                exact[e - first] = x[s:t].double().t() @ dy[s:t].double()
                abs_sum[e - first] = x[s:t].double().abs().t() @ dy[s:t].double().abs()
        acc = max_rows * ACC_REL * abs_sum
        where = f"experts {first}..{last - 1}"
        check_close(dw[first:last], exact, acc, f"grouped_gemm_bf16_wgrad {shape} {case} {where}",
                    out_rel)
        check_close(dw[first:last], dw_ref[first:last].double(),
                    acc * (2 if f32 else 1) + out_rel * exact.abs(),
                    f"vs reference wgrad, {where}", out_rel)
        del exact, abs_sum, acc
    for e, (s, t) in enumerate(bounds):
        if t == s:
            assert (dw[e] == 0).all(), f"expert {e} has no rows: its gradient must be zero"


def test_default_output_and_zero_rows():
    """out=None allocates; M = 0 returns empty (fwd) or zeros (wgrad) without a launch."""
    dim_k, dim_n = SHAPES["super"]
    offsets, num_rows = make_offsets("e8", 64)
    x, w = inputs(num_rows, dim_k, dim_n, 8)
    y = nmoe_kernels.grouped_gemm_bf16(x, w, offsets)
    check_close(
        y,
        grouped_f64(x, w, offsets, False),
        dim_k * ACC_REL * grouped_f64(x.abs(), w.abs(), offsets, False),
        "out=None",
    )
    empty = torch.empty(0, dim_k, device="cuda", dtype=torch.bfloat16)
    zero_offsets = torch.zeros(9, dtype=torch.int32, device="cuda")
    assert nmoe_kernels.grouped_gemm_bf16(empty, w, zero_offsets).shape == (0, dim_n)
    dy0 = torch.empty(0, dim_n, device="cuda", dtype=torch.bfloat16)
    dw = nmoe_kernels.grouped_gemm_bf16_wgrad(empty, dy0, zero_offsets)
    assert dw.shape == (8, dim_k, dim_n) and (dw == 0).all()


def test_rejects_bad_arguments_on_gpu():
    x = torch.randn(64, 768, device="cuda").bfloat16()
    w = torch.randn(4, 768, 512, device="cuda").bfloat16()
    offsets = torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="offsets_E1 must be int32"):
        nmoe_kernels.grouped_gemm_bf16(x, w, offsets.long())
    with pytest.raises(ValueError, match="E \\+ 1 = 5"):
        nmoe_kernels.grouped_gemm_bf16(x, w, offsets[:-1])
    with pytest.raises(ValueError, match="offsets_E1 is on cpu"):
        nmoe_kernels.grouped_gemm_bf16(x, w, offsets.cpu())
    misaligned = x.flatten()[1 : 1 + 63 * 768].view(63, 768)  # starts 2 bytes in
    with pytest.raises(ValueError, match="x_MK must start at a 16-byte aligned address"):
        nmoe_kernels.grouped_gemm_bf16(misaligned, w, offsets)
    with pytest.raises(ValueError, match="K = 772 must be a multiple of 8"):
        nmoe_kernels.grouped_gemm_bf16_dgrad(
            x, torch.randn(4, 772, 768, device="cuda").bfloat16(), offsets
        )
    with pytest.raises(ValueError, match=r"w_EKN must be contiguous \[E, K, N\], or the"):
        nmoe_kernels.grouped_gemm_bf16(x, w[:, :, ::2], offsets)
    with pytest.raises(ValueError, match="out must have shape"):
        nmoe_kernels.grouped_gemm_bf16(x, w, offsets, out=torch.empty_like(x))


@pytest.mark.parametrize("case", ["edges", "one_expert", "e64"])
def test_raster_orders_agree_bitwise(case: str, monkeypatch):
    """Every tile order ("m", "n", the bands "b<G>") computes each tile once and identically, so
    the outputs are bit-identical (segments of 0, 1, 127, 128, 129 rows: partial last bands)."""
    import nmoe_kernels.grouped_gemm as module
    from nmoe_kernels.cute.scheduler import RASTERS

    dim_k, dim_n = SHAPES["moonlight"]
    offsets, num_rows = make_offsets(case, 96)
    x, w = inputs(num_rows, dim_k, dim_n, offsets.numel() - 1)
    dy = torch.randn(num_rows, dim_n, device="cuda").bfloat16()
    results = {}
    for raster in RASTERS:
        for op in ("fwd", "swiglu", "dgrad", "wgrad"):
            monkeypatch.setitem(module.RASTER, op, raster)
        results[raster] = (
            nmoe_kernels.grouped_gemm_bf16(x, w, offsets),
            nmoe_kernels.grouped_gemm_bf16_swiglu(x, w, offsets),
            nmoe_kernels.grouped_gemm_bf16_dgrad(dy, w, offsets),
            nmoe_kernels.grouped_gemm_bf16_wgrad(x, dy, offsets),
            nmoe_kernels.grouped_gemm_bf16_wgrad(x, dy, offsets, out_dtype=torch.float32),
        )
    for raster in RASTERS[1:]:
        for got, want in zip(results[raster], results["m"]):
            assert torch.equal(got, want), raster


@pytest.mark.parametrize("case", ["edges", "e64"])
def test_weights_stored_nk_give_identical_results(case: str):
    """w as the .transpose(1, 2) view of [E, N, K] storage: same values, same bits out."""
    dim_k, dim_n = SHAPES["moonlight"]
    offsets, num_rows = make_offsets(case, 96)
    x, w = inputs(num_rows, dim_k, dim_n, offsets.numel() - 1)
    w_nk = w.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w_nk.is_contiguous() and torch.equal(w_nk, w)
    dy = torch.randn(num_rows, dim_n, device="cuda").bfloat16()
    for name, fn, a in [
        ("grouped_gemm_bf16", nmoe_kernels.grouped_gemm_bf16, x),
        ("grouped_gemm_bf16_swiglu", nmoe_kernels.grouped_gemm_bf16_swiglu, x),
        ("grouped_gemm_bf16_dgrad", nmoe_kernels.grouped_gemm_bf16_dgrad, dy),
    ]:
        want = fn(a, w, offsets)  # checked against float64 by the tests above
        got = fn(a, w_nk, offsets)
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 1e-3, f"{name}: [E, N, K] weights differ from [E, K, N] by {rel:.2e}"
        assert torch.equal(got, want), f"{name}: close ({rel:.1e}) but not bit-identical"


@pytest.mark.parametrize("cluster", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("case", ["edges", "one_expert", "e64"])
def test_clusters_agree_bitwise(case: str, cluster: tuple[int, int], monkeypatch):
    """A thread-block cluster changes which CTA loads an operand tile (TMA multicast), never an
    output element's sum: every op is bit-identical to the one-CTA kernel. Moonlight's W13 has 11
    column tiles of 256 and the wgrad dw below 11 row blocks (odd: spare CTA tiles past N / past
    dw's rows), and the segments end mid-cluster-tile (spare tiles past an expert's rows, some
    wholly past M): spare tiles must store nothing, so outputs are poisoned with NaN first."""
    import nmoe_kernels.grouped_gemm as module

    dim_k, dim_n = SHAPES["moonlight"]
    offsets, num_rows = make_offsets(case, 96)
    num_experts = offsets.numel() - 1
    x, w = inputs(num_rows, dim_k, dim_n, num_experts)
    dy = torch.randn(num_rows, dim_n, device="cuda").bfloat16()
    x_w2 = torch.randn(num_rows, 1408, device="cuda").bfloat16()

    def poisoned(*shape, dtype=torch.bfloat16):
        return torch.full(shape, float("nan"), device="cuda", dtype=dtype)

    def run(shape):
        for op in module.CLUSTER:
            monkeypatch.setitem(module.CLUSTER, op, shape)
        return {
            "fwd": nmoe_kernels.grouped_gemm_bf16(x, w, offsets, out=poisoned(num_rows, dim_n)),
            "swiglu": nmoe_kernels.grouped_gemm_bf16_swiglu(
                x, w, offsets, out=poisoned(num_rows, dim_n // 2)),
            "dgrad": nmoe_kernels.grouped_gemm_bf16_dgrad(
                dy, w, offsets, out=poisoned(num_rows, dim_k)),
            "wgrad": nmoe_kernels.grouped_gemm_bf16_wgrad(
                x_w2, x, offsets, out=poisoned(num_experts, 1408, dim_k)),
            "wgrad f32": nmoe_kernels.grouped_gemm_bf16_wgrad(
                x_w2, x, offsets, out=poisoned(num_experts, 1408, dim_k, dtype=torch.float32),
                out_dtype=torch.float32),
        }

    want = run((1, 1))
    got = run(cluster)
    for name in want:
        assert not want[name].isnan().any(), f"{name}: the one-CTA kernel left NaN"
        assert torch.equal(got[name], want[name]), f"{name}: cluster {cluster} differs"
