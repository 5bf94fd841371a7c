// Host launcher for the router top-k (sm90_router_topk.cu).
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// binding (router_api.cpp); the launcher selects the device, launches on `stream` and throws
// std::runtime_error on any CUDA error.
#pragma once

#include <cstdint>

namespace nmoe::router {

// Limits of the register-resident design: a row lives in one warp, at most 32 values per lane,
// and the k winners end up one per lane.
constexpr int64_t kRouterMaxExperts = 1024;
constexpr int64_t kRouterMaxTopK = 32;

// scores: float32 [num_rows, num_experts] contiguous; bias: float32 [num_experts]; expert_ids:
// int64 [num_rows, top_k], written completely. 1 <= num_experts <= kRouterMaxExperts,
// 1 <= top_k <= min(num_experts, kRouterMaxTopK). num_rows == 0 launches nothing.
void launch_router_topk(const float* scores, const float* bias, int64_t* expert_ids,
                        int64_t num_rows, int64_t num_experts, int64_t top_k, int device,
                        std::uintptr_t stream);

}  // namespace nmoe::router
