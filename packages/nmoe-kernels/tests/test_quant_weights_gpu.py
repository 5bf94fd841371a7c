"""The CUDA FP8 128x128 weight quantization and SwiGLU + FP8 1x128 ops against the torch
references, bitwise (one GPU).

Inputs are drawn fresh per run: weights with per-block magnitudes spread over 2^-40..2^40, an
all-zero block, a block below the 2^-126 scale floor and a huge block; SwiGLU inputs with
per-row magnitudes, a zero block, gates whose exp overflows and large gates. Outputs are
poisoned (0xFF bytes / NaN) before each call so unwritten elements cannot pass.

The weight reference runs on CPU. The SwiGLU reference is evaluated on the GPU, where torch.exp
is CUDA's expf like the kernel's (bitwise), and also on CPU, whose exp may differ by a few ulps:
there a flipped FP8 code must be one step from the reference's, flips must be rare (< 1e-3) and a
scale may move by a few ulps.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA, (
        "nmoe_kernels._C was built without nvcc; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got_bytes = torch.empty(got.shape, dtype=got.dtype).copy_(got).view(torch.uint8).reshape(-1)
    want_bytes = torch.empty(want.shape, dtype=want.dtype).copy_(want).view(torch.uint8).reshape(-1)
    bad = (got_bytes != want_bytes).nonzero()
    if bad.numel():
        first = bad[0].item() // got.element_size()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), got.shape))
        raise AssertionError(
            f"{what}: {bad.shape[0]} bytes differ; first at {index}: got "
            f"{got[index].item()!r}, want {want[index].item()!r}"
        )


def spread_weights(num_mats: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[num_mats, n, k] with one random magnitude per 128x128 block and per row of 128."""
    w = torch.randn(num_mats, n, k, dtype=torch.float64)
    row_blocks, col_blocks = (n + 127) // 128, k // 128
    block_exp = torch.randint(-40, 40, (num_mats, row_blocks, col_blocks)).double()
    row_exp = torch.randint(-6, 6, (num_mats, row_blocks * 128, col_blocks)).double()
    exponent = (block_exp.repeat_interleave(128, 1) + row_exp)[:, :n].repeat_interleave(128, 2)
    w *= torch.exp2(exponent)
    w[0, :128, :128] = 0.0
    if k >= 256 and n >= 1:
        w[0, :128, 128:256] *= 2.0**-126  # below the scale floor (float32 subnormals / zeros)
    if num_mats > 1:
        w[1, :128, :128] = w[1, :128, :128].sign() * 3.0e38 * torch.rand(min(n, 128), 128).double()
        w[1, 0, 0] = -3.3e38  # the largest magnitude float32 and bfloat16 both hold
    return w.to(dtype)


def poisoned(shape, dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, 0xFF, dtype=torch.uint8, device="cuda").view(dtype)
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


