// FP8 E4M3 blockscaled quantization of activations, one fp32 scale per 1x128 block along K.
//
// Rule (bit-identical to nmoe_kernels.reference.quantize_fp8_1x128): amax = max |x| over the 128
// elements (as float32), then the scale rule of fp8_scale.cuh.
//
// One group of 128 / kVec threads owns one 1x128 block: each thread does one 16-byte load
// (8 bf16 or 4 fp32), the group reduces amax with xor-shuffles, and every thread converts and
// stores its own elements. Built for sm_90a and sm_100a (E4M3 conversion needs sm_89+).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../cuda_check.h"
#include "fp8_quant_1x128.h"
#include "fp8_scale.cuh"

namespace nmoe::quant {
namespace {

constexpr int kBlockK = 128;
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, bool kUe8m0, bool kMnMajor>
__global__ void __launch_bounds__(kThreads)
    fp8_quant_1x128_kernel(const T* __restrict__ x, uint8_t* __restrict__ x_fp8,
                           float* __restrict__ scales, int64_t num_rows, int64_t num_cols,
                           int64_t scales_ld) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kLanes = kBlockK / kVec;  // threads per 1x128 block: 16 (bf16) or 32 (fp32)
  static_assert(kVec % 2 == 0 && (kLanes & (kLanes - 1)) == 0 && kLanes <= 32);

  const int64_t num_col_blocks = num_cols / kBlockK;
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes;
  const bool valid = block < num_rows * num_col_blocks;
  const int64_t row = block / num_col_blocks;
  const int64_t col_block = block % num_col_blocks;
  const int64_t offset = row * num_cols + col_block * kBlockK + lane * kVec;

  float values[kVec];
  uint32_t amax_bits = 0;  // |x| bit patterns order like the floats (NaN above +inf)
  if (valid) {
    const uint4 packed = __ldg(reinterpret_cast<const uint4*>(x + offset));
    const T* elems = reinterpret_cast<const T*>(&packed);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      values[i] = to_float(elems[i]);
      amax_bits = max(amax_bits, __float_as_uint(values[i]) & 0x7FFFFFFFu);
    }
  }
  // Every lane of the warp takes part; xor distances < kLanes stay inside the group.
#pragma unroll
  for (int distance = kLanes / 2; distance > 0; distance /= 2) {
    amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, distance));
  }
  if (!valid) return;

  const float scale = fp8_block_scale<kUe8m0>(amax_bits);
  const float inv_scale = __frcp_rn(scale);
  uint32_t words[kVec / 4];  // 4 E4M3 bytes per word, element i in byte i % 4
#pragma unroll
  for (int i = 0; i < kVec; i += 4) {
    const float2 lo = make_float2(__fmul_rn(values[i], inv_scale),
                                  __fmul_rn(values[i + 1], inv_scale));
    const float2 hi = make_float2(__fmul_rn(values[i + 2], inv_scale),
                                  __fmul_rn(values[i + 3], inv_scale));
    // __nv_cvt_float2_to_fp8x2 puts .x in the low byte (cvt.rn.satfinite.e4m3x2.f32).
    words[i / 4] = static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(lo, __NV_SATFINITE, __NV_E4M3)) |
                   static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(hi, __NV_SATFINITE, __NV_E4M3))
                       << 16;
  }
  if constexpr (kVec == 8) {
    *reinterpret_cast<uint2*>(x_fp8 + offset) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint32_t*>(x_fp8 + offset) = words[0];
  }

  if (lane == 0) {
    if constexpr (kMnMajor) {
      scales[col_block * scales_ld + row] = scale;
      if (row == num_rows - 1) {
        for (int64_t pad = num_rows; pad < scales_ld; ++pad) {
          scales[col_block * scales_ld + pad] = 0.0f;
        }
      }
    } else {
      scales[block] = scale;
    }
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    fp8_dequant_1x128_kernel(const uint8_t* __restrict__ x_fp8, const float* __restrict__ scales,
                             int64_t scale_stride_row, int64_t scale_stride_col,
                             OutT* __restrict__ out, int64_t num_rows, int64_t num_cols) {
  constexpr int kVec = 16 / sizeof(OutT);  // elements per thread: one 16-byte store
  constexpr int kLanes = kBlockK / kVec;

  const int64_t num_col_blocks = num_cols / kBlockK;
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kLanes;
  if (block >= num_rows * num_col_blocks) return;
  const int lane = threadIdx.x % kLanes;
  const int64_t row = block / num_col_blocks;
  const int64_t col_block = block % num_col_blocks;
  const int64_t offset = row * num_cols + col_block * kBlockK + lane * kVec;

  const float scale = __ldg(scales + row * scale_stride_row + col_block * scale_stride_col);
  uint32_t words[kVec / 4];  // element i in byte i % 4 of words[i / 4]
  if constexpr (kVec == 8) {
    const uint2 packed = *reinterpret_cast<const uint2*>(x_fp8 + offset);
    words[0] = packed.x;
    words[1] = packed.y;
  } else {
    words[0] = *reinterpret_cast<const uint32_t*>(x_fp8 + offset);
  }
  alignas(16) OutT result[kVec];
#pragma unroll
  for (int i = 0; i < kVec; i += 2) {
    const auto pair = static_cast<__nv_fp8x2_storage_t>(words[i / 4] >> (8 * (i % 4)));
    const float2 decoded = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
    result[i] = from_float<OutT>(__fmul_rn(decoded.x, scale));
    result[i + 1] = from_float<OutT>(__fmul_rn(decoded.y, scale));
  }
  *reinterpret_cast<uint4*>(out + offset) = *reinterpret_cast<const uint4*>(result);
}

int64_t num_ctas(int64_t num_rows, int64_t num_cols, int lanes_per_block) {
  const int64_t threads = num_rows * (num_cols / kBlockK) * lanes_per_block;
  return (threads + kThreads - 1) / kThreads;
}

}  // namespace

