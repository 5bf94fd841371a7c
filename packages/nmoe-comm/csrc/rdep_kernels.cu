// RDEP kernels: route/plan, scatter to owners, unpack to contract order, return to sources,
// slot reduction, the combine backward at the owner, and the GPU-side barrier. See rdep.h for
// the buffer layout and the orders; nmoe_comm/rdep.py for the algorithm they implement.
//
// Memory ordering across GPUs: a writer stores its rows (to peer memory mapped over NVLink, or
// locally), every writing thread executes __threadfence_system(), the block synchronises, and
// one thread per peer publishes the barrier epoch with st.release.sys; a reader spins with
// ld.acquire.sys until every peer's epoch arrived, and reads the rows in a later kernel.
// Arithmetic that the contract fixes (slot sums, gate products) uses __fmul_rn / __fadd_rn so
// that nvcc never fuses it into an FMA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "rdep.h"
#include "rdep_device.cuh"
#include "row_types.cuh"

namespace nmoe::comm {
namespace {

// ------------------------------------------------------------------------------- route / plan

// Slot groups (32 slots, one per lane) whose ids a routing warp loads before processing them: a
// routing block is bound by the latency of its loads, not by their bytes.
constexpr int kRouteBatch = 8;
// Slots per routing block: one block took ~2.6 ns per slot (95 us for 32768 slots on an H200),
// so larger dispatches spread the slots over more blocks, each a few passes of 32 warps.
constexpr int64_t kRouteSlotsPerBlock = 2048;

// Expert ids of the slots base + u * 32 + lane, u < kRouteBatch, all loaded first: e[u] is the id,
// or -1 for a slot at or past `end` or an id outside [0, E) (which sets `bad`).
template <typename IdT>
__device__ __forceinline__ void load_route_batch(const IdT* __restrict__ ids, int64_t base,
                                                 int64_t end, int num_experts, int lane,
                                                 int (&e)[kRouteBatch], bool& bad) {
  int64_t raw[kRouteBatch];
#pragma unroll
  for (int u = 0; u < kRouteBatch; ++u) {
    const int64_t i = base + u * kWarp + lane;
    raw[u] = i < end ? static_cast<int64_t>(ids[i]) : 0;
  }
#pragma unroll
  for (int u = 0; u < kRouteBatch; ++u) {
    const int64_t i = base + u * kWarp + lane;
    e[u] = -1;
    if (i < end) {
      if (raw[u] >= 0 && raw[u] < num_experts) {
        e[u] = static_cast<int>(raw[u]);
      } else {
        bad = true;
      }
    }
  }
}

// All blocks of a grid wait here until every block has arrived (the blocks are resident at once:
// the launcher keeps the grid within one block per SM). A generation count in the rank's counter
// region makes it reusable across launches without a reset; one block passes straight through.
__device__ void grid_sync(const Layout& g) {
  __syncthreads();
  if (gridDim.x > 1 && threadIdx.x == 0) {
    auto* arrived = reinterpret_cast<unsigned int*>(g.local_base + g.counter_off) +
                    kCounterRouteArrive;
    auto* generation = reinterpret_cast<volatile unsigned int*>(g.local_base + g.counter_off) +
                       kCounterRouteGeneration;
    const unsigned int mine = *generation;  // read before arriving: it moves only after
    __threadfence();
    if (atomicAdd(arrived, 1u) == gridDim.x - 1) {
      atomicExch(arrived, 0u);
      __threadfence();
      atomicAdd(const_cast<unsigned int*>(generation), 1u);
    } else {
      while (*generation == mine) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// Source side of a dispatch: blocks of 1024 threads (one, or a few per SM count, all resident);
// the slots are split into contiguous ranges, one per warp, in block order.
//   kRoute:    count this rank's slots per expert and give each slot its send position
//              (stable: (token, slot) order inside an expert), with warp-private histograms,
//              their prefix sums over the block's warps, and each block's counts to `scratch`
//              [gridDim.x][E + 1] (column E: bad ids seen), summed over the blocks before it
//              after a grid barrier.
//   kExchange: block 0 stores this rank's count row into row `rank` of every peer's count
//              matrix, then barriers with the peers (CUDA IPC). Without it block 0 writes the
//              row to counts_src for an NVSHMEM fcollect.
//   kPlan:     from the full count matrix (after a second grid barrier when the exchange ran in
//              this launch): status (bad ids, capacity...), counts_E of this rank (block 0), and
//              each slot's landing index on its owner (grid-stride).
// `scratch` is land_index itself: the plan overwrites it only after every block has read it.
template <typename IdT>
__global__ void __launch_bounds__(kRouteThreads)
    route_plan_kernel(Layout g, const IdT* __restrict__ ids, int64_t num_slots, int route_warps,
                      int32_t local_flags, int32_t* __restrict__ send_pos,
                      int32_t* __restrict__ land_index, int32_t* __restrict__ slot_of_send,
                      int64_t* __restrict__ counts_E,
                      int64_t* __restrict__ info, int flags, unsigned long long sync_peers) {
  extern __shared__ int32_t smem[];
  __shared__ int32_t any_bad_id;
  __shared__ int64_t owner_rows[kMaxRanks];
  __shared__ int32_t land_off[kMaxRanks];
  __shared__ int64_t status;
  const int E = g.num_experts, W = g.world, L = g.local_experts, me = g.rank;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  int32_t* hist = smem;                     // [route_warps][E]
  int32_t* start = hist + route_warps * E;  // [E]: counts, then their exclusive prefix sums
  int32_t* before = start + E;              // [E]: this expert's slots in the blocks before
  int32_t* C = before + E;                  // [W][E + 1]
  int32_t* scratch = land_index;            // [gridDim.x][E + 1], see above
  const int64_t route_warps_all = static_cast<int64_t>(gridDim.x) * route_warps;
  const int64_t chunk = (num_slots + route_warps_all - 1) / route_warps_all;
  const int64_t begin =
      min(num_slots, (static_cast<int64_t>(blockIdx.x) * route_warps + warp) * chunk);
  const int64_t end = min(num_slots, begin + chunk);

  if (flags & kRoute) {
    for (int i = threadIdx.x; i < route_warps * E; i += blockDim.x) hist[i] = 0;
    if (threadIdx.x == 0) any_bad_id = 0;
    __syncthreads();
    if (warp < route_warps) {
      int32_t* h = hist + warp * E;
      bool bad = false;
      // Groups of 32 slots in order base, base + 32, ...; a group past `end` is all -1.
      for (int64_t base = begin; base < end; base += kWarp * kRouteBatch) {
        int e[kRouteBatch];
        load_route_batch(ids, base, end, E, lane, e, bad);
#pragma unroll
        for (int u = 0; u < kRouteBatch; ++u) {
          const unsigned peers = __match_any_sync(kFullMask, e[u]);
          if (e[u] >= 0 && lane == __ffs(peers) - 1) h[e[u]] += __popc(peers);
          __syncwarp();
        }
      }
      if (__any_sync(kFullMask, bad) && lane == 0) atomicOr(&any_bad_id, 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      int32_t running = 0;
      for (int w = 0; w < route_warps; ++w) {
        const int32_t c = hist[w * E + e];
        hist[w * E + e] = running;
        running += c;
      }
      start[e] = running;
    }
    __syncthreads();
    if (gridDim.x > 1) {  // every block's counts, then the sums over the blocks
      int32_t* row = scratch + static_cast<int64_t>(blockIdx.x) * (E + 1);
      for (int e = threadIdx.x; e <= E; e += blockDim.x) row[e] = e < E ? start[e] : any_bad_id;
      grid_sync(g);
      for (int e = threadIdx.x; e <= E; e += blockDim.x) {
        int32_t total = 0, below = 0;
        for (int b = 0; b < static_cast<int>(gridDim.x); ++b) {
          const int32_t c = static_cast<const volatile int32_t*>(scratch)[b * (E + 1) + e];
          total += c;
          if (b < static_cast<int>(blockIdx.x)) below += c;
        }
        if (e < E) {
          start[e] = total;
          before[e] = below;
        } else if (total != 0) {
          any_bad_id = 1;
        }
      }
    } else {
      for (int e = threadIdx.x; e < E; e += blockDim.x) before[e] = 0;
    }
    __syncthreads();
    const int32_t row_flags = local_flags | (any_bad_id ? kFlagBadId : 0);
    if (blockIdx.x == 0) {
      if (flags & kExchange) {
        for (int idx = threadIdx.x; idx < W * (E + 1); idx += blockDim.x) {
          const int p = idx / (E + 1), e = idx % (E + 1);
          auto* row = reinterpret_cast<int32_t*>(peer_base(g, p) + g.counts_off) +
                      static_cast<int64_t>(me) * (E + 1);
          row[e] = e < E ? start[e] : row_flags;
        }
        block_barrier(g, sync_peers);
      } else {
        auto* row = reinterpret_cast<int32_t*>(g.local_base + g.counts_src_off);
        for (int e = threadIdx.x; e <= E; e += blockDim.x) row[e] = e < E ? start[e] : row_flags;
      }
    }
    block_exclusive_scan(start, E);
    for (int e = threadIdx.x; e < E; e += blockDim.x) start[e] += before[e];
    __syncthreads();
    if (warp < route_warps) {
      int32_t* h = hist + warp * E;
      const unsigned lanes_below = (1u << lane) - 1u;
      bool bad_again = false;  // counted in the first pass
      for (int64_t base = begin; base < end; base += kWarp * kRouteBatch) {
        int e[kRouteBatch];
        load_route_batch(ids, base, end, E, lane, e, bad_again);
#pragma unroll
        for (int u = 0; u < kRouteBatch; ++u) {
          const int64_t i = base + u * kWarp + lane;
          const unsigned peers = __match_any_sync(kFullMask, e[u]);
          if (e[u] >= 0) {
            const int32_t pos = start[e[u]] + h[e[u]] + __popc(peers & lanes_below);
            send_pos[i] = pos;
            if (slot_of_send != nullptr) slot_of_send[pos] = static_cast<int32_t>(i);
          } else if (i < end) {
            send_pos[i] = -1;
          }
          __syncwarp();
          if (e[u] >= 0 && lane == __ffs(peers) - 1) h[e[u]] += __popc(peers);
          __syncwarp();
        }
      }
    }
    __syncthreads();
  }
  if (!(flags & kPlan)) return;
  // Block 0's exchange barrier and every block's send positions come before the plan.
  if (flags & kRoute) grid_sync(g);

  // The count matrix is complete: after the exchange barrier, or after the host's fcollect.
  const auto* counts = reinterpret_cast<const volatile int32_t*>(g.local_base + g.counts_off);
  for (int idx = threadIdx.x; idx < W * (E + 1); idx += blockDim.x) C[idx] = counts[idx];
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) start[e] = C[me * (E + 1) + e];
  __syncthreads();
  block_exclusive_scan(start, E);  // start[o * L]: first send position of owner o
  for (int o = warp; o < W; o += num_warps) {
    int64_t total = 0, before_me = 0;
    for (int idx = lane; idx < W * L; idx += kWarp) {
      const int s = idx / L;
      const int32_t c = C[s * (E + 1) + o * L + idx % L];
      total += c;
      if (s < me) before_me += c;
    }
    total = warp_sum(total);
    before_me = warp_sum(before_me);
    if (lane == 0) {
      owner_rows[o] = total;
      land_off[o] = static_cast<int32_t>(before_me);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t code = kOk, arg1 = 0, arg2 = 0;
    const int32_t checks[3] = {kFlagBadId, kFlagTooManySlots, kFlagRowTooWide};
    const int64_t codes[3] = {kBadExpertId, kTooManySlots, kRowTooWide};
    for (int c = 0; c < 3 && code == kOk; ++c) {
      for (int s = 0; s < W; ++s) {
        if (C[s * (E + 1) + E] & checks[c]) {
          code = codes[c];
          arg1 = s;
          break;
        }
      }
    }
    for (int o = 0; o < W && code == kOk; ++o) {
      if (owner_rows[o] > g.capacity) {
        code = kOverCapacity;
        arg1 = o;
        arg2 = owner_rows[o];
      }
    }
    if (blockIdx.x == 0) {
      info[0] = code;
      info[1] = arg1;
      info[2] = arg2;
      info[3] = code == kOk ? owner_rows[me] : 0;  // R; 0 when nothing moves (sync-free reads it)
    }
    status = code;
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < L; e += blockDim.x) {
      int64_t c = 0;
      for (int s = 0; s < W; ++s) c += C[s * (E + 1) + me * L + e];
      counts_E[e] = status == kOk ? c : 0;  // zeros when the plan failed: no row is moved
    }
  }
  if (status != kOk) return;
  // Each slot's landing row; the loads of kRouteBatch slots per thread are issued first.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       base < num_slots; base += stride * kRouteBatch) {
    int64_t id[kRouteBatch];
    int32_t pos[kRouteBatch];
#pragma unroll
    for (int u = 0; u < kRouteBatch; ++u) {
      const int64_t i = base + u * stride;
      id[u] = i < num_slots ? static_cast<int64_t>(ids[i]) : 0;
      pos[u] = i < num_slots ? send_pos[i] : 0;
    }
#pragma unroll
    for (int u = 0; u < kRouteBatch; ++u) {
      const int64_t i = base + u * stride;
      if (i < num_slots) {
        const int owner = static_cast<int>(id[u] / L);
        land_index[i] = land_off[owner] + (pos[u] - start[owner * L]);
      }
    }
  }
}

// --------------------------------------------------------------------------- moving the rows

// Each slot's row (payload 0, payload 1, gate trailer) to its owner's landing row, or to this
// rank's staging at its send position when the owner is not mapped. Skipped (barrier kept) when
// the plan failed.
//
// `dedup` (dispatch only, every owner mapped): a token's row travels once per owner, into the
// landing row of the token's first slot (lowest k) routed to that owner; every slot's trailer
// holds its gate and, at byte 4, that landing row (kTrailerRowOffset), where unpack reads the
// payload. The payload bytes of the other slots' landing rows are left untouched. At byte 8
// (kTrailerNextOffset) the trailer names the landing row of the token's next slot (higher k) on
// the same owner, or -1: the chain the owner's partial sums walk (owner_reduce). `head_N`
// (optional): 1 for each slot that is its token's first slot on its owner, else 0.
template <typename IdT>
__global__ void __launch_bounds__(kBlockThreads)
    scatter_slots_kernel(Layout g, const IdT* __restrict__ ids, int64_t num_slots, int top_k,
                         const int32_t* __restrict__ send_pos,
                         const int32_t* __restrict__ land_index, Payload p0, Payload p1,
                         int64_t p1_offset, const float* __restrict__ gates,
                         const int64_t* __restrict__ info, bool dedup,
                         int32_t* __restrict__ head_N, unsigned long long sync_peers) {
  const bool skip = info != nullptr && info[0] != kOk;
  const int lane = threadIdx.x % kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       !skip && i < num_slots; i += num_warps) {
    const int owner = static_cast<int>(static_cast<int64_t>(ids[i]) / g.local_experts);
    const int64_t token = i / top_k;
    char* peer = peer_base(g, owner);
    char* row = peer != nullptr
                    ? peer + g.recv_off + static_cast<int64_t>(land_index[i]) * g.recv_stride
                    : g.stage + static_cast<int64_t>(send_pos[i]) * g.recv_stride;
    int32_t payload_row, next_row;  // warp-uniform
    dedup_chain(g, DedupArgs{land_index, top_k, dedup}, ids, i, owner, land_index[i],
                payload_row, next_row);
    if (payload_row == land_index[i]) {
      warp_copy(row, p0.src + token * p0.stride, p0.bytes, lane);
      if (p1.bytes > 0) warp_copy(row + p1_offset, p1.src + token * p1.stride, p1.bytes, lane);
    }
    if (lane == 0) {
      char* trailer = row + g.recv_stride - kTrailerBytes;
      *reinterpret_cast<float*>(trailer) = gates[i];
      if (dedup) {
        *reinterpret_cast<int32_t*>(trailer + kTrailerRowOffset) = payload_row;
        *reinterpret_cast<int32_t*>(trailer + kTrailerNextOffset) = next_row;
      }
      if (head_N != nullptr) head_N[i] = payload_row == land_index[i] ? 1 : 0;
    }
  }
  finish_grid(g, kCounterScatter, sync_peers);
}

// Owner side of a dispatch: landing order -> contract order, with the per-row routing the
// handle keeps (source rank, index in the source's send order, landing row). With `dedup` the
// payload comes from the landing row named in the row's trailer (see scatter_slots_kernel);
// `chain_R` (optional, dedup only) then gets each row's next landing row in its token's chain,
// `head_R` whether the row is its token's first slot here, and `row_of_land` [R] the contract
// row of each landing row.
__global__ void __launch_bounds__(kBlockThreads)
    unpack_kernel(Layout g, int64_t max_rows, const int64_t* __restrict__ num_rows_dev,
                  bool dedup, char* __restrict__ out0, int64_t bytes0, char* __restrict__ out1,
                  int64_t bytes1, int64_t p1_offset, float* __restrict__ gates_R,
                  int32_t* __restrict__ src_rank_R, int32_t* __restrict__ ret_index_R,
                  int32_t* __restrict__ land_row_R, int32_t* __restrict__ chain_R,
                  int32_t* __restrict__ head_R, int32_t* __restrict__ row_of_land) {
  extern __shared__ int32_t smem[];
  const int W = g.world, L = g.local_experts;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  StreamTables t;
  t.build(g, smem);  // ends in __syncthreads
  const int32_t* contract_start = t.contract_start;
  const int32_t* land_start = t.land_start;
  const int32_t* land_base = t.land_base;
  const int32_t* send_off = t.send_off;
  const RowRouting routing{gates_R, src_rank_R, ret_index_R, land_row_R,
                           /*phase_R=*/nullptr, chain_R, head_R, row_of_land};
  const int64_t num_rows = rows_to_walk(max_rows, num_rows_dev);
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; r < num_rows;
       r += num_warps) {
    int lo = 0, hi = L * W - 1;  // the last block starting at or before r (the non-empty one)
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (contract_start[mid] <= r) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int e = lo / W, s = lo % W;
    const int32_t land = land_start[s * L + e] + static_cast<int32_t>(r - contract_start[lo]);
    const char* recv = g.local_base + g.recv_off;
    const char* src = recv + static_cast<int64_t>(land) * g.recv_stride;
    const char* trailer = src + g.recv_stride - kTrailerBytes;
    const char* payload =
        dedup ? recv + static_cast<int64_t>(*reinterpret_cast<const int32_t*>(
                           trailer + kTrailerRowOffset)) * g.recv_stride
              : src;
    warp_copy(out0 + r * bytes0, payload, bytes0, lane);
    if (bytes1 > 0) warp_copy(out1 + r * bytes1, payload + p1_offset, bytes1, lane);
    if (lane == 0) {
      record_routing<false>(
          routing, r, *reinterpret_cast<const float*>(trailer), s, land,
          [&] { return send_off[s] + (land - land_base[s]); }, nullptr,
          [&] { return *reinterpret_cast<const int32_t*>(trailer + kTrailerNextOffset); },
          [&] { return *reinterpret_cast<const int32_t*>(trailer + kTrailerRowOffset) == land; });
    }
  }
}

// Owner -> source: row r to its source's return buffer at its send position (or to staging at
// its landing row when the source is not mapped).
__global__ void __launch_bounds__(kBlockThreads)
    return_rows_kernel(Layout g, int64_t max_rows, const int64_t* __restrict__ num_rows_dev,
                       const char* __restrict__ rows, int64_t row_bytes,
                       const int32_t* __restrict__ src_rank_R,
                       const int32_t* __restrict__ ret_index_R,
                       const int32_t* __restrict__ land_row_R, unsigned long long sync_peers) {
  const int64_t num_rows = rows_to_walk(max_rows, num_rows_dev);
  const int lane = threadIdx.x % kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < num_rows; r += num_warps) {
    char* peer = peer_base(g, src_rank_R[r]);
    char* dst = peer != nullptr
                    ? peer + g.ret_off + static_cast<int64_t>(ret_index_R[r]) * g.ret_stride
                    : g.stage + static_cast<int64_t>(land_row_R[r]) * g.ret_stride;
    warp_copy(dst, rows + r * row_bytes, row_bytes, lane);
  }
  finish_grid(g, kCounterReturn, sync_peers);
}

// Owner -> source with partial sums (dedup dispatches, `reduce_on_owner`): for each row that is
// its token's first slot here (a head), the float32 sum over the token's slots here in slot
// order (the chain of landing rows from scatter_slots) of gate * y (or of y, without gates),
// every product and sum rounded on its own, rounded to T and stored at the head slot's send
// position in its source's return buffer. One warp per row; rows that are not heads return.
// Vector path: rows and hidden * sizeof(T) 16-byte aligned (the launcher checks).
template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    owner_reduce_kernel(Layout g, int64_t max_rows, const int64_t* __restrict__ num_rows_dev,
                        int64_t hidden, const T* __restrict__ rows,
                        const float* __restrict__ gates_R, const int32_t* __restrict__ src_rank_R,
                        const int32_t* __restrict__ ret_index_R,
                        const int32_t* __restrict__ chain_R, const int32_t* __restrict__ head_R,
                        const int32_t* __restrict__ row_of_land, int top_k,
                        unsigned long long sync_peers) {
  const int64_t num_rows = rows_to_walk(max_rows, num_rows_dev);
  const int lane = threadIdx.x % kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < num_rows; r += num_warps) {
    if (head_R[r] == 0) continue;
    T* dst = reinterpret_cast<T*>(peer_base(g, src_rank_R[r]) + g.ret_off +
                                  static_cast<int64_t>(ret_index_R[r]) * g.ret_stride);
    for (int64_t col = static_cast<int64_t>(lane) * kVec; col < hidden; col += kWarp * kVec) {
      float acc[kVec];
      int64_t row = r;
      // A chain has at most top_k rows (the bound only guards against a corrupted chain).
      for (int n = 0; n < top_k; ++n) {
        const bool first = n == 0;
        const Pack<T, kVec> v = *reinterpret_cast<const Pack<T, kVec>*>(rows + row * hidden + col);
        const float gate = gates_R != nullptr ? gates_R[row] : 1.0f;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float y = to_f32(v.v[j]);
          const float term = gates_R != nullptr ? __fmul_rn(gate, y) : y;
          acc[j] = first ? term : __fadd_rn(acc[j], term);
        }
        const int32_t next = chain_R[row];
        if (next < 0) break;
        row = row_of_land[next];
      }
      Pack<T, kVec> o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) o.v[j] = from_f32<T>(acc[j]);
      *reinterpret_cast<Pack<T, kVec>*>(dst + col) = o;
    }
  }
  finish_grid(g, kCounterReturn, sync_peers);
}

