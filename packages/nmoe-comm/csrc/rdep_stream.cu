// Pipelined RDEP transport: a dispatch and a combine that each run as ONE kernel in which the
// local copy overlaps the transfers over NVLink (every peer mapped: `ipc`, `nvshmem` in a node).
// The unpipelined kernels (rdep_kernels.cu) run scatter_slots -> barrier -> unpack and
// return_rows -> barrier -> reduce_slots; there the unpack and the slot sums start only when the
// last row has crossed. Here:
//
// dispatch_stream  sender blocks walk this rank's send order (slot_of_send) in chunks of
//                  chunk_rows consecutive send positions of one owner (the chunk lands on
//                  consecutive landing rows), store each row and its trailer, then publish the
//                  chunk: every thread fences (system scope), the block synchronises, and one
//                  thread stores the stream epoch into the owner's flag [source][chunk] with
//                  st.release.sys. Receiver blocks claim (source, chunk) items, wait with
//                  ld.acquire.sys for the flag and copy the chunk's rows from landing order to
//                  contract order (the outputs of unpack). Sender blocks turn into receivers when
//                  they are done. The count matrix (route_plan) tells each receiver exactly which
//                  chunks come, so no barrier closes the kernel. With `direct` (a zero-copy
//                  dispatcher, one row per slot) the senders store each payload straight at its
//                  contract row in the owner's zero-copy outputs, and the receivers only record
//                  the routing from the trailers: no row is copied twice.
// combine_stream   sender blocks return the owner's rows phase by phase (the token phase of each
//                  row, recorded by the dispatch); the last sender block to finish a phase
//                  publishes it on every source. Reducer blocks claim (phase, token group) items
//                  in phase order, wait until every owner has published the phase, and sum the
//                  group's tokens exactly as reduce_slots does (same order, same rounding).
//
// Epochs: every pipelined kernel of a rank takes the next value of the rank's stream epoch (a
// counter in its own buffer, advanced by the kernel's last block, so CUDA graphs replay with
// fresh epochs); all ranks run the same sequence of calls, so their n-th pipelined kernels share
// epoch n, and a flag is current when it holds at least the kernel's epoch.
//
// Residency: receivers only ever wait for senders and senders never wait, and the launchers
// size the grid so that all blocks are resident at once, senders first.
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

// Blocks per SM the pipelined kernels are compiled for: the dispatch at 128 registers per
// thread (fewer spill: it inlines two copy paths of five widths each), the combine at 64.
constexpr int kDispatchMinBlocks = 2;
constexpr int kCombineMinBlocks = 4;
// A dispatch chunk is whole rows per warp of a sender block, one lane per row of a warp.
static_assert(kStreamFlagRows % kWarpsPerBlock == 0 &&
                  kStreamChunkRowsMax / kWarpsPerBlock <= kWarp,
              "chunk_rows must give each sender warp whole rows, at most one per lane");

__device__ __forceinline__ unsigned long long* stream_epoch_word(const Layout& g) {
  return reinterpret_cast<unsigned long long*>(g.local_base + g.counter_off) + kStreamEpochWord;
}

__device__ __forceinline__ unsigned int* counter_word(const Layout& g, int slot) {
  return reinterpret_cast<unsigned int*>(g.local_base + g.counter_off) + slot;
}

// Spins (one thread) until *flag >= epoch; traps after the layout's timeout with a message.
__device__ void wait_flag(const Layout& g, const unsigned long long* flag,
                          unsigned long long epoch, const char* what, int peer) {
  const unsigned long long start = global_timer();
  while (load_acquire_sys(flag) < epoch) {
    if (global_timer() - start > g.timeout_ns) {
      printf("nmoe_comm: rank %d waited %.0f s for %s from rank %d (stream epoch %llu), which "
             "is behind or gone; every rank must call every dispatcher method in the same "
             "order with the same options\n",
             g.rank, g.timeout_ns * 1e-9, what, peer, epoch);
      __trap();
    }
  }
}

