// Router top-k: per row of float32 router scores, the k experts with the largest
// `scores[t, e] + bias[e]`, in descending order of that biased value, ties to the lower expert.
//
// The biased value is one float32 add rounded to nearest even, as torch's `scores_TE + bias_E`,
// so the selection matches torch bit for bit. Ordering is torch.sort's: NaN above +inf, -0 equal
// to +0. Each value becomes an order-preserving uint32 key (sign-flipped float bits; NaN ->
// 0xffffffff, -0 -> +0), and a candidate is the uint64 (key << 32) | (0xffffffff - e): the
// largest candidate is the largest value, ties to the lowest expert index e.
//
// Work split: one group of G lanes per row (G = 32 for E > 32; the next power of two >= E for
// smaller E, so one warp takes 32 / G rows). Lane m of a group holds experts e = j * G + m,
// j < V = ceil(E / G) rounded up to a power of two, in registers (absent experts get key 0, below
// every real key), and its best candidate. Each of the k rounds is a butterfly max over the group
// (log2(G) 64-bit xor shuffles); the lane that owns the winner clears that key and rescans its V
// keys, and lane r of the group keeps round r's winner, so the k ids leave in one coalesced int64
// store. Loads are 4-byte and coalesced across the group (the row is read exactly once); the bias
// is loaded once per thread. Warps stride over the rows (grid capped at what the GPU holds).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../cuda_check.h"
#include "router_topk.h"

namespace nmoe::router {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr uint32_t kFullMask = 0xffffffffu;

__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;  // NaN: above +inf
  if ((bits << 1) == 0u) bits = 0u;                             // -0 orders as +0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ uint64_t candidate(uint32_t key, int expert) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(0xffffffffu - expert);
}

// The best of this lane's keys as a candidate (strict > over increasing j: the lowest expert of
// equal keys).
template <int kGroup, int kPerLane>
__device__ __forceinline__ uint64_t lane_best(const uint32_t (&key)[kPerLane], int member) {
  uint32_t best_key = key[0];
  int best_j = 0;
#pragma unroll
  for (int j = 1; j < kPerLane; ++j) {
    if (key[j] > best_key) {
      best_key = key[j];
      best_j = j;
    }
  }
  return candidate(best_key, best_j * kGroup + member);
}

template <int kGroup, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    router_topk_kernel(const float* __restrict__ scores, const float* __restrict__ bias,
                       int64_t* __restrict__ expert_ids, int64_t num_rows, int num_experts,
                       int top_k) {
  constexpr int kRowsPerWarp = 32 / kGroup;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int member = lane & (kGroup - 1);
  const int group = lane / kGroup;

  float bias_j[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = j * kGroup + member;
    bias_j[j] = e < num_experts ? __ldg(bias + e) : 0.0f;
  }

  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t first = warp * kRowsPerWarp; first < num_rows; first += warp_stride * kRowsPerWarp) {
    const int64_t row = first + group;
    const bool valid = row < num_rows;  // invalid groups still join every shuffle
    const float* row_scores = scores + row * num_experts;

    uint32_t key[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kGroup + member;
      key[j] = 0u;
      if (valid && e < num_experts) key[j] = order_key(__ldg(row_scores + e) + bias_j[j]);
    }
    uint64_t mine = lane_best<kGroup, kPerLane>(key, member);

    int64_t my_id = 0;
    for (int r = 0; r < top_k; ++r) {
      uint64_t best = mine;
#pragma unroll
      for (int offset = kGroup / 2; offset > 0; offset /= 2) {
        const uint64_t other = __shfl_xor_sync(kFullMask, best, offset, kGroup);
        best = other > best ? other : best;
      }
      const int winner = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best));
      if (member == r) my_id = winner;
      if ((winner & (kGroup - 1)) == member) {
        const int winner_j = winner / kGroup;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          if (j == winner_j) key[j] = 0u;
        }
        mine = lane_best<kGroup, kPerLane>(key, member);
      }
    }
    if (valid && member < top_k) expert_ids[row * top_k + member] = my_id;
  }
}

template <int kGroup, int kPerLane>
void launch(const float* scores, const float* bias, int64_t* expert_ids, int64_t num_rows,
            int num_experts, int top_k, int max_blocks, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kWarpsPerBlock * (32 / kGroup);
  const int64_t needed = (num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>(needed < max_blocks ? needed : max_blocks));
  router_topk_kernel<kGroup, kPerLane><<<grid, kThreads, 0, stream>>>(
      scores, bias, expert_ids, num_rows, num_experts, top_k);
}

}  // namespace

void launch_router_topk(const float* scores, const float* bias, int64_t* expert_ids,
                        int64_t num_rows, int64_t num_experts, int64_t top_k, int device,
                        std::uintptr_t stream) {
  constexpr const char* kOp = "router_topk";
  if (num_experts < 1 || num_experts > kRouterMaxExperts || top_k < 1 ||
      top_k > kRouterMaxTopK || top_k > num_experts) {
    throw std::runtime_error(std::string(kOp) + ": needs 1 <= k <= min(E, 32) and E <= 1024, got" +
                             " E = " + std::to_string(num_experts) + ", k = " +
                             std::to_string(top_k));
  }
  if (num_rows == 0) return;
  CudaDeviceGuard guard(device, kOp);
  int num_sms = 0;
  NMOE_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), kOp);
  // Enough blocks to fill every SM (2048 threads each); the warps stride over the rest.
  const int max_blocks = num_sms * (2048 / kThreads);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int e = static_cast<int>(num_experts);
  const int k = static_cast<int>(top_k);
  if (e <= 1) {
    launch<1, 1>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 2) {
    launch<2, 1>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 4) {
    launch<4, 1>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 8) {
    launch<8, 1>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 16) {
    launch<16, 1>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 32) {
    launch<32, 1>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 64) {
    launch<32, 2>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 128) {
    launch<32, 4>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 256) {
    launch<32, 8>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else if (e <= 512) {
    launch<32, 16>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  } else {
    launch<32, 32>(scores, bias, expert_ids, num_rows, e, k, max_blocks, cuda_stream);
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::router