// Source: out[t] = sum_k gate[t, k] * ret[send_pos[t, k]] in float32, slot order, every product
// and sum rounded on its own (contract rule 2); without gates the plain sum (rule 3). With
// `head_N` (owner_reduce returned the rows) only the slots flagged there are summed: each
// owner's partial sum, in the order of the token's first slots on the owners.
template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_slots_kernel(const char* __restrict__ ret, int64_t ret_stride, int64_t num_tokens,
                        int top_k, int64_t hidden, const int32_t* __restrict__ send_pos,
                        const float* __restrict__ gates, const int32_t* __restrict__ head_N,
                        T* __restrict__ out) {
  const int64_t groups = hidden / kVec;
  const int64_t total = num_tokens * groups;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = item / groups, col = (item % groups) * kVec;
    sum_token_slots<T, kVec, true>(ret, ret_stride, top_k, hidden, send_pos, gates, head_N, t,
                                   col, out);
  }
}

// Owner side of combine_backward: landing row = dOut[t] of the row's slot plus its gate;
// grad_y[r] = gate * dOut (one float32 product), dot[r] = <dOut[t], y[r]> in float32, written to
// the source's dots buffer at the row's send position.
template <typename Ty, typename Tgo>
__global__ void __launch_bounds__(kBlockThreads)
    owner_grad_kernel(Layout g, int64_t max_rows, const int64_t* __restrict__ num_rows_dev,
                      int64_t hidden, const Ty* __restrict__ y,
                      const int32_t* __restrict__ src_rank_R,
                      const int32_t* __restrict__ ret_index_R,
                      const int32_t* __restrict__ land_row_R, Ty* __restrict__ grad_y,
                      unsigned long long sync_peers) {
  const int64_t num_rows = rows_to_walk(max_rows, num_rows_dev);
  const int lane = threadIdx.x % kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       r < num_rows; r += num_warps) {
    const int32_t land = land_row_R[r];
    const char* landed = g.local_base + g.recv_off + static_cast<int64_t>(land) * g.recv_stride;
    const auto* grad_out = reinterpret_cast<const Tgo*>(landed);
    const float gate = *reinterpret_cast<const float*>(landed + g.recv_stride - kTrailerBytes);
    float dot = 0.0f;
    for (int64_t d = lane; d < hidden; d += kWarp) {
      const float go = to_f32(grad_out[d]);
      grad_y[r * hidden + d] = from_f32<Ty>(__fmul_rn(gate, go));
      dot = fmaf(go, to_f32(y[r * hidden + d]), dot);
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      char* peer = peer_base(g, src_rank_R[r]);
      float* dst = peer != nullptr ? reinterpret_cast<float*>(peer + g.dots_off) + ret_index_R[r]
                                   : reinterpret_cast<float*>(g.stage) + land;
      *dst = dot;
    }
  }
  finish_grid(g, kCounterOwnerGrad, sync_peers);
}