// Ends a pipelined kernel: the last block to finish advances the stream epoch and resets the
// claim counter for the next launch.
__device__ void finish_stream(const Layout& g, int done_slot, int claim_slot,
                              unsigned long long epoch) {
  if (last_block_done(g, done_slot) && threadIdx.x == 0) {
    *stream_epoch_word(g) = epoch;
    atomicExch(counter_word(g, claim_slot), 0u);
  }
}

// Claims the next work item for the whole block (one atomic, broadcast through shared memory).
__device__ int64_t claim_item(const Layout& g, int claim_slot) {
  __shared__ int64_t item;
  if (threadIdx.x == 0) item = atomicAdd(counter_word(g, claim_slot), 1u);
  __syncthreads();
  const int64_t mine = item;
  __syncthreads();
  return mine;
}

__device__ __forceinline__ unsigned long long* dispatch_flag(char* base, const Layout& g,
                                                             int source, int64_t chunk) {
  return reinterpret_cast<unsigned long long*>(base + g.dflags_off) + source * g.dflag_chunks +
         chunk;
}

__device__ __forceinline__ unsigned long long* combine_flag(char* base, const Layout& g,
                                                            int owner, int phase) {
  return reinterpret_cast<unsigned long long*>(base + g.cflags_off) + owner * kStreamPhasesMax +
         phase;
}

// ------------------------------------------------------------------------------------ dispatch

// The routing outputs of a pipelined dispatch (record_routing writes them).
__device__ __forceinline__ RowRouting routing_of(const DispatchStreamArgs& a) {
  return RowRouting{a.gates_R, a.src_rank_R, a.ret_index_R, a.land_row_R,
                    a.phase_R, a.chain_R,    a.head_R,      a.row_of_land};
}

// One slot's row to its owner's landing row, as scatter_slots_kernel stores it (dedup included,
// the same dedup_chain), plus the slot's token phase in the trailer. One warp. With a.direct the
// payload goes straight to the owner's zero-copy outputs at `contract_row` (the trailer still to
// the landing row, where the owner's receivers read it).
template <typename IdT>
__device__ void send_slot(const Layout& g, const DispatchStreamArgs& a, const IdT* ids,
                          int64_t p1_offset, int64_t i, int32_t land, int64_t contract_row,
                          int owner, char* peer, int lane) {
  const int64_t token = i / a.top_k;
  char* row = peer + g.recv_off + static_cast<int64_t>(land) * g.recv_stride;
  int32_t payload_row, next_row;
  dedup_chain(g, a, ids, i, owner, land, payload_row, next_row);
  if (payload_row == land) {
    char* dst0 = row;
    char* dst1 = row + p1_offset;
    if (a.direct) {
      char* view = peer + g.view_off;
      dst0 = view + contract_row * a.p0.bytes;
      dst1 = view + view_p1_off(g, a.p0.bytes) + contract_row * a.p1.bytes;
    }
    warp_copy(dst0, a.p0.src + token * a.p0.stride, a.p0.bytes, lane);
    if (a.p1.bytes > 0) warp_copy(dst1, a.p1.src + token * a.p1.stride, a.p1.bytes, lane);
  }
  if (lane == 0) {
    char* trailer = row + g.recv_stride - kTrailerBytes;
    *reinterpret_cast<float*>(trailer) = a.gates[i];
    if (a.dedup) {
      *reinterpret_cast<int32_t*>(trailer + kTrailerRowOffset) = payload_row;
      *reinterpret_cast<int32_t*>(trailer + kTrailerNextOffset) = next_row;
    }
    *reinterpret_cast<int32_t*>(trailer + kTrailerPhaseOffset) =
        static_cast<int32_t>(token * a.phases / a.num_tokens);
    if (a.head_N != nullptr) a.head_N[i] = payload_row == land ? 1 : 0;
  }
}

