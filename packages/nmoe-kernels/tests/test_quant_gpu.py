"""The CUDA FP8 1x128 quantize / dequantize ops against the torch reference, bitwise (one GPU).

Inputs are drawn fresh per run with magnitudes spread over 2^-60..2^60 per block, an all-zero
block, a block below the 2^-126 scale floor and a block near the float32 maximum. Outputs are
poisoned (0xFF bytes / NaN) before each call so unwritten elements cannot pass. The reference
runs on CPU.
"""

from __future__ import annotations

import pytest
import torch

import nmoe_kernels
import nmoe_kernels._C as C
from nmoe_kernels import reference as ref

pytestmark = pytest.mark.gpu

ROWS = [1, 7, 128, 4097]
COLS = [128, 768, 7168]


@pytest.fixture(autouse=True)
def _require_cuda_build():
    assert C.WITH_CUDA, (
        "nmoe_kernels._C was built without nvcc; install the CUDA toolkit >= 12.8 and rebuild "
        "(pip install --no-build-isolation -e packages/nmoe-kernels)"
    )


def spread_input(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(rows, cols, dtype=torch.float64)
    blocks = x.view(-1, 128)
    blocks *= torch.exp2(torch.randint(-60, 60, (blocks.shape[0], 1)).double())
    blocks[0] = 0.0
    if blocks.shape[0] > 2:
        blocks[1] *= 2.0**-125
        blocks[2] = blocks[2].sign() * 3.0e38 * torch.rand(128, dtype=torch.float64)
        blocks[2, 0] = -3.3e38  # largest magnitudes float32 and bfloat16 both hold
    return x.to(dtype)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    # A fresh row-major copy: .contiguous() keeps odd strides on size-1 dims, which view() rejects.
    got_bytes = torch.empty(got.shape, dtype=got.dtype).copy_(got).view(torch.uint8)
    want_bytes = torch.empty(want.shape, dtype=want.dtype).copy_(want).view(torch.uint8)
    got_bytes = got_bytes.view(got.shape[0], -1)
    want_bytes = want_bytes.view(want.shape[0], -1)
    bad = (got_bytes != want_bytes).nonzero()
    if bad.numel():
        row, byte = bad[0].tolist()
        col = byte // got.element_size()
        raise AssertionError(
            f"{what}: {bad.shape[0]} bytes differ; first at [{row}, {col}]: got "
            f"{got[row, col].item()!r}, want {want[row, col].item()!r}"
        )


def poisoned_outputs(rows: int, cols: int, mn_major: bool, device):
    x_fp8 = torch.full((rows, cols), 0xFF, dtype=torch.uint8, device=device)
    x_fp8 = x_fp8.view(torch.float8_e4m3fn)
    blocks, aligned = cols // 128, (rows + 3) // 4 * 4
    if mn_major:
        storage = torch.full((blocks, aligned), float("nan"), device=device)
        return x_fp8, storage[:, :rows].t(), storage
    scales = torch.full((rows, blocks), float("nan"), device=device)
    return x_fp8, scales, scales


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", ROWS)
def test_quantize_fp8_1x128_is_bitwise_equal_to_reference(rows, cols, dtype, ue8m0):
    x = spread_input(rows, cols, dtype)
    want_fp8, want_scales = ref.quantize_fp8_1x128(x, ue8m0=ue8m0)
    x_gpu = x.cuda()
    for layout in ("row_major", "mn_major_tma_aligned"):
        mn_major = layout == "mn_major_tma_aligned"
        x_fp8, scales, storage = poisoned_outputs(rows, cols, mn_major, x_gpu.device)
        got_fp8, got_scales = nmoe_kernels.quantize_fp8_1x128(
            x_gpu, ue8m0=ue8m0, scale_layout=layout, out=(x_fp8, scales)
        )
        assert got_fp8 is x_fp8 and got_scales is scales
        assert_bitwise_equal(got_fp8, want_fp8, f"x_fp8 ({layout})")
        assert_bitwise_equal(got_scales, want_scales, f"scales ({layout})")
        if mn_major:
            want_storage = torch.zeros_like(storage, device="cpu")
            want_storage[:, :rows] = want_scales.t()
            assert_bitwise_equal(storage, want_storage, "MN-major storage with zero padding")
            assert got_scales.stride() == (1, storage.shape[1])

    # Freshly allocated outputs and the default arguments give the same result.
    fresh_fp8, fresh_scales = nmoe_kernels.quantize_fp8_1x128(x_gpu, ue8m0=ue8m0)
    assert_bitwise_equal(fresh_fp8, want_fp8, "x_fp8 (allocated)")
    assert_bitwise_equal(fresh_scales, want_scales, "scales (allocated)")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 128), (7, 768), (4097, 7168)])