__global__ void gather_dots_kernel(Layout g, int64_t num_slots,
                                   const int32_t* __restrict__ send_pos, float* __restrict__ out) {
  const auto* dots = reinterpret_cast<const float*>(g.local_base + g.dots_off);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_slots;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = dots[send_pos[i]];
  }
}

__global__ void barrier_kernel(Layout g, unsigned long long sync_peers) {
  block_barrier(g, sync_peers);
}

// ---------------------------------------------------------------------------------- launchers

int grid_for_rows(int64_t rows, int sm_count) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 4LL * sm_count)));
}

// Raises a kernel's dynamic shared memory limit when `bytes` needs it. The default limit is
// 48 KiB minus the kernel's static shared memory, so the static part counts too (route_plan has
// 12 KiB of it: comparing only the dynamic bytes against 48 KiB failed on 4 ranks x 256 experts).
// The limit is raised per device and only when a larger size comes, so launches skip the call.
template <auto kKernel>
void allow_smem(int64_t bytes, const char* op) {
  constexpr int kMaxDevices = 64;
  static int64_t static_bytes = -1;
  static int64_t raised[kMaxDevices] = {};
  if (static_bytes < 0) {
    cudaFuncAttributes attr{};
    NMOE_CUDA_CHECK(cudaFuncGetAttributes(&attr, kKernel), op);
    static_bytes = static_cast<int64_t>(attr.sharedSizeBytes);
  }
  if (bytes + static_bytes <= 48 * 1024) return;
  int device = 0;
  NMOE_CUDA_CHECK(cudaGetDevice(&device), op);
  if (device >= 0 && device < kMaxDevices && raised[device] >= bytes) return;
  NMOE_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)),
                  op);
  if (device >= 0 && device < kMaxDevices) raised[device] = bytes;
}

