// RDEP data movement over peer memory: the kernels behind nmoe_comm's `ipc` and `nvshmem` backends.
//
// Every rank owns one buffer with the same layout (`Layout`); `peer_bases[p]` is rank p's buffer
// as a pointer this GPU can load from / store to (CUDA IPC mapping, or nvshmem_ptr), or 0 when p
// is not reachable by loads/stores (another node under NVSHMEM): rows for such a peer are written
// to this rank's staging area instead and moved by the host with NVSHMEM puts.
//
// Letters: T tokens, K slots per token, N = T*K slots of this rank, E experts, W ranks, L = E/W
// local experts, R rows received. Orders used throughout (see nmoe_comm/rdep.py):
//   send order    this rank's slots sorted by (expert, token, slot): owner-major.
//   landing order rows on an owner by (source, local expert, token, slot): each source's rows are
//                 one contiguous chunk, so one put moves them.
//   contract order rows by (local expert, source, token, slot) (nmoe_comm.dispatcher rule 1).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nmoe::comm {

constexpr int kMaxRanks = 1024;
constexpr int kTrailerBytes = 16;  // per landing row: float gate, then (dedup) int32 payload row
constexpr int kTrailerRowOffset = 4;  // byte offset of that payload row in the trailer
constexpr int kTrailerNextOffset = 8;  // (dedup) int32: landing row of the token's next slot here
constexpr int kTrailerPhaseOffset = 12;  // (pipelined) int32: the slot's token phase at its source

// Pipelined transport (rdep_stream.cu): a dispatch moves rows in chunks of `chunk_rows`
// consecutive send positions of one (source, owner) pair (a multiple of kStreamFlagRows, at most
// kStreamChunkRowsMax; the flag region holds one flag per kStreamFlagRows rows of capacity),
// each published by a flag; a combine returns rows in P token phases (token t of T is in phase
// t * P / T; P from 1 to kStreamPhasesMax, chosen per dispatch and kept in its handle), each
// published by one flag per (owner, source).
constexpr int kStreamFlagRows = 8;
constexpr int kStreamChunkRowsMax = 256;
constexpr int kStreamPhasesMax = 64;

// Byte offsets of the regions of one rank's buffer (identical on every rank), and the groups's
// shape. Passed to every kernel by value.
struct Layout {
  const int64_t* peer_bases;  // device array [W]: each rank's buffer base here, 0 = not mapped
  char* local_base;           // this rank's buffer
  char* stage;                // staging for unmapped peers (nullptr when every peer is mapped)
  int64_t signal_off;         // uint64 [W]: barrier epoch last received from each rank
  int64_t counter_off;        // uint32 [kCounterWords]: last-block counters (CounterSlot);
                              // words 4-5 and 6-7: the stream and barrier epochs (uint64)
  int64_t counts_off;         // int32 [W][E + 1]: count matrix C; row s written by rank s
  int64_t counts_src_off;     // int32 [E + 1]: this rank's count row (NVSHMEM fcollect source)
  int64_t recv_off;           // landing rows [capacity][recv_stride]: payloads + trailer
  int64_t recv_stride;
  int64_t ret_off;            // returned rows [max_send_rows][ret_stride], in send order
  int64_t ret_stride;
  int64_t dots_off;           // float [max_send_rows], in send order
  int64_t dflags_off;         // uint64 [W][dflag_chunks]: pipelined dispatch, chunk c of source s
                              // published (the stream epoch) by s
  int64_t cflags_off;         // uint64 [W][kStreamPhasesMax]: pipelined combine, phase p of
                              // owner o returned (the stream epoch) by o
  int64_t dflag_chunks;       // ceil(capacity / kStreamFlagRows): flags per source
  int64_t view_off;           // zero-copy dispatch outputs (-1: none): the first payload's rows
                              // [capacity][p0 bytes], then from view_p1_off the second's
  int64_t capacity;
  int64_t max_send_rows;
  int rank;
  int world;
  int num_experts;
  int local_experts;
  unsigned long long timeout_ns;  // barrier spin limit, then trap
};

// Status a dispatch plan writes to info[0] (info[1], info[2]: details; info[3]: R of this rank,
// 0 when the status is not kOk; counts_E is then all zeros too).
enum PlanStatus : int64_t {
  kOk = 0,
  kOverCapacity = 1,  // info[1] = lowest owner over capacity, info[2] = its rows
  kBadExpertId = 2,   // info[1] = lowest rank with an id outside [0, E)
  kTooManySlots = 3,  // info[1] = lowest rank sending more than max_send_rows slots
  kRowTooWide = 4,    // info[1] = lowest rank whose rows do not fit the landing stride
};