def test_dequantize_fp8_1x128_is_bitwise_equal_to_reference(rows, cols, out_dtype):
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x00  # drop the NaN codes
    x_fp8 = codes.view(torch.float8_e4m3fn)
    scales = torch.exp2(torch.randint(-100, 100, (rows, cols // 128)).float())
    scales *= 1 + torch.rand_like(scales)  # arbitrary float32 scales, not only powers of two
    want = ref.dequantize_fp8_1x128(x_fp8, scales, out_dtype)
    mn_scales = ref.to_mn_major_tma_aligned(scales.cuda())  # built on the GPU: keeps its strides
    assert rows == 1 or mn_scales.stride()[0] == 1
    for scale_arg in (scales.cuda(), mn_scales):
        out = torch.full((rows, cols), float("nan"), dtype=out_dtype, device="cuda")
        got = nmoe_kernels.dequantize_fp8_1x128(x_fp8.cuda(), scale_arg, out_dtype, out=out)
        assert got is out
        assert_bitwise_equal(got, want, f"dequant {out_dtype} scales strides {scale_arg.stride()}")


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_dequantize_round_trip_matches_reference(ue8m0):
    x = spread_input(300, 1024, torch.bfloat16)
    got = nmoe_kernels.dequantize_fp8_1x128(*nmoe_kernels.quantize_fp8_1x128(x.cuda(), ue8m0=ue8m0))
    want = ref.dequantize_fp8_1x128(*ref.quantize_fp8_1x128(x, ue8m0=ue8m0))
    assert_bitwise_equal(got, want, "dequant(quant(x))")


def test_runs_on_the_current_stream():
    x = spread_input(2048, 7168, torch.bfloat16).cuda()
    want_fp8, want_scales = ref.quantize_fp8_1x128(x.cpu())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x * 1  # queued on the side stream; the op must run after it on the same stream
        got_fp8, got_scales = nmoe_kernels.quantize_fp8_1x128(y)
    torch.cuda.current_stream().wait_stream(stream)
    assert_bitwise_equal(got_fp8, want_fp8, "x_fp8 on a side stream")
    assert_bitwise_equal(got_scales, want_scales, "scales on a side stream")


def test_empty_inputs():
    x_fp8, scales = nmoe_kernels.quantize_fp8_1x128(torch.empty(0, 256, device="cuda"))
    assert x_fp8.shape == (0, 256) and scales.shape == (0, 2)
    out = nmoe_kernels.dequantize_fp8_1x128(x_fp8, scales)
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 128"):
        nmoe_kernels.quantize_fp8_1x128(x[:, :200])
    with pytest.raises(ValueError, match="contiguous"):
        nmoe_kernels.quantize_fp8_1x128(x.t().contiguous().t())
    with pytest.raises(ValueError, match="16-byte aligned"):
        nmoe_kernels.quantize_fp8_1x128(x.view(-1)[1 : 1 + 7 * 256].view(7, 256))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        nmoe_kernels.quantize_fp8_1x128(x.half())
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        nmoe_kernels.quantize_fp8_1x128(x.cpu())
    x_fp8, scales = nmoe_kernels.quantize_fp8_1x128(x)
    with pytest.raises(ValueError, match=r"out\[1\] must have strides"):
        nmoe_kernels.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned", out=(x_fp8, scales))
    with pytest.raises(ValueError, match="scales_MKb must have shape"):
        nmoe_kernels.dequantize_fp8_1x128(x_fp8, scales[:, :1])
    with pytest.raises(ValueError, match="out_dtype"):
        nmoe_kernels.dequantize_fp8_1x128(x_fp8, scales, torch.float16)