// A slot this rank owns itself, at send position `pos`: straight to its contract row with the
// routing unpack would record (no landing row, no flag; the receivers skip this rank's rows).
template <typename IdT>
__device__ void keep_slot(const Layout& g, const DispatchStreamArgs& a, const StreamTables& t,
                          const IdT* ids, int64_t i, int32_t land, int64_t pos, int lane) {
  const int L = g.local_experts, W = g.world, me = g.rank;
  const int64_t token = i / a.top_k;
  const int e = static_cast<int>(static_cast<int64_t>(ids[i]) - static_cast<int64_t>(me) * L);
  const int64_t r = t.contract_start[e * W + me] + (land - t.land_start[me * L + e]);
  int32_t payload_row, next_row;
  dedup_chain(g, a, ids, i, me, land, payload_row, next_row);
  warp_copy(a.out0 + r * a.p0.bytes, a.p0.src + token * a.p0.stride, a.p0.bytes, lane);
  if (a.p1.bytes > 0) {
    warp_copy(a.out1 + r * a.p1.bytes, a.p1.src + token * a.p1.stride, a.p1.bytes, lane);
  }
  if (lane == 0) {
    record_routing<true>(
        routing_of(a), r, a.gates[i], me, land, [&] { return static_cast<int32_t>(pos); },
        [&] { return static_cast<int32_t>(token * a.phases / a.num_tokens); },
        [&] { return next_row; }, [&] { return payload_row == land; });
    if (a.head_N != nullptr) a.head_N[i] = payload_row == land ? 1 : 0;
  }
}

// One landing row of source s (already published) to its contract row, as unpack_kernel does.
// One warp. `chunk` is the landing row's chunk; a dedup payload in another chunk of the same
// source is awaited first. With a.direct the payload is already there: only the routing.
__device__ void receive_row(const Layout& g, const DispatchStreamArgs& a,
                            const StreamTables& t, int64_t p1_offset, int s, int64_t chunk,
                            int32_t land, unsigned long long epoch, int lane) {
  const int L = g.local_experts, W = g.world;
  int lo = 0, hi = L - 1;  // the last local expert whose landing block starts at or before land
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.land_start[s * L + mid] <= land) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int e = lo;
  const int64_t r = t.contract_start[e * W + s] + (land - t.land_start[s * L + e]);
  const char* recv = g.local_base + g.recv_off;
  const char* src = recv + static_cast<int64_t>(land) * g.recv_stride;
  const char* trailer = src + g.recv_stride - kTrailerBytes;
  const int32_t payload_row =
      a.dedup ? *reinterpret_cast<const volatile int32_t*>(trailer + kTrailerRowOffset) : land;
  if (a.dedup) {
    const int64_t payload_chunk = (payload_row - t.land_base[s]) / a.chunk_rows;
    if (payload_chunk != chunk && lane == 0) {
      wait_flag(g, dispatch_flag(g.local_base, g, s, payload_chunk), epoch, "a dispatch chunk",
                s);
    }
    __syncwarp();
  }
  if (!a.direct) {
    const char* payload = recv + static_cast<int64_t>(payload_row) * g.recv_stride;
    warp_copy(a.out0 + r * a.p0.bytes, payload, a.p0.bytes, lane);
    if (a.p1.bytes > 0) {
      warp_copy(a.out1 + r * a.p1.bytes, payload + p1_offset, a.p1.bytes, lane);
    }
  }
  if (lane == 0) {
    record_routing<true>(
        routing_of(a), r, *reinterpret_cast<const float*>(trailer), s, land,
        // t's tables by value (with a reference to t in the lambda the kernel's SASS changed)
        [&, send_off = t.send_off, land_base = t.land_base] {
          return send_off[s] + (land - land_base[s]);
        },
        [&] { return *reinterpret_cast<const int32_t*>(trailer + kTrailerPhaseOffset); },
        [&] { return *reinterpret_cast<const int32_t*>(trailer + kTrailerNextOffset); },
        [&] { return payload_row == land; });
  }
}