// Bits a rank ORs into column E of its count row (read by every rank's plan).
enum CountFlags : int32_t { kFlagBadId = 1, kFlagTooManySlots = 2, kFlagRowTooWide = 4 };

// route_plan flags.
enum RouteFlags : int { kRoute = 1, kExchange = 2, kPlan = 4 };

// Last-block and work counters (index into the uint32 [kCounterWords] counter region).
enum CounterSlot : int {
  kCounterScatter = 0,
  kCounterReturn = 1,
  kCounterOwnerGrad = 2,
  kCounterStreamDispatch = 8,   // blocks done (pipelined dispatch)
  kCounterStreamCombine = 9,    // blocks done (pipelined combine)
  kCounterClaimDispatch = 10,   // next receive item to claim
  kCounterClaimCombine = 11,    // next reduce item to claim
  kCounterRouteArrive = 12,     // route_plan's grid barrier: blocks arrived
  kCounterRouteGeneration = 13, // route_plan's grid barrier: barriers completed
  kCounterPhaseBase = 16,       // [kStreamPhasesMax]: sender blocks done with each combine phase
};
constexpr int kCounterWords = kCounterPhaseBase + kStreamPhasesMax;
// The counter region read as uint64: index of this rank's barrier epoch (the barriers it has
// run; counted on the device so that CUDA graphs replay with fresh epochs), and of its stream
// epoch (the pipelined kernels it has run; their flags carry it).
constexpr int kEpochWord = 3;
constexpr int kStreamEpochWord = 2;

enum RowDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct Payload {
  const char* src;  // row t starts at src + t * stride
  int64_t stride;   // bytes between rows
  int64_t bytes;    // bytes per row (0: no payload)
};

// slot_of_send (optional, int32 [N]): the slot at each send position (the pipelined dispatch
// walks the send order).
void launch_route_plan(const Layout& g, const void* ids, bool ids_int64, int64_t num_slots,
                       int32_t local_flags, int32_t* send_pos, int32_t* land_index,
                       int32_t* slot_of_send, int64_t* counts_E, int64_t* info, int flags,
                       unsigned long long sync_peers, int sm_count, cudaStream_t stream);

// dedup: each token's row goes once per owner (dispatch with every owner mapped; the trailer of
// each slot's landing row names the landing row holding its payload and the landing row of the
// token's next slot on that owner; unpack needs the same flag). head_N (optional, int32 [N]):
// 1 where a slot is its token's first slot on its owner.
void launch_scatter_slots(const Layout& g, const void* ids, bool ids_int64, int64_t num_slots,
                          int top_k, const int32_t* send_pos, const int32_t* land_index,
                          Payload p0, Payload p1, const float* gates, const int64_t* info,
                          bool dedup, int32_t* head_N, unsigned long long sync_peers,
                          int sm_count, cudaStream_t stream);

// unpack, return_rows and owner_grad walk `num_rows` rows, or min(num_rows, *num_rows_dev) when
// `num_rows_dev` is not null (a sync-free dispatch: R stays on the device, num_rows = capacity).
void launch_unpack(const Layout& g, int64_t num_rows, const int64_t* num_rows_dev, bool dedup,
                   char* out0, int64_t bytes0, char* out1, int64_t bytes1, float* gates_R,
                   int32_t* src_rank_R, int32_t* ret_index_R, int32_t* land_row_R,
                   int32_t* chain_R, int32_t* head_R, int32_t* row_of_land, int sm_count,
                   cudaStream_t stream);

// Partial sums on the owner (dedup dispatch): per head row, the gated (gates_R) or plain sum of
// its token's rows here, to the source's return buffer at the head's send position; barrier.
void launch_owner_reduce(const Layout& g, RowDtype dtype, int64_t num_rows,
                         const int64_t* num_rows_dev, int64_t hidden, const void* rows,
                         const float* gates_R, const int32_t* src_rank_R,
                         const int32_t* ret_index_R, const int32_t* chain_R,
                         const int32_t* head_R, const int32_t* row_of_land, int top_k,
                         unsigned long long sync_peers, int sm_count, cudaStream_t stream);

