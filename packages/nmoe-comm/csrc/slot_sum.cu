// Slot sum of the `local` backend (see slot_sum.h for the exact arithmetic).
//
// Layout of the work: a group of `lanes` threads (a power of two, at most a warp) per token, each
// lane walking the token's row in vectors of kVec elements (16 bytes when hidden and the pointers
// allow). For one vector a lane first issues the loads of up to kSlotBatch slots, then adds them
// in slot order, so K independent loads are in flight instead of one. Gathered rows are read
// once and `out` is written once; the row indices and gates of a token are small and stay in L1.
// Products and sums use __fmul_rn / __fadd_rn so that nvcc cannot contract them into an FMA.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "row_types.cuh"
#include "slot_sum.h"

namespace nmoe::comm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpLanes = 32;
constexpr int kSlotBatch = 8;       // slots whose loads one lane issues before adding them
constexpr int64_t kMaxBlocks = 1 << 20;  // more tokens than blocks * tokens per block: loop

template <typename T, int kVec, bool kGated>
__global__ void __launch_bounds__(kThreads)
    slot_sum_kernel(const T* __restrict__ rows, const int64_t* __restrict__ row_of_slot,
                    const float* __restrict__ gates, T* __restrict__ out, int64_t num_tokens,
                    int top_k, int64_t hidden, int lane_bits) {
  using Vec = Pack<T, kVec>;
  const int64_t num_vecs = hidden / kVec;
  const int lanes = 1 << lane_bits;
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int64_t tokens_per_block = kThreads >> lane_bits;
  const int64_t token_stride = tokens_per_block * gridDim.x;
  for (int64_t t = blockIdx.x * tokens_per_block + (threadIdx.x >> lane_bits); t < num_tokens;
       t += token_stride) {
    const int64_t* slot_rows = row_of_slot + t * top_k;
    const float* slot_gates = kGated ? gates + t * top_k : nullptr;
    Vec* out_row = reinterpret_cast<Vec*>(out + t * hidden);
    for (int64_t v = lane; v < num_vecs; v += lanes) {
      float acc[kVec] = {};
      for (int k0 = 0; k0 < top_k; k0 += kSlotBatch) {
        Vec y[kSlotBatch];
        float gate[kSlotBatch];
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          if (k0 + j < top_k) {
            y[j] = reinterpret_cast<const Vec*>(rows + slot_rows[k0 + j] * hidden)[v];
            if constexpr (kGated) gate[j] = slot_gates[k0 + j];
          }
        }
#pragma unroll
        for (int j = 0; j < kSlotBatch; ++j) {
          if (k0 + j < top_k) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              float term = to_f32(y[j].v[e]);
              if constexpr (kGated) term = __fmul_rn(gate[j], term);
              acc[e] = k0 + j == 0 ? term : __fadd_rn(acc[e], term);  // term_0 itself: -0 kept
            }
          }
        }
      }
      Vec o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o.v[e] = from_f32<T>(acc[e]);
      out_row[v] = o;
    }
  }
}

// Smallest power of two >= num_vecs, at most a warp, as a shift.
int lane_bits_for(int64_t num_vecs) {
  int bits = 0;
  while ((int64_t{1} << bits) < num_vecs && (1 << bits) < kWarpLanes) ++bits;
  return bits;
}

template <typename T, int kVec, bool kGated>
void launch_width(int64_t num_tokens, int top_k, int64_t hidden, const void* rows,
                  const int64_t* row_of_slot, const float* gates, void* out,
                  cudaStream_t stream) {
  const int lane_bits = lane_bits_for(hidden / kVec);
  const int64_t tokens_per_block = kThreads >> lane_bits;
  const int64_t blocks =
      std::min<int64_t>((num_tokens + tokens_per_block - 1) / tokens_per_block, kMaxBlocks);
  slot_sum_kernel<T, kVec, kGated><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(rows), row_of_slot, gates, static_cast<T*>(out), num_tokens, top_k,
      hidden, lane_bits);
}

// The widest access (16, 8 or 4 bytes, else one element) that every row allows: row r starts at
// rows + r * hidden * sizeof(T), so the row pitch and both base pointers must be multiples of it.
// A pitch that is not a multiple of 16 bytes (e.g. hidden = 2050 bf16: 4100 bytes) leaves rows at
// different offsets from a 16-byte boundary, so a wide body plus scalar head/tail per row would
// not line up between the K gathered rows and `out`; such rows use the narrower access instead.
template <typename T, bool kGated>
void launch_typed(int64_t num_tokens, int top_k, int64_t hidden, const void* rows,
                  const int64_t* row_of_slot, const float* gates, void* out,
                  cudaStream_t stream) {
  constexpr int kItem = static_cast<int>(sizeof(T));
  const auto bits = reinterpret_cast<uintptr_t>(rows) | reinterpret_cast<uintptr_t>(out) |
                    static_cast<uintptr_t>(hidden * kItem);
  constexpr int kVec16 = 16 / kItem, kVec8 = 8 / kItem, kVec4 = std::max(1, 4 / kItem);
  const auto launch = (bits & 15) == 0  ? &launch_width<T, kVec16, kGated>
                      : (bits & 7) == 0 ? &launch_width<T, kVec8, kGated>
                      : (bits & 3) == 0 ? &launch_width<T, kVec4, kGated>
                                        : &launch_width<T, 1, kGated>;
  launch(num_tokens, top_k, hidden, rows, row_of_slot, gates, out, stream);
}

template <typename T>
void launch_dtype(int64_t num_tokens, int top_k, int64_t hidden, const void* rows,
                  const int64_t* row_of_slot, const float* gates, void* out,
                  cudaStream_t stream) {
  if (gates != nullptr) {
    launch_typed<T, true>(num_tokens, top_k, hidden, rows, row_of_slot, gates, out, stream);
  } else {
    launch_typed<T, false>(num_tokens, top_k, hidden, rows, row_of_slot, gates, out, stream);
  }
}

}  // namespace

void launch_slot_sum(RowDtype dtype, int64_t num_tokens, int top_k, int64_t hidden,
                     const void* rows, const int64_t* row_of_slot, const float* gates, void* out,
                     cudaStream_t stream) {
  if (num_tokens < 0 || hidden < 0 || top_k < 1) {
    throw std::invalid_argument(
        "nmoe_comm sum_slots: need num_tokens >= 0, hidden >= 0 and top_k >= 1, got " +
        std::to_string(num_tokens) + ", " + std::to_string(hidden) + ", " +
        std::to_string(top_k));
  }
  if (num_tokens == 0 || hidden == 0) return;
  switch (dtype) {
    case kF32:
      launch_dtype<float>(num_tokens, top_k, hidden, rows, row_of_slot, gates, out, stream);
      break;
    case kBF16:
      launch_dtype<__nv_bfloat16>(num_tokens, top_k, hidden, rows, row_of_slot, gates, out,
                                  stream);
      break;
    case kF16:
      launch_dtype<__half>(num_tokens, top_k, hidden, rows, row_of_slot, gates, out, stream);
      break;
  }
  NMOE_CUDA_CHECK_LAUNCH("sum_slots");
}

}  // namespace nmoe::comm