# (E or None for a 2-D weight, N, K); N % 8 == 0 for the transposed cases.
WEIGHT_SHAPES = [(None, 128, 128), (None, 200, 384), (3, 8, 256), (2, 264, 768), (2, 1024, 7168)]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_quantize_fp8_128x128_is_bitwise_equal_to_reference(shape, dtype, ue8m0, transpose):
    num_mats, n, k = shape
    w_ENK = spread_weights(num_mats or 1, n, k, dtype)
    if num_mats is None:
        w_ENK = w_ENK[0]
    arg = w_ENK.transpose(-1, -2).contiguous() if transpose else w_ENK
    want_fp8, want_scales = ref.quantize_fp8_128x128(arg, ue8m0=ue8m0, transpose=transpose)
    lead = () if num_mats is None else (num_mats,)
    assert want_fp8.shape == (*lead, n, k)
    out = (
        poisoned((*lead, n, k), torch.float8_e4m3fn),
        poisoned((*lead, (n + 127) // 128, k // 128), torch.float32),
    )
    got_fp8, got_scales = nmoe_kernels.quantize_fp8_128x128(
        arg.cuda(), ue8m0=ue8m0, transpose=transpose, out=out
    )
    assert got_fp8 is out[0] and got_scales is out[1]
    assert_bitwise_equal(got_fp8, want_fp8, f"w_fp8 transpose={transpose}")
    assert_bitwise_equal(got_scales, want_scales, f"scales transpose={transpose}")
    fresh_fp8, fresh_scales = nmoe_kernels.quantize_fp8_128x128(
        arg.cuda(), ue8m0=ue8m0, transpose=transpose
    )
    assert_bitwise_equal(fresh_fp8, want_fp8, "w_fp8 (allocated)")
    assert_bitwise_equal(fresh_scales, want_scales, "scales (allocated)")


def test_quantize_fp8_128x128_transposed_equals_quantized_transpose():
    w_EKN = spread_weights(3, 512, 384, torch.bfloat16).cuda()  # [E, K=512, N=384]
    plain = nmoe_kernels.quantize_fp8_128x128(w_EKN.transpose(1, 2).contiguous())
    fused = nmoe_kernels.quantize_fp8_128x128(w_EKN, transpose=True)
    assert_bitwise_equal(fused[0], plain[0], "transposed w_fp8")
    assert_bitwise_equal(fused[1], plain[1], "transposed scales")


def test_quantize_fp8_128x128_empty_and_bad_arguments():
    w_fp8, scales = nmoe_kernels.quantize_fp8_128x128(torch.empty(0, 128, 256, device="cuda"))
    assert w_fp8.shape == (0, 128, 256) and scales.shape == (0, 1, 2)
    w = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        nmoe_kernels.quantize_fp8_128x128(w[:, :200].contiguous())
    with pytest.raises(ValueError, match="multiple of 8"):
        nmoe_kernels.quantize_fp8_128x128(w[:, :380].contiguous(), transpose=True)
    with pytest.raises(ValueError, match="contiguous"):
        nmoe_kernels.quantize_fp8_128x128(w.t())
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        nmoe_kernels.quantize_fp8_128x128(w.half())
    with pytest.raises(ValueError, match=r"\[N, K\] or \[E, N, K\]"):
        nmoe_kernels.quantize_fp8_128x128(w.view(1, 1, 256, 384))
    with pytest.raises(ValueError, match="16-byte aligned"):
        nmoe_kernels.quantize_fp8_128x128(w.view(-1)[1 : 1 + 128 * 384].view(128, 384))
    with pytest.raises(ValueError, match=r"out\[1\] must be"):
        good = nmoe_kernels.quantize_fp8_128x128(w)
        nmoe_kernels.quantize_fp8_128x128(w, out=(good[0], good[1][:1]))


def swiglu_input(rows: int, features: int, dtype: torch.dtype) -> torch.Tensor:
    h = torch.randn(rows, 2 * features, dtype=torch.float64) * 3
    h *= torch.exp2(torch.randint(-30, 30, (rows, 1)).double())
    h[0, :256] = 0.0  # an all-zero output block
    if rows > 2:
        h[1, 0 : 2 * features : 2] = -torch.rand(features).double() * 150 - 80  # exp(-g) = inf
        h[2, 0 : 2 * features : 2] = torch.rand(features).double() * 200 + 20  # silu(g) = g
    return h.to(dtype)


def fp8_code_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|signed E4M3 code index difference|: 1 means adjacent representable values."""

    def signed(t):
        code = t.cpu().view(torch.uint8).int()
        return torch.where(code >= 128, -(code - 128), code)

    return (signed(a) - signed(b)).abs()


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,features", [(1, 128), (7, 768), (128, 256), (1000, 2048)])
def test_swiglu_quantize_fp8_1x128_is_bitwise_equal_to_gpu_reference(rows, features, dtype, ue8m0):
    h = swiglu_input(rows, features, dtype).cuda()
    for layout in ("row_major", "mn_major_tma_aligned"):
        want_fp8, want_scales = ref.swiglu_quantize_fp8_1x128(h, ue8m0=ue8m0, scale_layout=layout)
        blocks, aligned = features // 128, (rows + 3) // 4 * 4
        if layout == "row_major":
            storage = poisoned((rows, blocks), torch.float32)
            scales = storage
        else:
            storage = poisoned((blocks, aligned), torch.float32)
            scales = storage[:, :rows].t()
        out = (poisoned((rows, features), torch.float8_e4m3fn), scales)
        got_fp8, got_scales = nmoe_kernels.swiglu_quantize_fp8_1x128(
            h, ue8m0=ue8m0, scale_layout=layout, out=out
        )
        assert got_fp8 is out[0] and got_scales is out[1]
        assert_bitwise_equal(got_fp8, want_fp8, f"y_fp8 ({layout})")
        assert_bitwise_equal(got_scales, want_scales, f"scales ({layout})")
        if layout != "row_major":
            want_storage = torch.zeros(blocks, aligned)
            want_storage[:, :rows] = want_scales.t().cpu()
            assert_bitwise_equal(storage, want_storage, "MN-major storage with zero padding")

    # Against the CPU reference: the CPU exp (<= 1 ulp from exact) and CUDA's expf (<= 2 ulp) may
    # differ by ~3 ulps; the division and product keep that relative gap (plus their roundings),
    # so y, its block amax and the scale may differ by a few ulps and a code by one step, rarely.
    cpu_fp8, cpu_scales = ref.swiglu_quantize_fp8_1x128(h.cpu(), ue8m0=ue8m0)
    got_fp8, got_scales = nmoe_kernels.swiglu_quantize_fp8_1x128(h, ue8m0=ue8m0)
    distance = fp8_code_distance(got_fp8, cpu_fp8)
    flips = int((distance != 0).sum())
    print(f"codes differing from the CPU reference: {flips} of {distance.numel()}")
    assert int(distance.max()) <= 1 and flips <= max(1, distance.numel() // 1000)
    rel = ((got_scales.cpu().double() - cpu_scales.double()) / cpu_scales.double()).abs()
    assert float(rel.max()) <= (0.0 if ue8m0 else 2.0**-20)  # 8 ulps at the foot of a binade


def test_swiglu_quantize_fp8_1x128_matches_unfused_path():
    """Same as quantize_fp8_1x128 of the float32 SwiGLU computed by torch on the GPU."""
    h = swiglu_input(300, 1024, torch.bfloat16).cuda()
    gate, up = h.float()[:, 0::2], h.float()[:, 1::2]
    y = gate / (1 + torch.exp(-gate)) * up
    want = nmoe_kernels.quantize_fp8_1x128(y)
    got = nmoe_kernels.swiglu_quantize_fp8_1x128(h)
    assert_bitwise_equal(got[0], want[0], "y_fp8")
    assert_bitwise_equal(got[1], want[1], "scales")


def test_swiglu_quantize_fp8_1x128_empty_and_bad_arguments():
    y_fp8, scales = nmoe_kernels.swiglu_quantize_fp8_1x128(torch.empty(0, 512, device="cuda"))
    assert y_fp8.shape == (0, 256) and scales.shape == (0, 2)
    h = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 256"):
        nmoe_kernels.swiglu_quantize_fp8_1x128(h[:, :384].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        nmoe_kernels.swiglu_quantize_fp8_1x128(torch.randn(512, 8, device="cuda").t())
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        nmoe_kernels.swiglu_quantize_fp8_1x128(h.half())
    with pytest.raises(ValueError, match="scale_layout"):
        nmoe_kernels.swiglu_quantize_fp8_1x128(h, scale_layout="k_major")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        nmoe_kernels.swiglu_quantize_fp8_1x128(h.cpu())