template <typename IdT>
__global__ void __launch_bounds__(kBlockThreads, kDispatchMinBlocks)
    dispatch_stream_kernel(Layout g, DispatchStreamArgs a, int send_blocks, int64_t p1_offset) {
  extern __shared__ int32_t smem[];
  __shared__ unsigned long long epoch_s;
  const int W = g.world, me = g.rank;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) epoch_s = *stream_epoch_word(g) + 1;
  StreamTables t;
  t.build(g, smem, a.direct);  // ends in __syncthreads
  const unsigned long long epoch = epoch_s;
  const bool ok = a.info[0] == kOk;  // every rank decides alike; nothing moves otherwise
  const auto* ids = static_cast<const IdT*>(a.ids);

  if (ok && static_cast<int>(blockIdx.x) < send_blocks) {
    // Items in chunk-major order, owners rotated from the next rank: at any moment the senders
    // of all ranks spread their stores over every owner.
    const int64_t items = StreamTables::max_chunks(t.send_rows, W, a.chunk_rows) * W;
    const int rows_per_warp = a.chunk_rows / kWarpsPerBlock;
    for (int64_t q = blockIdx.x; q < items; q += send_blocks) {
      const int owner = (me + 1 + static_cast<int>(q % W)) % W;
      const int64_t chunk = q / W;
      const int64_t first = chunk * a.chunk_rows;
      const int64_t last = min(static_cast<int64_t>(t.send_rows[owner]), first + a.chunk_rows);
      if (first >= last) continue;  // block-uniform
      // This warp's rows of the chunk are first + warp + u * kWarpsPerBlock; lane u loads the
      // slot and landing row of its u-th row, all before the first copy.
      const int64_t mine = first + warp + static_cast<int64_t>(lane) * kWarpsPerBlock;
      int32_t slot = 0, land = 0;
      if (lane < rows_per_warp && mine < last) {
        slot = a.slot_of_send[t.send_start[owner] + mine];
        land = a.land_index[slot];
      }
      for (int u = 0; u < rows_per_warp && first + warp + u * kWarpsPerBlock < last; ++u) {
        const int64_t i = __shfl_sync(kFullMask, slot, u);
        const int32_t land_u = __shfl_sync(kFullMask, land, u);
        if (owner == me) {  // local rows skip the landing area
          const int64_t pos = t.send_start[me] + first + warp + u * kWarpsPerBlock;
          keep_slot(g, a, t, ids, i, land_u, pos, lane);
        } else {
          const int64_t contract_row =
              a.direct ? t.direct_base[static_cast<int64_t>(ids[i])] + first + warp +
                             u * kWarpsPerBlock
                       : -1;
          send_slot(g, a, ids, p1_offset, i, land_u, contract_row, owner, peer_base(g, owner),
                    lane);
        }
      }
      if (owner == me) continue;  // block-uniform; no landing rows to publish
      char* peer = peer_base(g, owner);
      __threadfence_system();
      __syncthreads();
      if (threadIdx.x == 0) store_release_sys(dispatch_flag(peer, g, me, chunk), epoch);
    }
  }

  if (ok) {
    const int64_t items = StreamTables::max_chunks(t.recv_rows, W, a.chunk_rows) * W;
    for (int64_t q = claim_item(g, kCounterClaimDispatch); q < items;
         q = claim_item(g, kCounterClaimDispatch)) {
      const int s = static_cast<int>(q % W);
      const int64_t chunk = q / W;
      const int64_t first = chunk * a.chunk_rows;
      const int64_t last = min(static_cast<int64_t>(t.recv_rows[s]), first + a.chunk_rows);
      if (first >= last || s == me) continue;  // block-uniform; local rows were kept directly
      if (threadIdx.x == 0) {
        wait_flag(g, dispatch_flag(g.local_base, g, s, chunk), epoch, "a dispatch chunk", s);
      }
      __syncthreads();
      for (int64_t j = first + warp; j < last; j += kWarpsPerBlock) {
        receive_row(g, a, t, p1_offset, s, chunk, t.land_base[s] + static_cast<int32_t>(j),
                    epoch, lane);
      }
    }
  }
  finish_stream(g, kCounterStreamDispatch, kCounterClaimDispatch, epoch);
}

// ------------------------------------------------------------------------------------- combine

