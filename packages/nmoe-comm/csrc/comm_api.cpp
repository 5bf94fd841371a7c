// nmoe_comm._C: device memory, CUDA IPC handles, the RDEP kernels of the ipc/nvshmem backends and
// the slot sum of the local backend.
//
// An internal module: nmoe_comm/_extension.py and nmoe_comm/rdep.py check every tensor (dtype,
// device, shape, contiguity, alignment) and pass raw device pointers as integers, so the hot
// path pays no DLPack conversion (tens of microseconds per dispatch at decode sizes would be a
// large share of the budget). Like nmoe_kernels._C it does not link libtorch, and kernels run on
// the torch stream passed in as an integer. Built without nvcc it only reports WITH_CUDA=False.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>

#ifndef NMOE_WITH_CUDA
#define NMOE_WITH_CUDA 0
#endif
#ifndef NMOE_CUDA_ARCHS
#define NMOE_CUDA_ARCHS ""
#endif

#if NMOE_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "rdep.h"
#include "slot_sum.h"
#endif

namespace py = pybind11;

// Bump on any binding signature or behaviour change, with a one-line reason:
//   1: first release (alloc/IPC, Rdep: route_plan, scatter_slots, unpack, return_rows,
//      reduce_slots, owner_grad, gather_dots, barrier).
//   2: unpack, return_rows and owner_grad take `num_rows_dev` (sync-free dispatch: R read on the
//      device); a failed plan writes R = 0 and zero counts_E; scatter_slots and unpack take
//      `dedup` (one row per token and owner).
//   3: sum_slots (the local backend's slot reduction on CUDA).
//   4: the kernels count barrier epochs on the device (a CUDA graph replays with fresh ones):
//      the argument that was the host's epoch is now `sync_peers`, a flag (nonzero: barrier).
//   5: partial sums on the owner (`reduce_on_owner`): scatter_slots takes `head_N`, unpack
//      `chain_R`, `head_R`, `row_of_land`, reduce_slots `head_N`; owner_reduce.
//   6: the pipelined transport: dispatch_stream, combine_stream; route_plan takes `slot_of_send`;
//      Rdep takes the flag regions (dflags_off, cflags_off, dflag_chunks); 32 counter words.
//   7: dispatch_stream takes `chunk_rows` (rows per published chunk; the flag region holds one
//      flag per STREAM_FLAG_ROWS = 8 rows of capacity, which replaces STREAM_CHUNK_ROWS = 32).
//   8: exports STREAM_CHUNK_ROWS_MAX (the largest chunk_rows), checked when a dispatcher attaches.
//   9: zero-copy dispatch outputs: Rdep takes `view_off` (-1: none), dispatch_stream `direct`.
//  10: the combine's token phases per dispatch: dispatch_stream and combine_stream take `phases`
//      after phase_R; STREAM_PHASES_MAX (64) replaces STREAM_PHASES; 80 counter words.
constexpr int kAbiVersion = 10;

#if NMOE_WITH_CUDA
namespace nmoe::comm {
namespace {

using Ptr = std::uintptr_t;

template <typename T>
T* as(Ptr p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(Ptr s) { return reinterpret_cast<cudaStream_t>(s); }

Ptr alloc(int device, int64_t nbytes) {
  CudaDeviceGuard guard(device, "nmoe_comm alloc");
  void* ptr = nullptr;
  NMOE_CUDA_CHECK(cudaMalloc(&ptr, static_cast<size_t>(nbytes)), "nmoe_comm alloc");
  NMOE_CUDA_CHECK(cudaMemset(ptr, 0, static_cast<size_t>(nbytes)), "nmoe_comm alloc");
  NMOE_CUDA_CHECK(cudaDeviceSynchronize(), "nmoe_comm alloc");
  return reinterpret_cast<Ptr>(ptr);
}

void free_device(int device, Ptr ptr) {
  CudaDeviceGuard guard(device, "nmoe_comm free");
  NMOE_CUDA_CHECK(cudaFree(as<void>(ptr)), "nmoe_comm free");
}

py::bytes ipc_handle(int device, Ptr ptr) {
  CudaDeviceGuard guard(device, "nmoe_comm ipc_handle");
  cudaIpcMemHandle_t handle;
  NMOE_CUDA_CHECK(cudaIpcGetMemHandle(&handle, as<void>(ptr)), "nmoe_comm ipc_handle");
  return py::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

Ptr ipc_open(int device, const py::bytes& handle_bytes) {
  CudaDeviceGuard guard(device, "nmoe_comm ipc_open");
  const std::string raw = handle_bytes;
  cudaIpcMemHandle_t handle;
  if (raw.size() != sizeof(handle)) {
    throw std::invalid_argument("nmoe_comm ipc_open: a CUDA IPC handle has " +
                                std::to_string(sizeof(handle)) + " bytes, got " +
                                std::to_string(raw.size()));
  }
  std::memcpy(&handle, raw.data(), sizeof(handle));
  void* ptr = nullptr;
  NMOE_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess),
                  "nmoe_comm ipc_open");
  return reinterpret_cast<Ptr>(ptr);
}

void ipc_close(int device, Ptr ptr) {
  CudaDeviceGuard guard(device, "nmoe_comm ipc_close");
  NMOE_CUDA_CHECK(cudaIpcCloseMemHandle(as<void>(ptr)), "nmoe_comm ipc_close");
}

bool can_access_peer(int device, int peer) {
  if (device == peer) return true;
  int ok = 0;
  NMOE_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, device, peer), "nmoe_comm can_access_peer");
  return ok != 0;
}

