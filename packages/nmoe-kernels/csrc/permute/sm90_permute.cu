// Routing data movement: permute token rows into expert-contiguous order, gather rows, and
// unpermute expert outputs back to tokens with gate weighting. Deterministic, no atomics.
//
// permute is a stable counting sort of the R = T * K slots (slot s = t * K + k) by bucket
// (expert id; ids outside [0, E) form bucket E, sorted last), so row order is by expert, then
// token, then slot, as in nmoe_kernels.reference.permute:
//   1. count:  one CTA per chunk of 2048 slots; each warp owns 256 consecutive slots, groups its
//              lanes by bucket with __match_any_sync and the lowest lane of each group adds the
//              group size to the warp's shared-memory counters (one writer per counter: no
//              atomics); the CTA writes per-chunk counts [bucket][chunk].
//   2. scan:   one CTA turns the counts, read in (bucket, chunk) order, into exclusive row
//              offsets and writes counts_E.
//   3. rank:   each CTA recounts its chunk, turns the counts into per-warp starting rows
//              (chunk base + earlier warps of the chunk), and each warp walks its slots in order:
//              a slot's row is its warp's counter for the bucket plus the number of lower lanes in
//              its group; src_index[row] = slot.
//   4. gather: one warp per row copies x[src_index[row] / K] with the widest vector (16 bytes
//              when the row size allows).
// unpermute scatters each row's index into a slot -> row table (slots without a row stay -1),
// then each thread owns kVec consecutive features of one token and sums the K slots in order in
// fp32 (each product and sum rounded separately: __fmul_rn, __fadd_rn), as
// nmoe_kernels.reference.unpermute does.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../cuda_check.h"
#include "permute.h"

namespace nmoe::permute {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSlotsPerWarp = static_cast<int>(kChunkSlots) / kWarps;
constexpr int kIters = kSlotsPerWarp / 32;  // slots per lane per chunk
constexpr int kScanThreads = 1024;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
static_assert(kSlotsPerWarp % 32 == 0 && kWarps * kSlotsPerWarp == kChunkSlots);

// ---------------------------------------------------------------------------------------------
// Counting sort.

// Bucket of each of this lane's slots (-1 past the end), and the lanes of the warp that share it.
template <typename IdT>
__device__ __forceinline__ void warp_buckets(const IdT* __restrict__ ids, int64_t num_slots,
                                             int num_experts, int64_t warp_begin, int lane,
                                             int (&bucket)[kIters], unsigned (&peers)[kIters]) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t slot = warp_begin + it * 32 + lane;
    bucket[it] = -1;
    if (slot < num_slots) {
      const int64_t id = static_cast<int64_t>(ids[slot]);
      bucket[it] = (id >= 0 && id < num_experts) ? static_cast<int>(id) : num_experts;
    }
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) peers[it] = __match_any_sync(kFullMask, bucket[it]);
}

// Adds the warp's per-bucket slot counts to `counters` (this warp's shared-memory row): the
// lowest lane of each group is the only writer of its bucket's counter.
__device__ __forceinline__ void warp_count(const int (&bucket)[kIters],
                                           const unsigned (&peers)[kIters], int lane,
                                           int* counters) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (bucket[it] >= 0 && lane == __ffs(peers[it]) - 1) counters[bucket[it]] += __popc(peers[it]);
    __syncwarp();
  }
}

__device__ __forceinline__ void zero_counters(int* counters, int num_buckets) {
  for (int i = threadIdx.x; i < kWarps * num_buckets; i += kThreads) counters[i] = 0;
  __syncthreads();
}

template <typename IdT>
__global__ void __launch_bounds__(kThreads)
    permute_count_kernel(const IdT* __restrict__ ids, int64_t num_slots, int num_experts,
                         int64_t num_chunks, int32_t* __restrict__ chunk_counts) {
  extern __shared__ int counters[];  // [kWarps][num_buckets]
  const int num_buckets = num_experts + 1;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t chunk = blockIdx.x;
  zero_counters(counters, num_buckets);

  int bucket[kIters];
  unsigned peers[kIters];
  warp_buckets(ids, num_slots, num_experts, chunk * kChunkSlots + warp * kSlotsPerWarp, lane,
               bucket, peers);
  warp_count(bucket, peers, lane, counters + warp * num_buckets);
  __syncthreads();
  for (int b = threadIdx.x; b < num_buckets; b += kThreads) {
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += counters[w * num_buckets + b];
    chunk_counts[b * num_chunks + chunk] = sum;
  }
}

