// Device primitives shared by the RDEP kernels (rdep_kernels.cu, rdep_stream.cu): sizes, the
// cross-GPU release/acquire pair, the in-kernel barrier and last-block detection, warp copies,
// a block prefix sum, and the row logic that the two-kernel path (scatter_slots, unpack,
// reduce_slots) and the pipelined kernels must share to give bitwise the same results: the
// dedup chain of a slot, the routing recorded per contract row, and a token's slot sum.
// Internal to nmoe_comm._C (an anonymous namespace per translation unit).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "rdep.h"
#include "row_types.cuh"

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

// Byte offset, inside the zero-copy outputs (Layout::view_off), of the second payload's rows:
// after capacity rows of the first payload, rounded up to 16 (rdep.py computes the same).
__device__ __forceinline__ int64_t view_p1_off(const Layout& g, int64_t p0_bytes) {
  return (g.capacity * p0_bytes + 15) / 16 * 16;
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
  // build(..., direct) only: [E] for global expert x = o * L + e, the contract row on owner o of
  // this rank's rows of x less their first position in this rank's send order to o (a send
  // position relative to send_start[o] plus this is the row's contract row there); then [W]
  // scratch.
  int32_t* direct_base;

  static int64_t smem_words(int num_experts, int world) {
    return 3LL * num_experts + 6LL * world;
  }

  __device__ void build(const Layout& g, int32_t* smem, bool direct = false) {
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
    if (direct) build_direct(C, W, L, E, me);
  }

  // direct_base[x] = sum over the owner's experts x' < x of (all ranks' rows of x' less this
  // rank's) + the rows of x from ranks before this one: the owner's contract order is (local
  // expert, source), this rank's send order to it (local expert) with its own rows only.
  __device__ void build_direct(const int32_t* C, int W, int L, int E, int me) {
    direct_base = send_rows + W;
    int32_t* seg = direct_base + E;
    for (int x = threadIdx.x; x < E; x += blockDim.x) {
      int32_t others = 0;
      for (int s = 0; s < W; ++s) others += s == me ? 0 : C[s * (E + 1) + x];
      direct_base[x] = others;
    }
    __syncthreads();
    block_exclusive_scan(direct_base, E);  // ends in __syncthreads
    for (int o = threadIdx.x; o < W; o += blockDim.x) seg[o] = direct_base[o * L];
    __syncthreads();
    for (int x = threadIdx.x; x < E; x += blockDim.x) {
      int32_t before = 0;
      for (int s = 0; s < me; ++s) before += C[s * (E + 1) + x];
      direct_base[x] += before - seg[x / L];
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

// ------------------------------------------------------- row logic of both dispatch/combine paths

// The launch arguments dedup_chain reads: scatter_slots builds one from its own, the pipelined
// dispatch passes its DispatchStreamArgs (same field names) instead.
struct DedupArgs {
  const int32_t* land_index;
  int top_k;
  bool dedup;
};

// The dedup chain of slot i (routed to `owner`, landing row `land` there), as scatter_slots and
// the pipelined dispatch (send_slot, keep_slot) store it in the trailer: `payload_row` is the
// landing row of the token's first slot (lowest k) on `owner`, which carries the payload (`land`
// itself when slot i is that slot), `next_row` the landing row of the token's next slot (higher
// k) there, or -1: the chain the owner's partial sums walk (owner_reduce). Without `a.dedup`:
// land and -1. Warp-uniform when i is: the token's other slots are scanned in slot order.
// `Args`: DedupArgs or DispatchStreamArgs, read in place (with the fields copied out into
// arguments, the pipelined dispatch compiled to different, longer SASS).
template <typename IdT, typename Args>
__device__ __forceinline__ void dedup_chain(const Layout& g, const Args& a, const IdT* ids,
                                            int64_t i, int owner, int32_t land,
                                            int32_t& payload_row, int32_t& next_row) {
  const int64_t token = i / a.top_k;
  payload_row = land;  // the landing row that holds this slot's payload
  next_row = -1;       // the landing row of the token's next slot there
  if (a.dedup) {
    for (int64_t j = token * a.top_k; j < i; ++j) {
      if (static_cast<int>(static_cast<int64_t>(ids[j]) / g.local_experts) == owner) {
        payload_row = a.land_index[j];
        break;
      }
    }
    for (int64_t j = i + 1; j < (token + 1) * a.top_k; ++j) {
      if (static_cast<int>(static_cast<int64_t>(ids[j]) / g.local_experts) == owner) {
        next_row = a.land_index[j];
        break;
      }
    }
  }
}

// The per-row routing an owner's dispatch handle keeps, by contract row: the outputs of unpack
// and of the pipelined dispatch. phase_R: pipelined only. chain_R, head_R, row_of_land: optional
// (dedup; all three or none).
struct RowRouting {
  float* gates_R;
  int32_t* src_rank_R;
  int32_t* ret_index_R;
  int32_t* land_row_R;
  int32_t* phase_R;
  int32_t* chain_R;
  int32_t* head_R;
  int32_t* row_of_land;
};

// Records contract row r's routing (one lane; unpack, and the pipelined dispatch's receive_row
// and keep_slot): its gate, source rank, index in the source's send order and landing row; with
// kPhase its token phase; with chain_R its next landing row in the token's chain, whether it
// heads the chain on this owner, and r as the contract row of its landing row, in this order.
// The fields a caller computes from memory come as callables (`ret_index()`, `phase()`,
// `next_row()`, `head()`), called where the field is stored, so each caller loads and stores in
// the same order as it did with the stores written out (the trailer fields of the chain are read
// only with chain_R). With kPhase false `phase` is never called (pass nullptr).
template <bool kPhase, typename RetIndex, typename Phase, typename NextRow, typename Head>
__device__ __forceinline__ void record_routing(const RowRouting& o, int64_t r, float gate,
                                               int32_t src_rank, int32_t land,
                                               RetIndex ret_index, Phase phase,
                                               NextRow next_row, Head head) {
  o.gates_R[r] = gate;
  o.src_rank_R[r] = src_rank;
  o.ret_index_R[r] = ret_index();
  o.land_row_R[r] = land;
  if constexpr (kPhase) o.phase_R[r] = phase();
  if (o.chain_R != nullptr) {  // dedup: the owner's partial sums (owner_reduce)
    o.chain_R[r] = next_row();
    o.head_R[r] = head();
    o.row_of_land[land] = static_cast<int32_t>(r);
  }
}

// Source side of a combine, one thread: kVec columns from `col` of token t's output,
// out[t] = sum_k gate[t, k] * ret[send_pos[t, k]] in float32, slot order, every product and sum
// rounded on its own (__fmul_rn / __fadd_rn: never an FMA; contract rule 2), rounded to T;
// without gates the plain sum (rule 3). reduce_slots and the pipelined combine's reducers both
// sum with this, so their results are bitwise the same. kHeadN: with `head_N` (owner_reduce
// returned the rows) only the slots flagged there are summed, each owner's partial sum in the
// order of the token's first slots on the owners; without kHeadN (the pipelined combine, which
// has no head_N) every slot is, head_N is not read and k == 0 marks the first slot, as that
// kernel had it (a `first` flag there compiled differently). `ret` rows are ret_stride bytes
// apart; the launchers pick kVec > 1 only where every access is 16-byte aligned.
template <typename T, int kVec, bool kHeadN>
__device__ __forceinline__ void sum_token_slots(const char* ret, int64_t ret_stride, int top_k,
                                                int64_t hidden, const int32_t* send_pos,
                                                const float* gates, const int32_t* head_N,
                                                int64_t t, int64_t col, T* out) {
  float acc[kVec] = {};  // stays zero only if no slot is flagged (a failed plan's head_N)
  bool first = true;     // kHeadN: no slot summed yet; otherwise k == 0
  for (int k = 0; k < top_k; ++k) {
    if constexpr (kHeadN) {
      if (head_N != nullptr && head_N[t * top_k + k] == 0) continue;
    }
    const int64_t pos = send_pos[t * top_k + k];
    const auto* row = reinterpret_cast<const T*>(ret + pos * ret_stride) + col;
    const Pack<T, kVec> v = *reinterpret_cast<const Pack<T, kVec>*>(row);
    const float gate = gates != nullptr ? gates[t * top_k + k] : 1.0f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float y = to_f32(v.v[j]);
      const float term = gates != nullptr ? __fmul_rn(gate, y) : y;
      acc[j] = (kHeadN ? first : k == 0) ? term : __fadd_rn(acc[j], term);
    }
    first = false;
  }
  Pack<T, kVec> o;
#pragma unroll
  for (int j = 0; j < kVec; ++j) o.v[j] = from_f32<T>(acc[j]);
  *reinterpret_cast<Pack<T, kVec>*>(out + t * hidden + col) = o;
}

}  // namespace
}  // namespace nmoe::comm