int sm_count(int device) {
  int count = 0;
  NMOE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
                  "nmoe_comm sm_count");
  return count;
}

// Checks a row dtype code from Python (0 float32, 1 bfloat16, 2 float16).
RowDtype row_dtype(int code, const char* what) {
  if (code < kF32 || code > kF16) {
    throw std::invalid_argument(std::string("nmoe_comm: ") + what + " dtype code " +
                                std::to_string(code) + " is not 0 (float32), 1 (bfloat16) or 2 "
                                "(float16)");
  }
  return static_cast<RowDtype>(code);
}

// The local backend's slot reduction (slot_sum.h): out[t] = sum_k [gates[t, k] *]
// rows[row_of_slot[t, k]] in float32, slot order, on `stream`. nmoe_comm/local.py checks the
// tensors.
void sum_slots(int device, int dtype, int64_t num_tokens, int top_k, int64_t hidden, Ptr rows,
               Ptr row_of_slot, Ptr gates, Ptr out, Ptr stream) {
  const RowDtype row = row_dtype(dtype, "rows");
  CudaDeviceGuard guard(device, "sum_slots");
  launch_slot_sum(row, num_tokens, top_k, hidden, as<const void>(rows),
                  as<const int64_t>(row_of_slot), as<const float>(gates), as<void>(out),
                  stream_of(stream));
}

// The persistent state of one dispatcher: its buffer layout and peer table (see rdep.h).
class Rdep {
 public:
  Rdep(int device, int rank, int world, int num_experts, int64_t capacity, int64_t max_send_rows,
       Ptr peer_bases, Ptr local_base, Ptr stage, int64_t signal_off, int64_t counter_off,
       int64_t counts_off, int64_t counts_src_off, int64_t recv_off, int64_t recv_stride,
       int64_t ret_off, int64_t ret_stride, int64_t dots_off, int64_t dflags_off,
       int64_t cflags_off, int64_t dflag_chunks, int64_t view_off, uint64_t timeout_ns)
      : device_(device) {
    if (world < 1 || world > kMaxRanks || rank < 0 || rank >= world ||
        num_experts % world != 0 || recv_stride % 16 != 0 || ret_stride % 16 != 0) {
      throw std::invalid_argument("nmoe_comm Rdep: inconsistent group or layout");
    }
    g_.peer_bases = as<const int64_t>(peer_bases);
    g_.local_base = as<char>(local_base);
    g_.stage = as<char>(stage);
    g_.signal_off = signal_off;
    g_.counter_off = counter_off;
    g_.counts_off = counts_off;
    g_.counts_src_off = counts_src_off;
    g_.recv_off = recv_off;
    g_.recv_stride = recv_stride;
    g_.ret_off = ret_off;
    g_.ret_stride = ret_stride;
    g_.dots_off = dots_off;
    g_.dflags_off = dflags_off;
    g_.cflags_off = cflags_off;
    g_.dflag_chunks = dflag_chunks;
    g_.view_off = view_off;
    g_.capacity = capacity;
    g_.max_send_rows = max_send_rows;
    g_.rank = rank;
    g_.world = world;
    g_.num_experts = num_experts;
    g_.local_experts = num_experts / world;
    g_.timeout_ns = timeout_ns;
    int64_t smem = 0;
    route_plan_warps(num_experts, world, &smem);  // throws when E does not fit
    sm_count_ = sm_count(device);
  }