// Exclusive prefix sum over the CTA's threads (in thread order); `total` gets the sum of all.
__device__ __forceinline__ int block_exclusive_scan(int value, int* total) {
  __shared__ int warp_sums[kScanThreads / 32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int below = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += below;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int sums = warp_sums[lane];  // kScanThreads / 32 == 32 warps
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int below = __shfl_up_sync(kFullMask, sums, d);
      if (lane >= d) sums += below;
    }
    warp_sums[lane] = sums;
  }
  __syncthreads();
  *total = warp_sums[kScanThreads / 32 - 1];
  return (warp == 0 ? 0 : warp_sums[warp - 1]) + inclusive - value;
}

// One CTA: chunk_counts [num_buckets][num_chunks] -> exclusive offsets in (bucket, chunk) order;
// counts[e] = rows of expert e.
__global__ void __launch_bounds__(kScanThreads)
    permute_scan_kernel(int32_t* __restrict__ chunk_counts, int64_t num_chunks, int num_experts,
                        int64_t* __restrict__ counts) {
  static_assert(kScanThreads == 32 * 32);
  const int64_t n = (num_experts + 1) * num_chunks;
  const int64_t per_thread = (n + kScanThreads - 1) / kScanThreads;
  const int64_t begin = min(n, threadIdx.x * per_thread);
  const int64_t end = min(n, begin + per_thread);
  int sum = 0;
#pragma unroll 8
  for (int64_t i = begin; i < end; ++i) sum += chunk_counts[i];
  int total;
  int running = block_exclusive_scan(sum, &total);
  for (int64_t i = begin; i < end; ++i) {
    const int count = chunk_counts[i];
    chunk_counts[i] = running;
    running += count;
  }
  __syncthreads();  // makes the offsets written above visible to the whole CTA
  for (int e = threadIdx.x; e < num_experts; e += kScanThreads) {
    counts[e] = chunk_counts[(e + 1) * num_chunks] - chunk_counts[e * num_chunks];
  }
}

template <typename IdT>
__global__ void __launch_bounds__(kThreads)
    permute_rank_kernel(const IdT* __restrict__ ids, int64_t num_slots, int num_experts,
                        int64_t num_chunks, const int32_t* __restrict__ chunk_offsets,
                        int64_t* __restrict__ src_index) {
  extern __shared__ int counters[];  // [kWarps][num_buckets]: counts, then next row per bucket
  const int num_buckets = num_experts + 1;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t chunk = blockIdx.x;
  const int64_t warp_begin = chunk * kChunkSlots + warp * kSlotsPerWarp;
  zero_counters(counters, num_buckets);

  int bucket[kIters];
  unsigned peers[kIters];
  warp_buckets(ids, num_slots, num_experts, warp_begin, lane, bucket, peers);
  warp_count(bucket, peers, lane, counters + warp * num_buckets);
  __syncthreads();
  for (int b = threadIdx.x; b < num_buckets; b += kThreads) {
    int next = chunk_offsets[b * num_chunks + chunk];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int count = counters[w * num_buckets + b];
      counters[w * num_buckets + b] = next;
      next += count;
    }
  }
  __syncthreads();

  int* next_row = counters + warp * num_buckets;
  const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int b = bucket[it];
    if (b >= 0) {
      const int row = next_row[b] + __popc(peers[it] & lanes_below);
      src_index[row] = warp_begin + it * 32 + lane;
    }
    __syncwarp();  // every lane of the group has read next_row[b] before its leader bumps it
    if (b >= 0 && lane == __ffs(peers[it]) - 1) next_row[b] += __popc(peers[it]);
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Row gather.

template <typename VecT, typename IndexT>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const VecT* __restrict__ x, int64_t num_src_rows, int64_t vecs_per_row,
                       const IndexT* __restrict__ index, int64_t divisor, VecT* __restrict__ out,
                       int64_t num_out_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= num_out_rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t value = static_cast<int64_t>(index[row]);
  const int64_t src = value < 0 ? -1 : value / divisor;
  VecT* dst = out + row * vecs_per_row;
  if (src >= num_src_rows || src < 0) {
    for (int64_t v = lane; v < vecs_per_row; v += 32) dst[v] = VecT{};
    return;
  }
  const VecT* from = x + src * vecs_per_row;
#pragma unroll 4
  for (int64_t v = lane; v < vecs_per_row; v += 32) dst[v] = __ldg(from + v);
}