int64_t p1_offset(const Payload& p0) { return (p0.bytes + 15) / 16 * 16; }

}  // namespace

int route_plan_warps(int num_experts, int world, int64_t* smem_bytes) {
  const int64_t fixed = (2LL * num_experts +
                         static_cast<int64_t>(world) * (num_experts + 1)) * 4;
  const int64_t per_warp = static_cast<int64_t>(num_experts) * 4;
  const int64_t warps = std::min<int64_t>(kRouteThreads / kWarp,
                                          (kRouteSmemBudget - fixed) / per_warp);
  if (warps < 1 || world > kMaxRanks) {
    throw std::runtime_error(
        "nmoe_comm: " + std::to_string(num_experts) + " experts over " + std::to_string(world) +
        " ranks do not fit the routing kernel's shared memory (at most about 4600 experts for 8 "
        "ranks, and at most " + std::to_string(kMaxRanks) + " ranks)");
  }
  *smem_bytes = fixed + warps * per_warp;
  return static_cast<int>(warps);
}

// Blocks of the routing kernel: one per kRouteSlotsPerBlock slots, at most one per SM (they
// meet at grid barriers) and at most what land_index holds as per-block count rows.
int route_plan_blocks(int64_t num_slots, int num_experts, int sm_count) {
  const int64_t wanted = (num_slots + kRouteSlotsPerBlock - 1) / kRouteSlotsPerBlock;
  const int64_t fits = num_slots / (num_experts + 1);
  return static_cast<int>(std::max<int64_t>(1, std::min({wanted, fits,
                                                         static_cast<int64_t>(sm_count)})));
}

