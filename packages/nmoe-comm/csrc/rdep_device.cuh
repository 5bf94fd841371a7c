// Device primitives shared by the RDEP kernels (rdep_kernels.cu, rdep_stream.cu): sizes, the
// cross-GPU release/acquire pair, the in-kernel barrier and last-block detection, warp copies
// and a block prefix sum. Internal to nmoe_comm._C (an anonymous namespace per translation unit).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "rdep.h"

namespace nmoe::comm {
namespace {

constexpr int kWarp = 32;
constexpr int kBlockThreads = 256;  // multi-block kernels: 8 warps, one row per warp
constexpr int kWarpsPerBlock = kBlockThreads / kWarp;
constexpr int kRouteThreads = 1024;
constexpr int64_t kRouteSmemBudget = 200 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------- primitives

__device__ __forceinline__ unsigned long long global_timer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long load_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int64_t warp_sum(int64_t v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ char* peer_base(const Layout& g, int rank) {
  return reinterpret_cast<char*>(g.peer_bases[rank]);
}

// With `sync_peers` nonzero: this rank's barrier epoch (a counter in its own buffer, so the
// kernels count barriers themselves and a CUDA graph of dispatches and combines replays with
// fresh epochs) goes up by one, is published to every peer, and every peer's is awaited. Every
// rank runs the same sequence of barriers, so their n-th barriers share epoch n. Called by all
// threads of one block; a no-op for sync_peers 0 (the NVSHMEM puts path barriers on the host
// stream instead).
__device__ void block_barrier(const Layout& g, unsigned long long sync_peers) {
  __shared__ unsigned long long epoch;
  __threadfence_system();  // every thread: its stores are ordered before the block's signal
  __syncthreads();
  if (sync_peers != 0) {
    if (threadIdx.x == 0) {
      // Only this block of this kernel touches the counter, and kernels on the stream run in
      // order: a plain read-modify-write.
      auto* mine = reinterpret_cast<unsigned long long*>(g.local_base + g.counter_off) +
                   kEpochWord;
      epoch = *mine + 1;
      *mine = epoch;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < g.world; p += blockDim.x) {
      auto* slot = reinterpret_cast<unsigned long long*>(peer_base(g, p) + g.signal_off) + g.rank;
      store_release_sys(slot, epoch);
    }
    for (int p = threadIdx.x; p < g.world; p += blockDim.x) {
      const auto* mine =
          reinterpret_cast<const unsigned long long*>(g.local_base + g.signal_off) + p;
      const unsigned long long start = global_timer();
      while (load_acquire_sys(mine) < epoch) {
        if (global_timer() - start > g.timeout_ns) {
          printf(
              "nmoe_comm: rank %d waited %.0f s in barrier %llu for rank %d, which is behind or "
              "gone; every rank must call every dispatcher method in the same order\n",
              g.rank, g.timeout_ns * 1e-9, epoch, p);
          __trap();
        }
      }
    }
  }
  __syncthreads();
}

// True in exactly one block: the last to finish. Every thread's prior stores are fenced first.
__device__ bool last_block_done(const Layout& g, int slot) {
  __shared__ bool is_last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* counter = reinterpret_cast<unsigned int*>(g.local_base + g.counter_off) + slot;
    const unsigned int before = atomicAdd(counter, 1u);
    is_last = before == gridDim.x - 1;
    if (is_last) atomicExch(counter, 0u);  // ready for the next launch
  }
  __syncthreads();
  return is_last;
}

// Ends a multi-block kernel: with sync_peers, the last block runs the completion barrier.
__device__ void finish_grid(const Layout& g, int slot, unsigned long long sync_peers) {
  if (sync_peers == 0) {
    __threadfence_system();
    return;
  }
  if (last_block_done(g, slot)) block_barrier(g, sync_peers);
}

// Rows a kernel walks: the host's bound, or fewer when a sync-free dispatch left the received
// count on the device (`num_rows_dev`, R of this rank; never above the bound).
__device__ __forceinline__ int64_t rows_to_walk(int64_t bound, const int64_t* num_rows_dev) {
  return num_rows_dev != nullptr ? min(bound, *num_rows_dev) : bound;
}

template <typename V>
__device__ __forceinline__ void warp_copy_as(char* dst, const char* src, int64_t nbytes,
                                             int lane) {
  constexpr int kUnroll = 4;
  const int64_t n = nbytes / static_cast<int64_t>(sizeof(V));
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  for (int64_t base = lane; base < n; base += kWarp * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kWarp;
      if (i < n) v[u] = s[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kWarp;
      if (i < n) d[i] = v[u];
    }
  }
}

// One warp copies `nbytes` with the widest access that the addresses and length allow.
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int64_t nbytes, int lane) {
  const auto bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                    static_cast<uintptr_t>(nbytes);
  if ((bits & 15) == 0) {
    warp_copy_as<uint4>(dst, src, nbytes, lane);
  } else if ((bits & 7) == 0) {
    warp_copy_as<uint2>(dst, src, nbytes, lane);
  } else if ((bits & 3) == 0) {
    warp_copy_as<unsigned int>(dst, src, nbytes, lane);
  } else if ((bits & 1) == 0) {
    warp_copy_as<unsigned short>(dst, src, nbytes, lane);
  } else {
    warp_copy_as<unsigned char>(dst, src, nbytes, lane);
  }
}

// In-place exclusive prefix sum of a[0, n) (shared memory) by the whole block; returns the total.
// blockDim.x must be a multiple of 32.
__device__ int32_t block_exclusive_scan(int32_t* a, int n) {
  __shared__ int32_t warp_totals[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  const int per_thread = (n + blockDim.x - 1) / blockDim.x;
  const int begin = min(n, static_cast<int>(threadIdx.x) * per_thread);
  const int end = min(n, begin + per_thread);
  int32_t sum = 0;
  for (int i = begin; i < end; ++i) sum += a[i];
  int32_t inclusive = sum;
  for (int off = 1; off < kWarp; off *= 2) {
    const int32_t up = __shfl_up_sync(kFullMask, inclusive, off);
    if (lane >= off) inclusive += up;
  }
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int32_t v = lane < num_warps ? warp_totals[lane] : 0;
    for (int off = 1; off < kWarp; off *= 2) {
      const int32_t up = __shfl_up_sync(kFullMask, v, off);
      if (lane >= off) v += up;
    }
    warp_totals[lane] = v;
  }
  __syncthreads();
  int32_t running = inclusive - sum + (warp > 0 ? warp_totals[warp - 1] : 0);
  for (int i = begin; i < end; ++i) {
    const int32_t c = a[i];
    a[i] = running;
    running += c;
  }
  const int32_t total = warp_totals[kWarp - 1];
  __syncthreads();
  return total;
}

// Per-block tables from the count matrix (int32, shared memory) that unpack and the pipelined
// dispatch build: where each (source, local expert) block of rows lands and where it goes in
// contract order, plus each peer's row counts both ways. smem_words() int32 words.
struct StreamTables {
  int32_t* land_start;      // [W * L] (source, local expert) -> first landing row here
  int32_t* contract_start;  // [L * W] (local expert, source) -> first contract row here
  int32_t* land_base;       // [W] first landing row of each source here
  int32_t* send_off;        // [W] each source's first send position for this rank
  int32_t* recv_rows;       // [W] rows each source sends here
  int32_t* send_start;      // [W] this rank's first send position for each owner
  int32_t* send_rows;       // [W] rows this rank sends to each owner