template <typename IndexT>
void gather_rows_typed(const void* x, int64_t num_src_rows, int64_t row_bytes, const IndexT* index,
                       int64_t divisor, void* out, int64_t num_out_rows, cudaStream_t stream) {
  const int64_t ctas = (num_out_rows + kWarps - 1) / kWarps;
  auto launch = [&](auto vec) {
    using VecT = decltype(vec);
    gather_rows_kernel<VecT, IndexT><<<ctas, kThreads, 0, stream>>>(
        static_cast<const VecT*>(x), num_src_rows, row_bytes / sizeof(VecT), index, divisor,
        static_cast<VecT*>(out), num_out_rows);
  };
  if (row_bytes % 16 == 0) {
    launch(uint4{});
  } else if (row_bytes % 8 == 0) {
    launch(uint2{});
  } else if (row_bytes % 4 == 0) {
    launch(uint32_t{});
  } else if (row_bytes % 2 == 0) {
    launch(uint16_t{});
  } else {
    launch(uint8_t{});
  }
}

// ---------------------------------------------------------------------------------------------
// Unpermute.

template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
    slot_rows_kernel(const IndexT* __restrict__ src_index, int64_t num_rows, int64_t num_slots,
                     int32_t* __restrict__ row_of_slot) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= num_rows) return;
  const int64_t slot = static_cast<int64_t>(src_index[row]);
  if (slot >= 0 && slot < num_slots) row_of_slot[slot] = static_cast<int32_t>(row);
}

template <typename T, int kN>
struct alignas(sizeof(T) * kN > 16 ? 16 : sizeof(T) * kN) Vec {
  T v[kN];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <typename YT, typename OutT, int kVec>
__global__ void __launch_bounds__(kThreads)
    unpermute_kernel(const YT* __restrict__ y, const int32_t* __restrict__ row_of_slot,
                     const float* __restrict__ gates, OutT* __restrict__ out, int64_t num_tokens,
                     int top_k, int64_t hidden) {
  constexpr int kGroup = 4;  // slots whose loads are in flight together
  const int64_t vecs_per_row = hidden / kVec;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= num_tokens * vecs_per_row) return;
  const int64_t token = item / vecs_per_row;
  const int64_t col = (item % vecs_per_row) * kVec;

  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
  bool started = false;
  for (int k0 = 0; k0 < top_k; k0 += kGroup) {
    int32_t rows[kGroup];
    float gate[kGroup];
    Vec<YT, kVec> values[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const bool in_range = k0 + j < top_k;
      rows[j] = in_range ? row_of_slot[token * top_k + k0 + j] : -1;
      gate[j] = in_range ? gates[token * top_k + k0 + j] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (rows[j] >= 0) {
        values[j] = *reinterpret_cast<const Vec<YT, kVec>*>(y + rows[j] * hidden + col);
      }
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (rows[j] < 0) continue;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float product = __fmul_rn(gate[j], to_float(values[j].v[i]));
        acc[i] = started ? __fadd_rn(acc[i], product) : product;
      }
      started = true;
    }
  }
  Vec<OutT, kVec> result;
#pragma unroll
  for (int i = 0; i < kVec; ++i) result.v[i] = from_float<OutT>(acc[i]);
  *reinterpret_cast<Vec<OutT, kVec>*>(out + token * hidden + col) = result;
}

}  // namespace

void launch_permute(const void* x, const void* expert_ids, bool ids_are_int64, int64_t num_tokens,
                    int64_t top_k, int64_t row_bytes, int64_t num_experts, void* x_out,
                    int64_t* counts, int64_t* src_index, int32_t* workspace, int device,
                    std::uintptr_t stream) {
  constexpr const char* kOp = "permute";
  CudaDeviceGuard guard(device, kOp);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int64_t num_slots = num_tokens * top_k;
  if (num_slots == 0) {
    NMOE_CUDA_CHECK(cudaMemsetAsync(counts, 0, num_experts * sizeof(int64_t), cuda_stream), kOp);
    return;
  }
  const int64_t num_chunks = (num_slots + kChunkSlots - 1) / kChunkSlots;
  const int experts = static_cast<int>(num_experts);
  const size_t smem = sizeof(int) * kWarps * (num_experts + 1);
  auto sort = [&](auto id_tag) {
    using IdT = decltype(id_tag);
    const auto* ids = static_cast<const IdT*>(expert_ids);
    permute_count_kernel<IdT>
        <<<num_chunks, kThreads, smem, cuda_stream>>>(ids, num_slots, experts, num_chunks,
                                                       workspace);
    NMOE_CUDA_CHECK_LAUNCH(kOp);
    permute_scan_kernel<<<1, kScanThreads, 0, cuda_stream>>>(workspace, num_chunks, experts,
                                                             counts);
    NMOE_CUDA_CHECK_LAUNCH(kOp);
    permute_rank_kernel<IdT>
        <<<num_chunks, kThreads, smem, cuda_stream>>>(ids, num_slots, experts, num_chunks,
                                                       workspace, src_index);
    NMOE_CUDA_CHECK_LAUNCH(kOp);
  };
  if (ids_are_int64) {
    sort(int64_t{});
  } else {
    sort(int32_t{});
  }
  if (row_bytes > 0) {
    gather_rows_typed<int64_t>(x, num_tokens, row_bytes, src_index, top_k, x_out, num_slots,
                               cuda_stream);
    NMOE_CUDA_CHECK_LAUNCH(kOp);
  }
}