void launch_route_plan(const Layout& g, const void* ids, bool ids_int64, int64_t num_slots,
                       int32_t local_flags, int32_t* send_pos, int32_t* land_index,
                       int32_t* slot_of_send, int64_t* counts_E, int64_t* info, int flags,
                       unsigned long long sync_peers, int sm_count, cudaStream_t stream) {
  int64_t smem = 0;
  const int warps = route_plan_warps(g.num_experts, g.world, &smem);
  const int blocks = route_plan_blocks(num_slots, g.num_experts, sm_count);
  if (ids_int64) {
    allow_smem<route_plan_kernel<int64_t>>(smem, "route_plan");
    route_plan_kernel<int64_t><<<blocks, kRouteThreads, smem, stream>>>(
        g, static_cast<const int64_t*>(ids), num_slots, warps, local_flags, send_pos, land_index,
        slot_of_send, counts_E, info, flags, sync_peers);
  } else {
    allow_smem<route_plan_kernel<int32_t>>(smem, "route_plan");
    route_plan_kernel<int32_t><<<blocks, kRouteThreads, smem, stream>>>(
        g, static_cast<const int32_t*>(ids), num_slots, warps, local_flags, send_pos, land_index,
        slot_of_send, counts_E, info, flags, sync_peers);
  }
  NMOE_CUDA_CHECK_LAUNCH("route_plan");
}

