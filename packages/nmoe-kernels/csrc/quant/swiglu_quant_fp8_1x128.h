// Host launcher for SwiGLU + FP8 E4M3 1x128 quantization (sm90_swiglu_quant.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// caller (quant_api.cpp); the launcher selects the device, launches on `stream` and throws
// std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::quant {

// h: [num_rows, 2 * num_features] bf16 (h_is_bf16) or fp32, contiguous, 16-byte aligned, with
// interleaved (gate, up) columns; num_features % 128 == 0. y_fp8: [num_rows, num_features] E4M3
// bytes of silu(gate) * up. scales: fp32, row-major [num_rows, num_features/128] when
// !scales_mn_major, else [num_features/128, scales_ld] (scales_ld = num_rows rounded up to 4; the
// pad columns are written as 0).
void launch_swiglu_quant_fp8_1x128(const void* h, bool h_is_bf16, void* y_fp8, float* scales,
                                   int64_t num_rows, int64_t num_features, bool scales_mn_major,
                                   int64_t scales_ld, bool ue8m0, int device,
                                   std::uintptr_t stream);

}  // namespace nmoe::quant
