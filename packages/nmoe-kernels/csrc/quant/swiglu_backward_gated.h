// Host launcher for the gated SwiGLU backward (sm90_swiglu_backward.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// caller (quant_api.cpp); the launcher selects the device, launches on `stream` and throws
// std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::quant {

// h: bf16 [num_rows, 2 * num_features] (interleaved gate, up columns); da: bf16
// [num_rows, num_features]; gates: fp32 [num_rows]; all contiguous, 16-byte aligned rows,
// num_features % 128 == 0. Writes dh bf16 [num_rows, 2 * num_features], ag bf16
// [num_rows, num_features] and dgate fp32 [num_rows]. When dh_fp8 is not null it also writes the
// FP8 E4M3 1x128 quantization of the bf16 dh: dh_fp8 [num_rows, 2 * num_features] bytes and
// scales, row-major [num_rows, 2F/128] when !scales_mn_major, else [2F/128, scales_ld]
// (scales_ld = num_rows rounded up to 4; the pad columns are written as 0).
void launch_swiglu_backward_gated(const void* h, const void* da, const float* gates, void* dh,
                                  void* ag, float* dgate, void* dh_fp8, float* dh_scales,
                                  int64_t num_rows, int64_t num_features, bool scales_mn_major,
                                  int64_t scales_ld, bool ue8m0, int device,
                                  std::uintptr_t stream);

}  // namespace nmoe::quant