  static int64_t smem_words(int num_experts, int world) {
    return 2LL * num_experts + 5LL * world;
  }

  __device__ void build(const Layout& g, int32_t* smem) {
    const int W = g.world, L = g.local_experts, E = g.num_experts, me = g.rank;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    land_start = smem;
    contract_start = land_start + W * L;
    land_base = contract_start + L * W;
    send_off = land_base + W;
    recv_rows = send_off + W;
    send_start = recv_rows + W;
    send_rows = send_start + W;
    const auto* C = reinterpret_cast<const int32_t*>(g.local_base + g.counts_off);
    for (int idx = threadIdx.x; idx < W * L; idx += blockDim.x) {
      const int s = idx / L, e = idx % L;
      const int32_t c = C[s * (E + 1) + me * L + e];
      land_start[idx] = c;
      contract_start[e * W + s] = c;
    }
    __syncthreads();
    block_exclusive_scan(land_start, W * L);
    block_exclusive_scan(contract_start, L * W);
    for (int p = warp; p < W; p += kWarpsPerBlock) {
      int64_t before = 0, from = 0, start = 0, to = 0;
      for (int e = lane; e < E; e += kWarp) {
        const int owner = e / L;
        const int32_t c_pe = C[p * (E + 1) + e];   // source p's slots to expert e
        const int32_t c_me = C[me * (E + 1) + e];  // this rank's slots to expert e
        if (owner < me) before += c_pe;
        if (owner == me) from += c_pe;
        if (owner < p) start += c_me;
        if (owner == p) to += c_me;
      }
      before = warp_sum(before);
      from = warp_sum(from);
      start = warp_sum(start);
      to = warp_sum(to);
      if (lane == 0) {
        send_off[p] = static_cast<int32_t>(before);
        recv_rows[p] = static_cast<int32_t>(from);
        send_start[p] = static_cast<int32_t>(start);
        send_rows[p] = static_cast<int32_t>(to);
        land_base[p] = land_start[p * L];
      }
    }
    __syncthreads();
  }

  // Chunks of `chunk_rows` of the largest per-peer row count in `rows` [W].
  __device__ static int64_t max_chunks(const int32_t* rows, int world, int chunk_rows) {
    int64_t most = 0;
    for (int p = 0; p < world; ++p) most = max(most, static_cast<int64_t>(rows[p]));
    return (most + chunk_rows - 1) / chunk_rows;
  }
};

}  // namespace
}  // namespace nmoe::comm