// Tokens of phase p of P for T tokens: [ceil(p T / P), ceil((p + 1) T / P)), i.e. t P / T == p.
__device__ __forceinline__ int64_t phase_begin(int p, int64_t num_tokens, int phases) {
  return (static_cast<int64_t>(p) * num_tokens + phases - 1) / phases;
}

template <typename T, int kVec>
__device__ void reduce_tokens(const Layout& g, const CombineStreamArgs& a, int64_t t0,
                              int64_t t1) {
  const char* ret = g.local_base + g.ret_off;
  const int64_t groups = a.hidden / kVec;
  const int64_t total = (t1 - t0) * groups;
  T* out = static_cast<T*>(a.out);
  for (int64_t item = threadIdx.x; item < total; item += blockDim.x) {
    const int64_t t = t0 + item / groups, col = (item % groups) * kVec;
    sum_token_slots<T, kVec, false>(ret, g.ret_stride, a.top_k, a.hidden, a.send_pos, a.gates,
                                    /*head_N=*/nullptr, t, col, out);
  }
}

// One returned row (a call, not inlined: under the combine's 64-register budget the copy loop
// then gets its registers to itself; inlined, the sender loop spilled a little more).
__device__ __noinline__ void return_row(char* dst, const char* src, int64_t nbytes, int lane) {
  warp_copy(dst, src, nbytes, lane);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads, kCombineMinBlocks)
    combine_stream_kernel(Layout g, CombineStreamArgs a, int send_blocks,
                          int64_t tokens_per_item) {
  __shared__ unsigned long long epoch_s;
  const int W = g.world, me = g.rank;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) epoch_s = *stream_epoch_word(g) + 1;
  __syncthreads();
  const unsigned long long epoch = epoch_s;

  if (static_cast<int>(blockIdx.x) < send_blocks) {
    const int64_t num_rows = rows_to_walk(a.max_rows, a.num_rows_dev);
    const int64_t row_bytes = a.hidden * static_cast<int64_t>(sizeof(T));
    const char* rows = static_cast<const char*>(a.rows);
    const int64_t num_warps = static_cast<int64_t>(send_blocks) * kWarpsPerBlock;
    // This warp's rows are gw + k * num_warps. For each phase their phases are read 32 rows at
    // a time, one row per lane, and the phase's rows picked by ballot (their routing loaded by
    // those lanes at once): no dependent load per row and phase. The first 32 rows' phases are
    // read once, before the first phase (most warps have no more rows than that).
    const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
    const int64_t first = gw + static_cast<int64_t>(lane) * num_warps;
    const int32_t first_phase = first < num_rows ? a.phase_R[first] : -1;
    for (int p = 0; p < a.phases; ++p) {
      for (int64_t k0 = 0; gw + k0 * num_warps < num_rows; k0 += kWarp) {
        const int64_t mine = gw + (k0 + lane) * num_warps;
        const bool here = k0 == 0 ? first_phase == p : mine < num_rows && a.phase_R[mine] == p;
        const int32_t src = here ? a.src_rank_R[mine] : 0;
        const int32_t ret = here ? a.ret_index_R[mine] : 0;
        for (unsigned todo = __ballot_sync(kFullMask, here); todo != 0; todo &= todo - 1) {
          const int l = __ffs(todo) - 1;
          const int64_t r = gw + (k0 + l) * num_warps;
          const int s = __shfl_sync(kFullMask, src, l);
          const int64_t ret_index = __shfl_sync(kFullMask, ret, l);
          char* dst = peer_base(g, s) + g.ret_off + ret_index * g.ret_stride;
          return_row(dst, rows + r * row_bytes, row_bytes, lane);
        }
      }
      __threadfence_system();
      __syncthreads();
      // Warp 0 counts the block in and, in the last block, publishes the phase; the other warps
      // go on with the next phase at once (every thread fenced its rows before the barrier).
      if (warp == 0) {
        bool last = false;
        if (lane == 0) {
          unsigned int* counter = counter_word(g, kCounterPhaseBase + p);
          last = atomicAdd(counter, 1u) == static_cast<unsigned int>(send_blocks) - 1;
          if (last) atomicExch(counter, 0u);
        }
        if (__shfl_sync(kFullMask, last, 0)) {  // every sender block has fenced phase p
          __threadfence_system();
          for (int s = lane; s < W; s += kWarp) {
            store_release_sys(combine_flag(peer_base(g, s), g, me, p), epoch);
          }
        }
      }
    }
  }

  // Reducers: (phase, token group) items in phase order.
  __shared__ int64_t phase_items[kStreamPhasesMax + 1];
  if (threadIdx.x == 0) {
    phase_items[0] = 0;
    for (int p = 0; p < a.phases; ++p) {
      const int64_t n = phase_begin(p + 1, a.phase_tokens, a.phases) -
                        phase_begin(p, a.phase_tokens, a.phases);
      const int64_t mine = a.num_tokens > 0 ? (n + tokens_per_item - 1) / tokens_per_item : 0;
      phase_items[p + 1] = phase_items[p] + mine;
    }
  }
  __syncthreads();
  const int64_t items = phase_items[a.phases];
  for (int64_t q = claim_item(g, kCounterClaimCombine); q < items;
       q = claim_item(g, kCounterClaimCombine)) {
    int p = 0;
    while (phase_items[p + 1] <= q) ++p;
    for (int o = threadIdx.x; o < W; o += blockDim.x) {
      wait_flag(g, combine_flag(g.local_base, g, o, p), epoch, "a combine phase", o);
    }
    __syncthreads();
    const int64_t t0 =
        phase_begin(p, a.phase_tokens, a.phases) + (q - phase_items[p]) * tokens_per_item;
    const int64_t t1 = min(phase_begin(p + 1, a.phase_tokens, a.phases), t0 + tokens_per_item);
    reduce_tokens<T, kVec>(g, a, t0, t1);
  }
  finish_stream(g, kCounterStreamCombine, kCounterClaimCombine, epoch);
}

