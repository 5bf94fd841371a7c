// Host launcher for the fused cross-entropy rows op (sm90_cross_entropy_rows.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// caller (loss_api.cpp); the launcher selects the device, launches on `stream` and throws
// std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::loss {

// logits: [num_rows, vocab] bf16 (is_bf16) or fp32, contiguous, read and overwritten in place by
// the gradient; targets: int64 [num_rows]; loss, lse: fp32 [num_rows]. The gradient of row n is
// scaled by row_scale[n] when row_scale is not null (fp32 [num_rows]), else by scale_value;
// ignored rows (targets[n] == ignore_index) get loss 0 and gradient 0. vocab >= 1.
void launch_cross_entropy_rows(void* logits, bool is_bf16, const int64_t* targets, float* loss,
                               float* lse, const float* row_scale, float scale_value,
                               int64_t ignore_index, int64_t num_rows, int64_t vocab, int device,
                               std::uintptr_t stream);

}  // namespace nmoe::loss
