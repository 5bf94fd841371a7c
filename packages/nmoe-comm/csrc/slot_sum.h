// Slot sum of the `local` backend: each token's K gathered rows reduced in slot order.
//
// Letters: T tokens, K slots per token, R rows, D columns. For every token t and column d, in
// float32, slot order k = 0..K-1, every product and every sum rounded on its own (contract rule 2;
// rule 3 without gates):
//   term_k = [gates[t, k] *] float(rows[row_of_slot[t, k], d])
//   acc = term_0; acc = acc + term_k (k >= 1); out[t, d] = round_to_nearest_even(acc)
// bitwise what the torch loop of nmoe_comm/local.py computes (index_select, .to(float32), gate
// product, add, .to(dtype)). One read of each gathered row, one write of `out`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rdep.h"  // RowDtype

namespace nmoe::comm {

// rows:        [R, hidden] of `dtype`, contiguous.
// row_of_slot: int64 [num_tokens, top_k], contiguous, every entry in [0, R) (not checked).
// gates:       float32 [num_tokens, top_k] contiguous, or nullptr for the plain sum.
// out:         [num_tokens, hidden] of `dtype`, contiguous; must not overlap `rows`.
// Any hidden >= 0 and num_tokens >= 0 (nothing is launched for an empty `out`); top_k >= 1.
// Loads and stores are as wide as hidden and the pointers' alignment allow (up to 16 bytes).
void launch_slot_sum(RowDtype dtype, int64_t num_tokens, int top_k, int64_t hidden,
                     const void* rows, const int64_t* row_of_slot, const float* gates, void* out,
                     cudaStream_t stream);

}  // namespace nmoe::comm