void launch_scatter_slots(const Layout& g, const void* ids, bool ids_int64, int64_t num_slots,
                          int top_k, const int32_t* send_pos, const int32_t* land_index,
                          Payload p0, Payload p1, const float* gates, const int64_t* info,
                          bool dedup, int32_t* head_N, unsigned long long sync_peers,
                          int sm_count, cudaStream_t stream) {
  const int grid = grid_for_rows(num_slots, sm_count);
  if (ids_int64) {
    scatter_slots_kernel<int64_t><<<grid, kBlockThreads, 0, stream>>>(
        g, static_cast<const int64_t*>(ids), num_slots, top_k, send_pos, land_index, p0, p1,
        p1_offset(p0), gates, info, dedup, head_N, sync_peers);
  } else {
    scatter_slots_kernel<int32_t><<<grid, kBlockThreads, 0, stream>>>(
        g, static_cast<const int32_t*>(ids), num_slots, top_k, send_pos, land_index, p0, p1,
        p1_offset(p0), gates, info, dedup, head_N, sync_peers);
  }
  NMOE_CUDA_CHECK_LAUNCH("scatter_slots");
}

void launch_unpack(const Layout& g, int64_t num_rows, const int64_t* num_rows_dev, bool dedup,
                   char* out0, int64_t bytes0, char* out1, int64_t bytes1, float* gates_R,
                   int32_t* src_rank_R, int32_t* ret_index_R, int32_t* land_row_R,
                   int32_t* chain_R, int32_t* head_R, int32_t* row_of_land, int sm_count,
                   cudaStream_t stream) {
  if (num_rows == 0) return;
  if (chain_R != nullptr && (!dedup || head_R == nullptr || row_of_land == nullptr)) {
    throw std::invalid_argument(
        "nmoe_comm unpack: chain_R needs dedup and both head_R and row_of_land");
  }
  const int64_t smem = StreamTables::smem_words(g.num_experts, g.world) * 4;
  allow_smem<unpack_kernel>(smem, "unpack");
  const Payload p0{nullptr, 0, bytes0};
  unpack_kernel<<<grid_for_rows(num_rows, sm_count), kBlockThreads, smem, stream>>>(
      g, num_rows, num_rows_dev, dedup, out0, bytes0, out1, bytes1, p1_offset(p0), gates_R,
      src_rank_R, ret_index_R, land_row_R, chain_R, head_R, row_of_land);
  NMOE_CUDA_CHECK_LAUNCH("unpack");
}