// Blocks of `kernel` resident at once per SM with `smem` bytes of dynamic shared memory (the
// grid is capped to them), asked once per kernel and size (a few microseconds per query).
template <auto kKernel>
int resident_per_sm(int64_t smem, const char* op) {
  static int64_t cached_smem = -1;
  static int cached = 0;
  if (smem != cached_smem) {
    int per_sm = 0;
    NMOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                        &per_sm, kKernel, kBlockThreads, static_cast<size_t>(smem)),
                    op);
    cached = std::max(1, per_sm);
    cached_smem = smem;
  }
  return cached;
}

// Raises the dispatch kernel's dynamic shared memory limit when the tables need more than the
// default 48 KiB (thousands of experts).
template <auto kKernel>
void allow_stream_smem(int64_t smem) {
  if (smem <= 48 * 1024) return;
  NMOE_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem)),
                  "dispatch_stream");
}

void check_phases(int phases, const char* op) {
  if (phases < 1 || phases > kStreamPhasesMax) {
    throw std::invalid_argument(std::string("nmoe_comm ") + op + ": phases must be from 1 to " +
                                std::to_string(kStreamPhasesMax) + ", got " +
                                std::to_string(phases) + " (RdepDispatcher.stream_phases)");
  }
}

// Grid and sender blocks: `blocks_per_sm` blocks per SM (capped to residency), of which
// `send_percent` percent (at least one, and at least one receiver) send.
void split_grid(int resident, int blocks_per_sm, int send_percent, int sm_count, int* grid,
                int* send_blocks) {
  *grid = std::max(2, std::min(resident, blocks_per_sm * sm_count));
  *send_blocks = std::clamp(*grid * send_percent / 100, 1, *grid - 1);
}

}  // namespace

