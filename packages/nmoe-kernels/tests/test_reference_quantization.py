"""The blockscaled quantization references against per-block loops, plus exact properties.

The loops compute each block's scale with numpy float32 scalars and encode elements by searching
the E4M3 / E2M1 value tables for the nearest value (ties to the even code), so they share no code
with the vectorized references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nmoe_kernels import reference as ref
from nmoe_kernels.reference import quantization as q

E4M3_CODES = np.arange(127, dtype=np.uint8)  # finite non-negative codes (0x7F is NaN)
E4M3_VALUES = torch.from_numpy(E4M3_CODES).view(torch.float8_e4m3fn).double().numpy()
E2M1_VALUES = np.array(q.E2M1_VALUES)


def nearest_code(magnitudes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table value per magnitude; ties go to the even index."""
    dist = np.abs(magnitudes.astype(np.float64)[:, None] - table[None, :])
    best = dist.min(axis=1, keepdims=True)
    candidates = dist == best
    even = candidates & (np.arange(table.size) % 2 == 0)[None, :]
    return np.where(even.any(axis=1), even.argmax(axis=1), candidates.argmax(axis=1))


def encode_e4m3(values: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 bytes, saturating at 448, RNE (table search)."""
    mags = np.minimum(np.abs(values), np.float32(448))
    codes = nearest_code(mags, E4M3_VALUES).astype(np.uint8)
    return codes | (np.signbit(values).astype(np.uint8) << 7)


def loop_block(values: np.ndarray, ue8m0: bool, elem_max: float = 448.0):
    """One block's (E4M3 bytes, float32 scale) following the documented rule step by step."""
    amax = np.float32(np.max(np.abs(values)))
    scale = np.float32(amax / np.float32(elem_max))
    if scale < np.float32(2.0**-126):
        scale = np.float32(2.0**-126)
    if ue8m0:
        scale = np.float32(2.0 ** math.ceil(math.log2(float(scale))))
    inv = np.float32(1.0) / scale
    return encode_e4m3(values * inv), scale


def spread_input(shape, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values whose blocks span ~2^-60..2^60, with an all-zero, a tiny and a huge block."""
    x = torch.randn(shape, dtype=torch.float64)
    flat = x.view(-1, block)
    flat *= torch.exp2(torch.randint(-60, 60, (flat.shape[0], 1)).double())
    flat[0] = 0.0
    if flat.shape[0] > 2:
        flat[1] *= 2.0**-125  # scale below 2^-126: floored
        flat[2] = flat[2].sign() * 3.0e37  # huge
    return x.to(dtype)


def fp8_bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).cpu().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_1x128_matches_block_loop(dtype, ue8m0):
    x = spread_input((5, 384), 128, dtype)
    x_fp8, scales = ref.quantize_fp8_1x128(x, ue8m0=ue8m0)
    assert x_fp8.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    values = x.float().numpy()
    got_bytes, got_scales = fp8_bytes(x_fp8), scales.numpy()
    for row in range(x.shape[0]):
        for block in range(x.shape[1] // 128):
            cols = slice(block * 128, (block + 1) * 128)
            codes, scale = loop_block(values[row, cols], ue8m0)
            assert got_scales[row, block].tobytes() == scale.tobytes(), (row, block)
            np.testing.assert_array_equal(got_bytes[row, cols], codes, err_msg=f"{row},{block}")


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_128x128_matches_block_loop_with_expert_dim(ue8m0):
    w = spread_input((2, 256, 384), 128, torch.bfloat16)
    w_fp8, scales = ref.quantize_fp8_128x128(w, ue8m0=ue8m0)
    assert scales.shape == (2, 2, 3)
    values, got_bytes = w.float().numpy(), fp8_bytes(w_fp8)
    for e in range(2):
        for rb in range(2):
            for cb in range(3):
                rows, cols = slice(rb * 128, rb * 128 + 128), slice(cb * 128, cb * 128 + 128)
                block = values[e, rows, cols].reshape(-1)
                codes, scale = loop_block(block, ue8m0)
                assert scales[e, rb, cb].numpy().tobytes() == scale.tobytes()
                np.testing.assert_array_equal(got_bytes[e, rows, cols].reshape(-1), codes)
    back = ref.dequantize_fp8_128x128(w_fp8, scales, torch.float32)
    expected = w_fp8.float() * scales.repeat_interleave(128, 1).repeat_interleave(128, 2)
    assert torch.equal(back, expected)


@pytest.mark.parametrize("transpose", [False, True])
def test_fp8_128x128_partial_last_block_row_and_transpose_match_block_loop(transpose):
    """N = 200 rows: the second block row holds 72 rows; transpose=True reads w as [E, K, N]."""
    w_ENK = spread_input((2, 200, 256), 128, torch.float32)
    w_ENK[1, 128:] *= 2.0**-40  # the partial block row gets its own (small) scale
    arg = w_ENK.transpose(1, 2).contiguous() if transpose else w_ENK
    w_fp8, scales = ref.quantize_fp8_128x128(arg, transpose=transpose)
    assert w_fp8.shape == (2, 200, 256) and w_fp8.is_contiguous() and scales.shape == (2, 2, 2)
    values, got_bytes = w_ENK.numpy(), fp8_bytes(w_fp8)
    for e in range(2):
        for rb in range(2):
            for cb in range(2):
                rows = slice(rb * 128, min(rb * 128 + 128, 200))
                cols = slice(cb * 128, cb * 128 + 128)
                codes, scale = loop_block(values[e, rows, cols].reshape(-1), ue8m0=False)
                assert scales[e, rb, cb].numpy().tobytes() == scale.tobytes(), (e, rb, cb)
                np.testing.assert_array_equal(got_bytes[e, rows, cols].reshape(-1), codes)
    back = ref.dequantize_fp8_128x128(w_fp8, scales, torch.float32)
    per_row = scales.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)
    assert torch.equal(back, w_fp8.float() * per_row)


def loop_swiglu_quantize(h: torch.Tensor, ue8m0: bool):
    """Per element in numpy float32 (exp values taken from torch.exp, whose ulp error is not under
    test), then `loop_block` per 1x128 block of the F-wide result."""
    h32 = h.float()
    exp_neg_gate = torch.exp(-h32[:, 0::2]).numpy()
    values = h32.numpy()
    rows, features = exp_neg_gate.shape
    y = np.empty((rows, features), dtype=np.float32)
    one = np.float32(1)
    for r in range(rows):
        for j in range(features):
            gate, up = values[r, 2 * j], values[r, 2 * j + 1]
            silu = np.float32(gate / np.float32(one + exp_neg_gate[r, j]))
            y[r, j] = np.float32(silu * up)
    codes = np.empty((rows, features), dtype=np.uint8)
    scales = np.empty((rows, features // 128), dtype=np.float32)
    for r in range(rows):
        for b in range(features // 128):
            cols = slice(b * 128, b * 128 + 128)
            codes[r, cols], scales[r, b] = loop_block(y[r, cols], ue8m0)
    return codes, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_swiglu_quantize_fp8_1x128_matches_element_loop(dtype, ue8m0):
    h = torch.randn(5, 512, dtype=torch.float64) * 4
    h *= torch.exp2(torch.randint(-20, 20, (5, 1)).double())  # rows of different magnitude
    h[0, :256] = 0.0  # an all-zero output block
    h[1, 0:256:2] = -200.0  # exp(200) overflows to inf: silu = -0.0
    h = h.to(dtype)
    y_fp8, scales = ref.swiglu_quantize_fp8_1x128(h, ue8m0=ue8m0)
    assert y_fp8.shape == (5, 256) and scales.shape == (5, 2)
    want_codes, want_scales = loop_swiglu_quantize(h, ue8m0)
    np.testing.assert_array_equal(fp8_bytes(y_fp8), want_codes)
    assert scales.numpy().tobytes() == want_scales.tobytes()
    assert scales[0, 0] == 2.0**-126 and torch.all(y_fp8[0, :128].float() == 0)
    mn_fp8, mn_scales = ref.swiglu_quantize_fp8_1x128(
        h, ue8m0=ue8m0, scale_layout="mn_major_tma_aligned"
    )
    assert torch.equal(mn_fp8.view(torch.uint8), y_fp8.view(torch.uint8))
    assert mn_scales.stride() == (1, 8) and torch.equal(mn_scales, scales)


def test_mxfp8_1x32_matches_block_loop():
    x = spread_input((3, 4, 96), 32, torch.float32)
    x_fp8, scale_bytes = ref.quantize_mxfp8_1x32(x)
    assert scale_bytes.dtype == torch.uint8 and scale_bytes.shape == (3, 4, 3)
    flat_x, flat_q = x.reshape(-1, 32).numpy(), fp8_bytes(x_fp8).reshape(-1, 32)
    flat_s = scale_bytes.reshape(-1).numpy()
    for i in range(flat_x.shape[0]):
        codes, scale = loop_block(flat_x[i], ue8m0=True)
        assert flat_s[i] == 127 + int(math.log2(float(scale))), i
        np.testing.assert_array_equal(flat_q[i], codes)
    back = ref.dequantize_mxfp8_1x32(x_fp8, scale_bytes, torch.float32)
    decoded = torch.exp2(scale_bytes.double() - 127).float().repeat_interleave(32, -1)
    assert torch.equal(back, x_fp8.float() * decoded)


def test_e8m0_decoding_edges():
    got = q.e8m0_to_float(torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8))
    assert got[:5].tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0, 2.0**127]
    assert math.isnan(got[5].item())


def loop_nvfp4_block(values: np.ndarray, global_scale: np.float32):
    amax = np.float32(np.max(np.abs(values)))
    block_scale = np.float32(np.float32(amax / np.float32(6)) / global_scale)
    scale_code = encode_e4m3(np.array([block_scale], dtype=np.float32))
    scale_value = np.float32(E4M3_VALUES[scale_code[0] & 0x7F])
    effective = np.float32(scale_value * global_scale)
    inv = np.float32(0) if effective == 0 else np.float32(1) / effective
    scaled = values * inv
    mags = np.minimum(np.abs(scaled), np.float32(6))
    codes = nearest_code(mags, E2M1_VALUES).astype(np.uint8)
    return codes | (np.signbit(scaled).astype(np.uint8) << 3), scale_code[0]


def test_nvfp4_matches_block_loop():
    x = torch.randn(6, 64) * torch.exp2(torch.randint(-8, 8, (6, 1)).float())
    x[0, :16] = 0.0
    x[1, 16:32] *= 1e-6  # block scale underflows E4M3: the block quantizes to zeros
    packed, scales, global_scale = ref.quantize_nvfp4(x)
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    assert scales.shape == (6, 4) and scales.dtype == torch.float8_e4m3fn
    amax = np.float32(x.abs().max().item())
    g = np.float32(amax / np.float32(2688))
    assert global_scale.numpy().tobytes() == g.tobytes()
    codes = q.unpack_fp4(packed).numpy()
    for row in range(6):
        for block in range(4):
            cols = slice(block * 16, block * 16 + 16)
            want_codes, want_scale = loop_nvfp4_block(x[row, cols].numpy(), g)
            assert fp8_bytes(scales)[row, block] == want_scale, (row, block)
            np.testing.assert_array_equal(codes[row, cols], want_codes, err_msg=f"{row},{block}")
    assert torch.all(q.unpack_fp4(packed)[1, 16:32] & 0x7 == 0)


def test_nvfp4_packing_and_decoding():
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(2, 128)
    codes = q.unpack_fp4(all_bytes)
    assert torch.equal(codes[:, 0::2], all_bytes & 0xF)  # element 2i is the low nibble
    assert torch.equal(codes[:, 1::2], all_bytes >> 4)
    assert torch.equal(q.pack_fp4(codes), all_bytes)
    values = q.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    table = list(q.E2M1_VALUES)
    assert values.tolist() == table + [-v for v in table]
    assert torch.equal(q.e2m1_codes(values), torch.arange(16, dtype=torch.uint8))


def test_e2m1_rounding_ties_and_saturation():
    probes = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 1e30, -0.2, -5.5])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -6.0]
    got = q.e2m1_to_float(q.e2m1_codes(probes))
    assert got.tolist() == want
    assert torch.signbit(got[9])


def test_e4m3_saturates_instead_of_nan():
    got = q.to_e4m3_saturating(torch.tensor([448.0, 463.9, 464.0, 1e9, -1e30, 0.0]))
    assert got.float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0, 0.0]


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_block_max_maps_to_448_and_zero_blocks(ue8m0):
    x = spread_input((4, 512), 128, torch.float32)
    x_fp8, scales = ref.quantize_fp8_1x128(x, ue8m0=ue8m0)
    blocks = x_fp8.float().view(4, 4, 128).abs().amax(-1)
    amax = x.view(4, 4, 128).abs().amax(-1)
    nonzero = scales > 2.0**-126
    if ue8m0:  # amax / scale lies in (224, 448]; RNE onto the E4M3 grid (step 16 there) keeps it
        assert torch.all(blocks[nonzero] >= 224) and torch.all(blocks[nonzero] <= 448)
    else:
        assert torch.all(blocks[nonzero] == 448)
    assert scales[0, 0] == 2.0**-126 and torch.all(x_fp8[0, :128].float() == 0)
    assert torch.all(scales >= amax / 448 * (1 - 2.0**-23))


def test_fp8_ue8m0_scales_are_powers_of_two():
    x = spread_input((8, 1024), 128, torch.bfloat16)
    for scales in (
        ref.quantize_fp8_1x128(x, ue8m0=True)[1],
        ref.quantize_fp8_128x128(
            x.view(1, 8, 1024).expand(16, 8, 1024).reshape(128, 1024), ue8m0=True
        )[1],
    ):
        mantissa, _ = torch.frexp(scales.double())
        assert torch.all(mantissa == 0.5), scales


def test_fp8_exactly_representable_values_survive():
    codes = torch.randint(0, 256, (6, 256), dtype=torch.int32).to(torch.uint8)
    codes[codes & 0x7F == 0x7F] = 0x7E  # no NaN codes
    codes[:, ::128] = 0x7E  # every block holds 448 so its scale is exactly 2^e
    exponents = torch.randint(-40, 40, (6, 2, 1)).double()
    scale = torch.exp2(exponents)
    x = (codes.view(torch.float8_e4m3fn).double().view(6, 2, 128) * scale).view(6, 256).float()
    for ue8m0 in (False, True):
        x_fp8, scales = ref.quantize_fp8_1x128(x, ue8m0=ue8m0)
        assert torch.equal(x_fp8.view(torch.uint8), codes)
        assert torch.equal(scales.double(), scale.view(6, 2))
        assert torch.equal(ref.dequantize_fp8_1x128(x_fp8, scales, torch.float32), x)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_quantize_dequantize_is_idempotent(ue8m0):
    """dq(q(dq(q(x)))) == dq(q(x)) bitwise (float32 dequant).

    Without ue8m0 each block's max maps to code 448, so the re-quantized amax is fl(448 * s) and
    the new scale fl(fl(448 * s) / 448) equals s = fl(amax / 448) (checked exhaustively over a
    binade of amax with numpy); the codes then come back unchanged. With ue8m0 the scale is a
    power of two and every product is exact.
    """
    x = spread_input((16, 768), 128, torch.float32)
    once = ref.dequantize_fp8_1x128(*ref.quantize_fp8_1x128(x, ue8m0=ue8m0), torch.float32)
    twice_fp8, twice_scales = ref.quantize_fp8_1x128(once, ue8m0=ue8m0)
    twice = ref.dequantize_fp8_1x128(twice_fp8, twice_scales, torch.float32)
    assert torch.equal(twice, once)
    if not ue8m0:  # with ue8m0 a block whose max code is 224 gets half the scale, doubled codes
        first_fp8 = ref.quantize_fp8_1x128(x, ue8m0=ue8m0)[0]
        assert torch.equal(twice_fp8.view(torch.uint8), first_fp8.view(torch.uint8))


def test_mxfp8_and_nvfp4_round_trip_is_idempotent():
    x = spread_input((4, 256), 32, torch.float32)
    once = ref.dequantize_mxfp8_1x32(*ref.quantize_mxfp8_1x32(x), torch.float32)
    assert torch.equal(
        ref.dequantize_mxfp8_1x32(*ref.quantize_mxfp8_1x32(once), torch.float32), once
    )
    y = torch.randn(4, 256)
    packed, scales, g = ref.quantize_nvfp4(y)
    once = ref.dequantize_nvfp4(packed, scales, g, torch.float32)
    packed2, scales2, g2 = ref.quantize_nvfp4(once, global_scale=g)
    assert torch.equal(ref.dequantize_nvfp4(packed2, scales2, g2, torch.float32), once)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_1x128_relative_error_bound(ue8m0):
    """|dq(q(x)) - x| <= max(2^-4 |x|, 2^-10 scale) per element (float32 dequant).

    E4M3 keeps 3 mantissa bits, so RNE onto the normal range (|x / scale| >= 2^-6) is off by at
    most half an ulp = 2^-4 relative; below that the grid is the subnormal step 2^-9 * scale, so
    the error is at most 2^-10 * scale. The float32 reciprocal and products add relative errors
    near 2^-23, covered by the (1 + 2^-20) factor.
    """
    x = spread_input((32, 512), 128, torch.float32)
    x_fp8, scales = ref.quantize_fp8_1x128(x, ue8m0=ue8m0)
    back = ref.dequantize_fp8_1x128(x_fp8, scales, torch.float32).double()
    scale = scales.double().repeat_interleave(128, 1)
    bound = torch.maximum(x.double().abs() * 2.0**-4, scale * 2.0**-10) * (1 + 2.0**-20)
    err = (back - x.double()).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max err/bound = {worst}"


def test_mn_major_tma_aligned_layout():
    for num_rows in (1, 4, 7):
        x = torch.randn(num_rows, 384)
        row_fp8, row_scales = ref.quantize_fp8_1x128(x)
        mn_fp8, mn_scales = ref.quantize_fp8_1x128(x, scale_layout="mn_major_tma_aligned")
        aligned = (num_rows + 3) // 4 * 4
        assert torch.equal(mn_fp8.view(torch.uint8), row_fp8.view(torch.uint8))
        assert mn_scales.shape == (num_rows, 3) and mn_scales.stride() == (1, aligned)
        assert torch.equal(mn_scales, row_scales)
        storage = torch.as_strided(mn_scales, (3, aligned), (aligned, 1))
        assert torch.equal(storage[:, num_rows:], torch.zeros(3, aligned - num_rows))
        back = ref.dequantize_fp8_1x128(mn_fp8, mn_scales, torch.float32)
        assert torch.equal(back, ref.dequantize_fp8_1x128(row_fp8, row_scales, torch.float32))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="multiple of 128"):
        ref.quantize_fp8_1x128(torch.randn(2, 100))
    with pytest.raises(ValueError, match="x_MK must be 2-D"):
        ref.quantize_fp8_1x128(torch.randn(2, 2, 128))
    with pytest.raises(ValueError, match="scale_layout"):
        ref.quantize_fp8_1x128(torch.randn(2, 128), scale_layout="col")
    with pytest.raises(ValueError, match="x_fp8_MK must be a torch.float8_e4m3fn"):
        ref.dequantize_fp8_1x128(torch.zeros(2, 128), torch.ones(2, 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        ref.quantize_nvfp4(torch.randn(2, 24))
    with pytest.raises(ValueError, match=r"K of w \[..., N, K\]: dim -1 is 100"):
        ref.quantize_fp8_128x128(torch.randn(128, 100))
    with pytest.raises(ValueError, match=r"K of w \[..., K, N\] \(transpose=True\): dim -2"):
        ref.quantize_fp8_128x128(torch.randn(100, 128), transpose=True)
    with pytest.raises(ValueError, match="multiple of 256"):
        ref.swiglu_quantize_fp8_1x128(torch.randn(4, 128))
