// The FP8 E4M3 block-scale rule and element conversion shared by every FP8 quantization kernel.
//
// Bit-identical to nmoe_kernels.reference.quantization (fp8_scale, to_e4m3_saturating); change
// both together:
//   scale = amax / 448                      (IEEE fp32 division)
//   scale = 2^-126 if scale < 2^-126        (smallest normal fp32: 1/scale stays finite and an
//                                            all-zero block gets scale 2^-126)
//   ue8m0: scale = 2^ceil(log2(scale))      (round the fp32 bit pattern up to a power of two)
//   x_fp8 = cvt.rn.satfinite.e4m3(x * (1 / scale))   (fp32 reciprocal, fp32 multiply, RNE)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace nmoe::quant {

constexpr float kE4M3Max = 448.0f;
constexpr uint32_t kMinScaleBits = 0x00800000u;  // 2^-126

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// |v| as a bit pattern: for non-negative floats the bit patterns order like the values (NaN above
// +inf), so the block amax is an integer max.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

// The block scale for a block whose amax has bit pattern `amax_bits` (a NaN stays NaN).
template <bool kUe8m0>
__device__ __forceinline__ float fp8_block_scale(uint32_t amax_bits) {
  float scale = __fdiv_rn(__uint_as_float(amax_bits), kE4M3Max);
  const float min_scale = __uint_as_float(kMinScaleBits);
  scale = scale < min_scale ? min_scale : scale;  // written so that NaN passes through
  if constexpr (kUe8m0) {
    uint32_t bits = __float_as_uint(scale);
    const bool finite = (bits & 0x7F800000u) != 0x7F800000u;
    if (finite && (bits & 0x007FFFFFu) != 0u) bits = (bits + 0x00800000u) & 0x7F800000u;
    scale = __uint_as_float(bits);
  }
  return scale;
}

// Two floats, already multiplied by 1/scale, to two E4M3 bytes (a in the low byte), RNE saturating.
__device__ __forceinline__ uint32_t e4m3x2(float a, float b) {
  // __nv_cvt_float2_to_fp8x2 puts .x in the low byte (cvt.rn.satfinite.e4m3x2.f32).
  return static_cast<uint32_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// Four values times `inv_scale` (each product rounded to fp32) to four E4M3 bytes, v[i] in byte i.
__device__ __forceinline__ uint32_t quantize_e4m3x4(const float* v, float inv_scale) {
  return e4m3x2(__fmul_rn(v[0], inv_scale), __fmul_rn(v[1], inv_scale)) |
         e4m3x2(__fmul_rn(v[2], inv_scale), __fmul_rn(v[3], inv_scale)) << 16;
}

}  // namespace nmoe::quant