void launch_return_rows(const Layout& g, int64_t num_rows, const int64_t* num_rows_dev,
                        const char* rows, int64_t row_bytes, const int32_t* src_rank_R,
                        const int32_t* ret_index_R, const int32_t* land_row_R,
                        unsigned long long sync_peers, int sm_count, cudaStream_t stream);

// head_N (optional): sum only the flagged slots (the owners' partial sums, no gates).
void launch_reduce_slots(const Layout& g, RowDtype dtype, int64_t num_tokens, int top_k,
                         int64_t hidden, const int32_t* send_pos, const float* gates,
                         const int32_t* head_N, void* out, int sm_count, cudaStream_t stream);

void launch_owner_grad(const Layout& g, RowDtype y_dtype, RowDtype go_dtype, int64_t num_rows,
                       const int64_t* num_rows_dev, int64_t hidden, const void* y,
                       const int32_t* src_rank_R, const int32_t* ret_index_R,
                       const int32_t* land_row_R, void* grad_y, unsigned long long sync_peers,
                       int sm_count, cudaStream_t stream);

// Pipelined dispatch (every peer mapped): scatter_slots and unpack in one kernel. Sender blocks
// walk this rank's send order in chunks and publish each chunk with a flag on its owner;
// receiver blocks copy each arrived chunk from landing order to contract order (the outputs of
// unpack, plus phase_R, each row's token phase at its source), so the local copy overlaps the
// transfers. No barrier: the receivers wait for exactly the chunks the count matrix announces.
struct DispatchStreamArgs {
  const void* ids;
  bool ids_int64;
  int64_t num_slots;
  int64_t num_tokens;
  int top_k;
  const int32_t* send_pos;
  const int32_t* land_index;
  const int32_t* slot_of_send;
  Payload p0, p1;
  const float* gates;
  const int64_t* info;
  bool dedup;
  int32_t* head_N;
  int64_t max_rows;             // rows the outputs hold (R, or capacity when sync-free)
  char* out0;
  char* out1;
  float* gates_R;
  int32_t* src_rank_R;
  int32_t* ret_index_R;
  int32_t* land_row_R;
  int32_t* chain_R;
  int32_t* head_R;
  int32_t* row_of_land;
  int32_t* phase_R;
  int phases;                   // token phases of the combine (1 to kStreamPhasesMax)
  int chunk_rows;               // rows per published chunk (see kStreamFlagRows)
  bool direct;                  // senders store payloads straight into the owner's zero-copy
                                // outputs (g.view_off) at their contract rows; needs !dedup
};
// Grid: `blocks_per_sm` blocks per SM (capped to what is resident at once), `send_percent` of
// them senders. Throws std::invalid_argument for a chunk_rows the flag region cannot take.
void launch_dispatch_stream(const Layout& g, const DispatchStreamArgs& a, int blocks_per_sm,
                            int send_percent, int sm_count, cudaStream_t stream);

// Pipelined combine (every peer mapped, a pipelined dispatch's handle): return_rows and
// reduce_slots in one kernel. Sender blocks return the rows phase by phase (phase_R) and publish
// each finished phase with a flag on every source; reducer blocks sum each phase's tokens once
// every owner has published it. Same sums, same order as reduce_slots (bitwise).
struct CombineStreamArgs {
  RowDtype dtype;
  int64_t max_rows;
  const int64_t* num_rows_dev;
  int64_t hidden;
  const void* rows;
  const int32_t* src_rank_R;
  const int32_t* ret_index_R;
  const int32_t* phase_R;
  int64_t num_tokens;           // this rank's tokens to reduce (0: none)
  int64_t phase_tokens;         // T of this rank's dispatch (sets the phases)
  int phases;                   // the dispatch's token phases (1 to kStreamPhasesMax)
  int top_k;
  const int32_t* send_pos;
  const float* gates;
  void* out;
};
void launch_combine_stream(const Layout& g, const CombineStreamArgs& a, int blocks_per_sm,
                           int send_percent, int sm_count, cudaStream_t stream);

void launch_gather_dots(const Layout& g, int64_t num_slots, const int32_t* send_pos, float* out,
                        cudaStream_t stream);

void launch_barrier(const Layout& g, unsigned long long sync_peers, cudaStream_t stream);

// Dynamic shared memory route_plan needs for E experts and W ranks, and the warps it routes with.
int route_plan_warps(int num_experts, int world, int64_t* smem_bytes);

}  // namespace nmoe::comm
