// Host launcher for the multi-tensor AdamW step (sm90_adamw.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. The tensor table is built and
// validated by the Python wrapper (nmoe_kernels.optim.adamw_step_); the launcher selects the
// device, launches on `stream` and throws std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::optim {

// Elements one CTA updates: the Python wrapper cuts every tensor into ceil(numel / this) blocks.
constexpr int64_t kAdamwBlockElems = 8192;
// Columns of a table row: param, grad, exp_avg, exp_avg_sq (device addresses), numel, and the
// index of the tensor's first CTA (a running sum of the block counts, starting at 0); a table
// may carry a seventh, kAdamwCopyCol: the address of a bfloat16 copy of the parameter that the
// step refreshes (0: none).
constexpr int kAdamwTableCols = 6;
constexpr int kAdamwCopyCol = 6;

// The hyperparameters as the float32 scalars the update uses (see sm90_adamw.cu).
struct AdamwScalars {
  float decay;           // 1 - lr * weight_decay
  float one_minus_beta1; // lerp weight of the first moment
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;
  float neg_step_size;   // -lr / (1 - beta1^step)
  float eps;
};

// table: int64 [num_tensors, cols] on `device`, cols kAdamwTableCols or kAdamwTableCols + 1 (the
// copy column); num_blocks: total CTAs (the last row's first block plus its block count).
// Moments are bfloat16 when moments_bf16, else float32; params and grads float32. grad_coef: a
// float32 device scalar multiplying every gradient, or null.
void launch_adamw_step(const int64_t* table, int64_t num_tensors, int cols, int64_t num_blocks,
                       bool moments_bf16, const AdamwScalars& scalars, const float* grad_coef,
                       int device, std::uintptr_t stream);

}  // namespace nmoe::optim