  // slot_of_send: 0, or int32 [num_slots] (the pipelined dispatch needs it).
  void route_plan(Ptr ids, bool ids_int64, int64_t num_slots, int32_t local_flags, Ptr send_pos,
                  Ptr land_index, Ptr slot_of_send, Ptr counts_E, Ptr info, int flags,
                  uint64_t sync_peers, Ptr stream) {
    CudaDeviceGuard guard(device_, "route_plan");
    launch_route_plan(g_, as<const void>(ids), ids_int64, num_slots, local_flags,
                      as<int32_t>(send_pos), as<int32_t>(land_index), as<int32_t>(slot_of_send),
                      as<int64_t>(counts_E), as<int64_t>(info), flags, sync_peers, sm_count_,
                      stream_of(stream));
  }

  // The pipelined dispatch (rdep_stream.cu): scatter_slots + unpack in one kernel; phase_R gets
  // each row's token phase. num_rows: rows the outputs hold.
  void dispatch_stream(Ptr ids, bool ids_int64, int64_t num_slots, int64_t num_tokens,
                       int top_k, Ptr send_pos, Ptr land_index, Ptr slot_of_send, Ptr src0,
                       int64_t stride0, int64_t bytes0, Ptr src1, int64_t stride1, int64_t bytes1,
                       Ptr gates, Ptr info, bool dedup, Ptr head_N, int64_t num_rows, Ptr out0,
                       Ptr out1, Ptr gates_R, Ptr src_rank_R, Ptr ret_index_R, Ptr land_row_R,
                       Ptr chain_R, Ptr head_R, Ptr row_of_land, Ptr phase_R, int phases,
                       bool direct, int blocks_per_sm, int send_percent, int chunk_rows,
                       Ptr stream) {
    CudaDeviceGuard guard(device_, "dispatch_stream");
    DispatchStreamArgs a{};
    a.ids = as<const void>(ids);
    a.ids_int64 = ids_int64;
    a.num_slots = num_slots;
    a.num_tokens = num_tokens;
    a.top_k = top_k;
    a.send_pos = as<const int32_t>(send_pos);
    a.land_index = as<const int32_t>(land_index);
    a.slot_of_send = as<const int32_t>(slot_of_send);
    a.p0 = Payload{as<const char>(src0), stride0, bytes0};
    a.p1 = Payload{as<const char>(src1), stride1, bytes1};
    a.gates = as<const float>(gates);
    a.info = as<const int64_t>(info);
    a.dedup = dedup;
    a.head_N = as<int32_t>(head_N);
    a.max_rows = num_rows;
    a.out0 = as<char>(out0);
    a.out1 = as<char>(out1);
    a.gates_R = as<float>(gates_R);
    a.src_rank_R = as<int32_t>(src_rank_R);
    a.ret_index_R = as<int32_t>(ret_index_R);
    a.land_row_R = as<int32_t>(land_row_R);
    a.chain_R = as<int32_t>(chain_R);
    a.head_R = as<int32_t>(head_R);
    a.row_of_land = as<int32_t>(row_of_land);
    a.phase_R = as<int32_t>(phase_R);
    a.phases = phases;
    a.chunk_rows = chunk_rows;
    a.direct = direct;
    launch_dispatch_stream(g_, a, blocks_per_sm, send_percent, sm_count_, stream_of(stream));
  }

  // The pipelined combine: return_rows + reduce_slots in one kernel (num_tokens 0: reduce none;
  // phase_tokens: T of the dispatch).
  void combine_stream(int dtype, int64_t num_rows, Ptr num_rows_dev, int64_t hidden, Ptr rows,
                      Ptr src_rank_R, Ptr ret_index_R, Ptr phase_R, int phases,
                      int64_t num_tokens, int64_t phase_tokens, int top_k, Ptr send_pos,
                      Ptr gates, Ptr out, int blocks_per_sm, int send_percent, Ptr stream) {
    CudaDeviceGuard guard(device_, "combine_stream");
    CombineStreamArgs a{};
    a.dtype = row_dtype(dtype, "row");
    a.max_rows = num_rows;
    a.num_rows_dev = as<const int64_t>(num_rows_dev);
    a.hidden = hidden;
    a.rows = as<const void>(rows);
    a.src_rank_R = as<const int32_t>(src_rank_R);
    a.ret_index_R = as<const int32_t>(ret_index_R);
    a.phase_R = as<const int32_t>(phase_R);
    a.phases = phases;
    a.num_tokens = num_tokens;
    a.phase_tokens = phase_tokens;
    a.top_k = top_k;
    a.send_pos = as<const int32_t>(send_pos);
    a.gates = as<const float>(gates);
    a.out = as<void>(out);
    launch_combine_stream(g_, a, blocks_per_sm, send_percent, sm_count_, stream_of(stream));
  }