void launch_fp8_quant_1x128(const void* x, bool x_is_bf16, void* x_fp8, float* scales,
                            int64_t num_rows, int64_t num_cols, bool scales_mn_major,
                            int64_t scales_ld, bool ue8m0, int device, std::uintptr_t stream) {
  constexpr const char* kOp = "quantize_fp8_1x128";
  if (num_rows == 0 || num_cols == 0) return;
  CudaDeviceGuard guard(device, kOp);
  auto* out = static_cast<uint8_t*>(x_fp8);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);

  auto launch = [&](auto elem, auto ue8m0_tag, auto mn_major_tag) {
    using T = decltype(elem);
    constexpr int kLanes = kBlockK / (16 / sizeof(T));
    const auto kernel = fp8_quant_1x128_kernel<T, decltype(ue8m0_tag)::value,
                                               decltype(mn_major_tag)::value>;
    kernel<<<num_ctas(num_rows, num_cols, kLanes), kThreads, 0, cuda_stream>>>(
        static_cast<const T*>(x), out, scales, num_rows, num_cols, scales_ld);
  };
  auto with_layout = [&](auto elem, auto ue8m0_tag) {
    if (scales_mn_major) {
      launch(elem, ue8m0_tag, std::true_type{});
    } else {
      launch(elem, ue8m0_tag, std::false_type{});
    }
  };
  auto with_ue8m0 = [&](auto elem) {
    if (ue8m0) {
      with_layout(elem, std::true_type{});
    } else {
      with_layout(elem, std::false_type{});
    }
  };
  if (x_is_bf16) {
    with_ue8m0(__nv_bfloat16{});
  } else {
    with_ue8m0(float{});
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

void launch_fp8_dequant_1x128(const void* x_fp8, const float* scales, int64_t scale_stride_row,
                              int64_t scale_stride_col, void* out, bool out_is_bf16,
                              int64_t num_rows, int64_t num_cols, int device,
                              std::uintptr_t stream) {
  constexpr const char* kOp = "dequantize_fp8_1x128";
  if (num_rows == 0 || num_cols == 0) return;
  CudaDeviceGuard guard(device, kOp);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const auto* in = static_cast<const uint8_t*>(x_fp8);
  if (out_is_bf16) {
    fp8_dequant_1x128_kernel<__nv_bfloat16>
        <<<num_ctas(num_rows, num_cols, kBlockK / 8), kThreads, 0, cuda_stream>>>(
            in, scales, scale_stride_row, scale_stride_col, static_cast<__nv_bfloat16*>(out),
            num_rows, num_cols);
  } else {
    fp8_dequant_1x128_kernel<float>
        <<<num_ctas(num_rows, num_cols, kBlockK / 4), kThreads, 0, cuda_stream>>>(
            in, scales, scale_stride_row, scale_stride_col, static_cast<float*>(out), num_rows,
            num_cols);
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::quant