void launch_return_rows(const Layout& g, int64_t num_rows, const int64_t* num_rows_dev,
                        const char* rows, int64_t row_bytes, const int32_t* src_rank_R,
                        const int32_t* ret_index_R, const int32_t* land_row_R,
                        unsigned long long sync_peers, int sm_count, cudaStream_t stream) {
  return_rows_kernel<<<grid_for_rows(num_rows, sm_count), kBlockThreads, 0, stream>>>(
      g, num_rows, num_rows_dev, rows, row_bytes, src_rank_R, ret_index_R, land_row_R, sync_peers);
  NMOE_CUDA_CHECK_LAUNCH("return_rows");
}

template <typename T>
void owner_reduce_typed(const Layout& g, int64_t num_rows, const int64_t* num_rows_dev,
                        int64_t hidden, const void* rows, const float* gates_R,
                        const int32_t* src_rank_R, const int32_t* ret_index_R,
                        const int32_t* chain_R, const int32_t* head_R,
                        const int32_t* row_of_land, int top_k, unsigned long long sync_peers,
                        int sm_count, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vector = (hidden * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(rows) % 16 == 0;
  const int grid = grid_for_rows(num_rows, sm_count);
  const T* y = static_cast<const T*>(rows);
  if (vector) {
    owner_reduce_kernel<T, kVec><<<grid, kBlockThreads, 0, stream>>>(
        g, num_rows, num_rows_dev, hidden, y, gates_R, src_rank_R, ret_index_R, chain_R, head_R,
        row_of_land, top_k, sync_peers);
  } else {
    owner_reduce_kernel<T, 1><<<grid, kBlockThreads, 0, stream>>>(
        g, num_rows, num_rows_dev, hidden, y, gates_R, src_rank_R, ret_index_R, chain_R, head_R,
        row_of_land, top_k, sync_peers);
  }
  NMOE_CUDA_CHECK_LAUNCH("owner_reduce");
}

template <typename T>
void reduce_slots_typed(const Layout& g, int64_t num_tokens, int top_k, int64_t hidden,
                        const int32_t* send_pos, const float* gates, const int32_t* head_N,
                        void* out, int sm_count, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vector = (hidden * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const int64_t items = num_tokens * (vector ? hidden / kVec : hidden);
  if (items == 0) return;
  const int grid = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((items + kBlockThreads - 1) / kBlockThreads, 8LL * sm_count)));
  const char* ret = g.local_base + g.ret_off;
  if (vector) {
    reduce_slots_kernel<T, kVec><<<grid, kBlockThreads, 0, stream>>>(
        ret, g.ret_stride, num_tokens, top_k, hidden, send_pos, gates, head_N,
        static_cast<T*>(out));
  } else {
    reduce_slots_kernel<T, 1><<<grid, kBlockThreads, 0, stream>>>(
        ret, g.ret_stride, num_tokens, top_k, hidden, send_pos, gates, head_N,
        static_cast<T*>(out));
  }
  NMOE_CUDA_CHECK_LAUNCH("reduce_slots");
}

