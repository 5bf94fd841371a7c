// Host launcher for FP8 E4M3 128x128 blockscaled weight quantization (sm90_fp8_quant_128x128.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// caller (quant_api.cpp); the launcher selects the device, launches on `stream` and throws
// std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::quant {

// Grid limits the launcher needs (checked by the binding with a clear error).
constexpr int64_t kMaxGridYZ = 65535;

// w: [num_mats, src_rows, src_cols] bf16 (w_is_bf16) or fp32, contiguous, 16-byte aligned.
//   !transpose: w is [E, N, K] (src_rows = N any, src_cols = K % 128 == 0); w_fp8 is [E, N, K].
//   transpose:  w is [E, K, N] (src_rows = K % 128 == 0, src_cols = N % 8 == 0); w_fp8 is
//               [E, N, K], i.e. the transpose of the last two dims.
// scales: fp32 [E, ceil(N/128), K/128] contiguous, one per 128x128 block of w_fp8.
// Needs ceil(src_rows/128) <= kMaxGridYZ and num_mats <= kMaxGridYZ.
void launch_fp8_quant_128x128(const void* w, bool w_is_bf16, void* w_fp8, float* scales,
                              int64_t num_mats, int64_t src_rows, int64_t src_cols, bool transpose,
                              bool ue8m0, int device, std::uintptr_t stream);

}  // namespace nmoe::quant