  void scatter_slots(Ptr ids, bool ids_int64, int64_t num_slots, int top_k, Ptr send_pos,
                     Ptr land_index, Ptr src0, int64_t stride0, int64_t bytes0, Ptr src1,
                     int64_t stride1, int64_t bytes1, Ptr gates, Ptr info, bool dedup,
                     Ptr head_N, uint64_t sync_peers, Ptr stream) {
    CudaDeviceGuard guard(device_, "scatter_slots");
    launch_scatter_slots(g_, as<const void>(ids), ids_int64, num_slots, top_k,
                         as<const int32_t>(send_pos), as<const int32_t>(land_index),
                         Payload{as<const char>(src0), stride0, bytes0},
                         Payload{as<const char>(src1), stride1, bytes1}, as<const float>(gates),
                         as<const int64_t>(info), dedup, as<int32_t>(head_N), sync_peers,
                         sm_count_, stream_of(stream));
  }

  // num_rows_dev (0 or a device int64): sync-free dispatch, walk min(num_rows, *num_rows_dev).
  void unpack(int64_t num_rows, Ptr num_rows_dev, bool dedup, Ptr out0, int64_t bytes0,
              Ptr out1, int64_t bytes1, Ptr gates_R, Ptr src_rank_R, Ptr ret_index_R,
              Ptr land_row_R, Ptr chain_R, Ptr head_R, Ptr row_of_land, Ptr stream) {
    CudaDeviceGuard guard(device_, "unpack");
    launch_unpack(g_, num_rows, as<const int64_t>(num_rows_dev), dedup, as<char>(out0), bytes0,
                  as<char>(out1), bytes1,
                  as<float>(gates_R), as<int32_t>(src_rank_R), as<int32_t>(ret_index_R),
                  as<int32_t>(land_row_R), as<int32_t>(chain_R), as<int32_t>(head_R),
                  as<int32_t>(row_of_land), sm_count_, stream_of(stream));
  }

  // Partial sums on the owner: gates_R 0 for the plain sum (dispatch_backward).
  void owner_reduce(int dtype, int64_t num_rows, Ptr num_rows_dev, int64_t hidden, Ptr rows,
                    Ptr gates_R, Ptr src_rank_R, Ptr ret_index_R, Ptr chain_R, Ptr head_R,
                    Ptr row_of_land, int top_k, uint64_t sync_peers, Ptr stream) {
    CudaDeviceGuard guard(device_, "owner_reduce");
    launch_owner_reduce(g_, row_dtype(dtype, "row"), num_rows, as<const int64_t>(num_rows_dev),
                        hidden, as<const void>(rows), as<const float>(gates_R),
                        as<const int32_t>(src_rank_R), as<const int32_t>(ret_index_R),
                        as<const int32_t>(chain_R), as<const int32_t>(head_R),
                        as<const int32_t>(row_of_land), top_k, sync_peers, sm_count_,
                        stream_of(stream));
  }

  void return_rows(int64_t num_rows, Ptr num_rows_dev, Ptr rows, int64_t row_bytes,
                   Ptr src_rank_R, Ptr ret_index_R, Ptr land_row_R, uint64_t sync_peers, Ptr stream) {
    CudaDeviceGuard guard(device_, "return_rows");
    launch_return_rows(g_, num_rows, as<const int64_t>(num_rows_dev), as<const char>(rows),
                       row_bytes,
                       as<const int32_t>(src_rank_R), as<const int32_t>(ret_index_R),
                       as<const int32_t>(land_row_R), sync_peers, sm_count_, stream_of(stream));
  }

  void reduce_slots(int dtype, int64_t num_tokens, int top_k, int64_t hidden, Ptr send_pos,
                    Ptr gates, Ptr head_N, Ptr out, Ptr stream) {
    CudaDeviceGuard guard(device_, "reduce_slots");
    launch_reduce_slots(g_, row_dtype(dtype, "row"), num_tokens, top_k, hidden,
                        as<const int32_t>(send_pos), as<const float>(gates),
                        as<const int32_t>(head_N), as<void>(out), sm_count_, stream_of(stream));
  }

  void owner_grad(int y_dtype, int grad_out_dtype, int64_t num_rows, Ptr num_rows_dev,
                  int64_t hidden, Ptr y, Ptr src_rank_R, Ptr ret_index_R, Ptr land_row_R,
                  Ptr grad_y, uint64_t sync_peers, Ptr stream) {
    CudaDeviceGuard guard(device_, "owner_grad");
    launch_owner_grad(g_, row_dtype(y_dtype, "y"), row_dtype(grad_out_dtype, "grad_out"),
                      num_rows, as<const int64_t>(num_rows_dev), hidden, as<const void>(y), as<const int32_t>(src_rank_R),
                      as<const int32_t>(ret_index_R), as<const int32_t>(land_row_R),
                      as<void>(grad_y), sync_peers, sm_count_, stream_of(stream));
  }