void launch_owner_reduce(const Layout& g, RowDtype dtype, int64_t num_rows,
                         const int64_t* num_rows_dev, int64_t hidden, const void* rows,
                         const float* gates_R, const int32_t* src_rank_R,
                         const int32_t* ret_index_R, const int32_t* chain_R,
                         const int32_t* head_R, const int32_t* row_of_land, int top_k,
                         unsigned long long sync_peers, int sm_count, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return owner_reduce_typed<float>(g, num_rows, num_rows_dev, hidden, rows, gates_R,
                                       src_rank_R, ret_index_R, chain_R, head_R, row_of_land,
                                       top_k, sync_peers, sm_count, stream);
    case kBF16:
      return owner_reduce_typed<__nv_bfloat16>(g, num_rows, num_rows_dev, hidden, rows, gates_R,
                                               src_rank_R, ret_index_R, chain_R, head_R,
                                               row_of_land, top_k, sync_peers, sm_count, stream);
    case kF16:
      return owner_reduce_typed<__half>(g, num_rows, num_rows_dev, hidden, rows, gates_R,
                                        src_rank_R, ret_index_R, chain_R, head_R, row_of_land,
                                        top_k, sync_peers, sm_count, stream);
  }
}

void launch_reduce_slots(const Layout& g, RowDtype dtype, int64_t num_tokens, int top_k,
                         int64_t hidden, const int32_t* send_pos, const float* gates,
                         const int32_t* head_N, void* out, int sm_count, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return reduce_slots_typed<float>(g, num_tokens, top_k, hidden, send_pos, gates, head_N,
                                       out, sm_count, stream);
    case kBF16:
      return reduce_slots_typed<__nv_bfloat16>(g, num_tokens, top_k, hidden, send_pos, gates,
                                               head_N, out, sm_count, stream);
    case kF16:
      return reduce_slots_typed<__half>(g, num_tokens, top_k, hidden, send_pos, gates, head_N,
                                        out, sm_count, stream);
  }
}

// The owner_grad launch arguments that do not depend on the dtypes.
struct OwnerGradArgs {
  int64_t num_rows;
  const int64_t* num_rows_dev;
  int64_t hidden;
  const void* y;
  const int32_t* src_rank_R;
  const int32_t* ret_index_R;
  const int32_t* land_row_R;
  void* grad_y;
  unsigned long long sync_peers;
};

template <typename Ty, typename Tgo>
void owner_grad_typed(const Layout& g, const OwnerGradArgs& a, int sm_count,
                      cudaStream_t stream) {
  owner_grad_kernel<Ty, Tgo><<<grid_for_rows(a.num_rows, sm_count), kBlockThreads, 0, stream>>>(
      g, a.num_rows, a.num_rows_dev, a.hidden, static_cast<const Ty*>(a.y), a.src_rank_R,
      a.ret_index_R, a.land_row_R, static_cast<Ty*>(a.grad_y), a.sync_peers);
  NMOE_CUDA_CHECK_LAUNCH("owner_grad");
}

template <typename Ty>
void owner_grad_go(const Layout& g, RowDtype go_dtype, const OwnerGradArgs& a, int sm_count,
                   cudaStream_t stream) {
  switch (go_dtype) {
    case kF32:
      return owner_grad_typed<Ty, float>(g, a, sm_count, stream);
    case kBF16:
      return owner_grad_typed<Ty, __nv_bfloat16>(g, a, sm_count, stream);
    case kF16:
      return owner_grad_typed<Ty, __half>(g, a, sm_count, stream);
  }
}

void launch_owner_grad(const Layout& g, RowDtype y_dtype, RowDtype go_dtype, int64_t num_rows,
                       const int64_t* num_rows_dev, int64_t hidden, const void* y,
                       const int32_t* src_rank_R, const int32_t* ret_index_R,
                       const int32_t* land_row_R, void* grad_y, unsigned long long sync_peers,
                       int sm_count, cudaStream_t stream) {
  const OwnerGradArgs a{num_rows,    num_rows_dev, hidden, y,    src_rank_R,
                        ret_index_R, land_row_R,   grad_y, sync_peers};
  switch (y_dtype) {
    case kF32:
      return owner_grad_go<float>(g, go_dtype, a, sm_count, stream);
    case kBF16:
      return owner_grad_go<__nv_bfloat16>(g, go_dtype, a, sm_count, stream);
    case kF16:
      return owner_grad_go<__half>(g, go_dtype, a, sm_count, stream);
  }
}

void launch_gather_dots(const Layout& g, int64_t num_slots, const int32_t* send_pos, float* out,
                        cudaStream_t stream) {
  if (num_slots == 0) return;
  const int grid = static_cast<int>(std::min<int64_t>((num_slots + 255) / 256, 1024));
  gather_dots_kernel<<<grid, 256, 0, stream>>>(g, num_slots, send_pos, out);
  NMOE_CUDA_CHECK_LAUNCH("gather_dots");
}

void launch_barrier(const Layout& g, unsigned long long sync_peers, cudaStream_t stream) {
  barrier_kernel<<<1, kWarp, 0, stream>>>(g, sync_peers);
  NMOE_CUDA_CHECK_LAUNCH("barrier");
}

}  // namespace nmoe::comm
