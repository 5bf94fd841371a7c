// Host launchers for routing data movement (sm90_permute.cu): permute rows into
// expert-contiguous order, gather rows, unpermute with gate weighting.
//
// Plain C++ types only, so the binding TU needs no CUDA headers. Arguments are validated by the
// caller (permute_api.cpp); the launchers select the device, launch on `stream` and throw
// std::runtime_error on any CUDA error. Row data is moved as raw bytes.
#pragma once

#include <cstdint>

namespace nmoe::permute {

// Slots per chunk of the counting sort (one CTA each) and the largest supported expert count
// (one shared-memory counter per warp and bucket must fit in 48 KiB).
constexpr int64_t kChunkSlots = 2048;
constexpr int64_t kMaxExperts = 1024;

// int32 entries of the permute workspace for `num_slots` = T * K routed slots: per-chunk counts
// of each expert bucket (plus one bucket for ids outside [0, num_experts)).
inline int64_t permute_workspace_numel(int64_t num_slots, int64_t num_experts) {
  return (num_experts + 1) * ((num_slots + kChunkSlots - 1) / kChunkSlots);
}

// Stable counting sort of the T * K slots by expert, then gather of the token rows.
// x: [num_tokens, row_bytes] bytes (16-byte aligned); expert_ids: [num_tokens, top_k] int32
// (ids_are_int64 false) or int64. Writes x_out [T * K, row_bytes], counts [num_experts] int64,
// src_index [T * K] int64 (slot t * K + k of each row). Ids outside [0, num_experts) go after the
// last expert's rows (in slot order) and are not counted. workspace: permute_workspace_numel int32.
void launch_permute(const void* x, const void* expert_ids, bool ids_are_int64, int64_t num_tokens,
                    int64_t top_k, int64_t row_bytes, int64_t num_experts, void* x_out,
                    int64_t* counts, int64_t* src_index, int32_t* workspace, int device,
                    std::uintptr_t stream);

// out[r] = x[index[r] / divisor] for r < num_out_rows (rows of row_bytes bytes, 16-byte aligned
// bases); rows whose source lies outside [0, num_src_rows) are written as zeros.
void launch_gather_rows(const void* x, int64_t num_src_rows, int64_t row_bytes, const void* index,
                        bool index_is_int64, int64_t divisor, void* out, int64_t num_out_rows,
                        int device, std::uintptr_t stream);

// out[t] = sum over k = 0..K-1 of the slots present in src_index, in order, of
// gates[t, k] * y[row of slot t * K + k] (fp32, each product and sum rounded separately), cast to
// out's dtype; zeros for a token without rows. y: [num_rows, hidden] bf16 or fp32; gates:
// [num_tokens, top_k] fp32; out: [num_tokens, hidden] bf16 or fp32. workspace: T * K int32.
// src_index values outside [0, T * K) are ignored; a repeated value leaves one of its rows.
void launch_unpermute(const void* y, bool y_is_bf16, int64_t num_rows, int64_t hidden,
                      const void* src_index, bool index_is_int64, const float* gates,
                      int64_t num_tokens, int64_t top_k, void* out, bool out_is_bf16,
                      int32_t* workspace, int device, std::uintptr_t stream);

}  // namespace nmoe::permute