void launch_gather_rows(const void* x, int64_t num_src_rows, int64_t row_bytes, const void* index,
                        bool index_is_int64, int64_t divisor, void* out, int64_t num_out_rows,
                        int device, std::uintptr_t stream) {
  constexpr const char* kOp = "gather_rows";
  if (num_out_rows == 0 || row_bytes == 0) return;
  CudaDeviceGuard guard(device, kOp);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (index_is_int64) {
    gather_rows_typed(x, num_src_rows, row_bytes, static_cast<const int64_t*>(index), divisor, out,
                      num_out_rows, cuda_stream);
  } else {
    gather_rows_typed(x, num_src_rows, row_bytes, static_cast<const int32_t*>(index), divisor, out,
                      num_out_rows, cuda_stream);
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

void launch_unpermute(const void* y, bool y_is_bf16, int64_t num_rows, int64_t hidden,
                      const void* src_index, bool index_is_int64, const float* gates,
                      int64_t num_tokens, int64_t top_k, void* out, bool out_is_bf16,
                      int32_t* workspace, int device, std::uintptr_t stream) {
  constexpr const char* kOp = "unpermute";
  const int64_t num_slots = num_tokens * top_k;
  if (num_tokens == 0 || hidden == 0) return;
  CudaDeviceGuard guard(device, kOp);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (num_slots > 0) {
    NMOE_CUDA_CHECK(cudaMemsetAsync(workspace, 0xFF, num_slots * sizeof(int32_t), cuda_stream),
                    kOp);
  }
  if (num_rows > 0) {
    const int64_t ctas = (num_rows + kThreads - 1) / kThreads;
    if (index_is_int64) {
      slot_rows_kernel<<<ctas, kThreads, 0, cuda_stream>>>(
          static_cast<const int64_t*>(src_index), num_rows, num_slots, workspace);
    } else {
      slot_rows_kernel<<<ctas, kThreads, 0, cuda_stream>>>(
          static_cast<const int32_t*>(src_index), num_rows, num_slots, workspace);
    }
    NMOE_CUDA_CHECK_LAUNCH(kOp);
  }

  auto launch = [&](auto y_tag, auto out_tag, auto vec_tag) {
    using YT = decltype(y_tag);
    using OutT = decltype(out_tag);
    constexpr int kVec = decltype(vec_tag)::value;
    const int64_t items = num_tokens * (hidden / kVec);
    unpermute_kernel<YT, OutT, kVec><<<(items + kThreads - 1) / kThreads, kThreads, 0,
                                       cuda_stream>>>(
        static_cast<const YT*>(y), workspace, gates, static_cast<OutT*>(out), num_tokens,
        static_cast<int>(top_k), hidden);
  };
  // The widest vector of at most 16 bytes of y that divides the row.
  auto with_vec = [&](auto y_tag, auto out_tag) {
    constexpr int kMaxVec = 16 / sizeof(decltype(y_tag));
    if (kMaxVec >= 8 && hidden % 8 == 0) {
      launch(y_tag, out_tag, std::integral_constant<int, (kMaxVec >= 8 ? 8 : 1)>{});
    } else if (hidden % 4 == 0) {
      launch(y_tag, out_tag, std::integral_constant<int, 4>{});
    } else if (hidden % 2 == 0) {
      launch(y_tag, out_tag, std::integral_constant<int, 2>{});
    } else {
      launch(y_tag, out_tag, std::integral_constant<int, 1>{});
    }
  };
  auto with_out = [&](auto y_tag) {
    if (out_is_bf16) {
      with_vec(y_tag, __nv_bfloat16{});
    } else {
      with_vec(y_tag, float{});
    }
  };
  if (y_is_bf16) {
    with_out(__nv_bfloat16{});
  } else {
    with_out(float{});
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::permute