void launch_dispatch_stream(const Layout& g, const DispatchStreamArgs& a, int blocks_per_sm,
                            int send_percent, int sm_count, cudaStream_t stream) {
  if (a.chain_R != nullptr && (!a.dedup || a.head_R == nullptr || a.row_of_land == nullptr)) {
    throw std::invalid_argument(
        "nmoe_comm dispatch_stream: chain_R needs dedup and both head_R and row_of_land");
  }
  if (a.direct && (a.dedup || g.view_off < 0)) {
    throw std::invalid_argument(
        "nmoe_comm dispatch_stream: direct stores need one row per slot (no dedup) and a "
        "buffer with zero-copy outputs (view_off)");
  }
  check_phases(a.phases, "dispatch_stream");
  if (a.chunk_rows < kStreamFlagRows || a.chunk_rows > kStreamChunkRowsMax ||
      a.chunk_rows % kStreamFlagRows != 0) {
    throw std::invalid_argument(
        "nmoe_comm dispatch_stream: chunk_rows must be a multiple of " +
        std::to_string(kStreamFlagRows) + " from " + std::to_string(kStreamFlagRows) + " to " +
        std::to_string(kStreamChunkRowsMax) + ", got " + std::to_string(a.chunk_rows) +
        " (RdepDispatcher.dispatch_grid[2])");
  }
  const int64_t smem = StreamTables::smem_words(g.num_experts, g.world) * 4;
  const int64_t p1_off = (a.p0.bytes + 15) / 16 * 16;
  auto run = [&](auto kernel, int per_sm) {
    int grid = 0, senders = 0;
    split_grid(per_sm * sm_count, blocks_per_sm, send_percent, sm_count, &grid, &senders);
    kernel<<<grid, kBlockThreads, smem, stream>>>(g, a, senders, p1_off);
  };
  if (a.ids_int64) {
    allow_stream_smem<dispatch_stream_kernel<int64_t>>(smem);
    run(dispatch_stream_kernel<int64_t>,
        resident_per_sm<dispatch_stream_kernel<int64_t>>(smem, "dispatch_stream"));
  } else {
    allow_stream_smem<dispatch_stream_kernel<int32_t>>(smem);
    run(dispatch_stream_kernel<int32_t>,
        resident_per_sm<dispatch_stream_kernel<int32_t>>(smem, "dispatch_stream"));
  }
  NMOE_CUDA_CHECK_LAUNCH("dispatch_stream");
}

template <typename T>
void combine_stream_typed(const Layout& g, const CombineStreamArgs& a, int blocks_per_sm,
                          int send_percent, int sm_count, cudaStream_t stream) {
  check_phases(a.phases, "combine_stream");
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vector = (a.hidden * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  // About 16K elements per reduce item: enough work per claim, fine enough to overlap.
  const int64_t tokens_per_item = std::max<int64_t>(1, (16384 + a.hidden - 1) / a.hidden);
  auto run = [&](auto kernel, int per_sm) {
    int grid = 0, senders = 0;
    split_grid(per_sm * sm_count, blocks_per_sm, send_percent, sm_count, &grid, &senders);
    kernel<<<grid, kBlockThreads, 0, stream>>>(g, a, senders, tokens_per_item);
  };
  if (vector) {
    run(combine_stream_kernel<T, kVec>,
        resident_per_sm<combine_stream_kernel<T, kVec>>(0, "combine_stream"));
  } else {
    run(combine_stream_kernel<T, 1>,
        resident_per_sm<combine_stream_kernel<T, 1>>(0, "combine_stream"));
  }
  NMOE_CUDA_CHECK_LAUNCH("combine_stream");
}

void launch_combine_stream(const Layout& g, const CombineStreamArgs& a, int blocks_per_sm,
                           int send_percent, int sm_count, cudaStream_t stream) {
  switch (a.dtype) {
    case kF32:
      return combine_stream_typed<float>(g, a, blocks_per_sm, send_percent, sm_count, stream);
    case kBF16:
      return combine_stream_typed<__nv_bfloat16>(g, a, blocks_per_sm, send_percent, sm_count,
                                                 stream);
    case kF16:
      return combine_stream_typed<__half>(g, a, blocks_per_sm, send_percent, sm_count, stream);
  }
}

}  // namespace nmoe::comm