  void gather_dots(int64_t num_slots, Ptr send_pos, Ptr out, Ptr stream) {
    CudaDeviceGuard guard(device_, "gather_dots");
    launch_gather_dots(g_, num_slots, as<const int32_t>(send_pos), as<float>(out),
                       stream_of(stream));
  }

  void barrier(uint64_t sync_peers, Ptr stream) {
    CudaDeviceGuard guard(device_, "barrier");
    launch_barrier(g_, sync_peers, stream_of(stream));
  }

 private:
  int device_;
  int sm_count_ = 0;
  Layout g_{};
};

}  // namespace
}  // namespace nmoe::comm
#endif  // NMOE_WITH_CUDA

PYBIND11_MODULE(_C, m) {
  m.doc() = "nmoe-comm compiled transport (CUDA IPC, RDEP kernels); see nmoe_comm.rdep";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("WITH_CUDA") = static_cast<bool>(NMOE_WITH_CUDA);
  m.attr("CUDA_ARCHS") = NMOE_CUDA_ARCHS;
#if NMOE_WITH_CUDA
  using namespace nmoe::comm;
  m.def("device_count", [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return count;
  });
  m.def("alloc", &alloc, py::arg("device"), py::arg("nbytes"));
  m.def("free", &free_device, py::arg("device"), py::arg("ptr"));
  m.def("ipc_handle", &ipc_handle, py::arg("device"), py::arg("ptr"));
  m.def("ipc_open", &ipc_open, py::arg("device"), py::arg("handle"));
  m.def("ipc_close", &ipc_close, py::arg("device"), py::arg("ptr"));
  m.def("can_access_peer", &can_access_peer, py::arg("device"), py::arg("peer"));
  m.def("sm_count", &sm_count, py::arg("device"));
  m.def("sum_slots", &sum_slots, py::arg("device"), py::arg("dtype"), py::arg("num_tokens"),
        py::arg("top_k"), py::arg("hidden"), py::arg("rows"), py::arg("row_of_slot"),
        py::arg("gates"), py::arg("out"), py::arg("stream"));
  m.attr("ROUTE") = static_cast<int>(kRoute);
  m.attr("EXCHANGE") = static_cast<int>(kExchange);
  m.attr("PLAN") = static_cast<int>(kPlan);
  m.attr("TRAILER_BYTES") = kTrailerBytes;
  m.attr("MAX_RANKS") = kMaxRanks;
  m.attr("STREAM_FLAG_ROWS") = kStreamFlagRows;
  m.attr("STREAM_PHASES_MAX") = kStreamPhasesMax;
  m.attr("COUNTER_WORDS") = kCounterWords;
  m.attr("STREAM_CHUNK_ROWS_MAX") = kStreamChunkRowsMax;
  py::class_<Rdep>(m, "Rdep")
      .def(py::init<int, int, int, int, int64_t, int64_t, Ptr, Ptr, Ptr, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t, uint64_t>(),
           py::arg("device"), py::arg("rank"), py::arg("world"), py::arg("num_experts"),
           py::arg("capacity"), py::arg("max_send_rows"), py::arg("peer_bases"),
           py::arg("local_base"), py::arg("stage"), py::arg("signal_off"),
           py::arg("counter_off"), py::arg("counts_off"), py::arg("counts_src_off"),
           py::arg("recv_off"), py::arg("recv_stride"), py::arg("ret_off"),
           py::arg("ret_stride"), py::arg("dots_off"), py::arg("dflags_off"),
           py::arg("cflags_off"), py::arg("dflag_chunks"), py::arg("view_off"),
           py::arg("timeout_ns"))
      .def("route_plan", &Rdep::route_plan)
      .def("scatter_slots", &Rdep::scatter_slots)
      .def("unpack", &Rdep::unpack)
      .def("return_rows", &Rdep::return_rows)
      .def("reduce_slots", &Rdep::reduce_slots)
      .def("owner_reduce", &Rdep::owner_reduce)
      .def("owner_grad", &Rdep::owner_grad)
      .def("gather_dots", &Rdep::gather_dots)
      .def("dispatch_stream", &Rdep::dispatch_stream)
      .def("combine_stream", &Rdep::combine_stream)
      .def("barrier", &Rdep::barrier);
#endif
}
