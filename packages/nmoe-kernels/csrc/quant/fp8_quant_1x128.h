// Host launchers for FP8 E4M3 1x128 blockscaled quantization (sm90_fp8_quant_1x128.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// caller (quant_api.cpp); the launchers select the device, launch on `stream` and throw
// std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::quant {

// x: [num_rows, num_cols] bf16 (x_is_bf16) or fp32, contiguous, 16-byte aligned; num_cols % 128 == 0.
// x_fp8: [num_rows, num_cols] E4M3 bytes. scales: fp32, row-major [num_rows, num_cols/128] when
// !scales_mn_major, else [num_cols/128, scales_ld] (scales_ld = num_rows rounded up to 4; the pad
// columns are written as 0).
void launch_fp8_quant_1x128(const void* x, bool x_is_bf16, void* x_fp8, float* scales,
                            int64_t num_rows, int64_t num_cols, bool scales_mn_major,
                            int64_t scales_ld, bool ue8m0, int device, std::uintptr_t stream);

// out[r, c] = float(x_fp8[r, c]) * scales[r * scale_stride_row + (c / 128) * scale_stride_col],
// rounded to bf16 (out_is_bf16) or kept fp32.
void launch_fp8_dequant_1x128(const void* x_fp8, const float* scales, int64_t scale_stride_row,
                              int64_t scale_stride_col, void* out, bool out_is_bf16,
                              int64_t num_rows, int64_t num_cols, int device,
                              std::uintptr_t stream);

}  // namespace nmoe::quant
