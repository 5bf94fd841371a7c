// FP8 E4M3 blockscaled quantization of weights, one fp32 scale per 128x128 block, optionally
// transposing [E, K, N] -> [E, N, K] (the K-major layout Hopper FP8 WGMMA reads for B).
//
// Rule (bit-identical to nmoe_kernels.reference.quantize_fp8_128x128): amax = max |w| over the
// block (as float32; a partial last block row covers only the rows that exist), then the scale
// rule of fp8_scale.cuh.
//
// One CTA of 256 threads owns one 128x128 block of the source matrix. Each thread issues all of
// its 16-byte loads first (8 for bf16, 16 for fp32; a warp reads 512 contiguous bytes per load)
// and keeps them in registers; the CTA reduces amax (xor-shuffles, then shared memory), and each
// thread converts its own elements.
//  - plain: the 8 (bf16) or 4 (fp32) E4M3 bytes of each load go straight to the same place in
//    w_fp8.
//  - transposed: the bytes go to a 128x128-byte shared tile [k][n], 32 words per k row, word w
//    of row k stored at w ^ 4 * ((k / 16) % 8) (an XOR swizzle that keeps the row writes and the
//    column reads below conflict-free). Then each thread reads a 16(k) x 4(n) byte patch as 16
//    words, transposes it with byte permutes, and writes 4 rows of w_fp8 [E, N, K] with one
//    16-byte store each; the 8 lanes of a row cover its 128 bytes, so each store instruction of a
//    warp writes 4 full 128-byte segments.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../cuda_check.h"
#include "fp8_quant_128x128.h"
#include "fp8_scale.cuh"

namespace nmoe::quant {
namespace {

constexpr int kTile = 128;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Bytes i of words a, b, c, d (i in 0..3) as one word: a's byte lowest.
__device__ __forceinline__ uint32_t byte_column(uint32_t a, uint32_t b, uint32_t c, uint32_t d,
                                                int i) {
  const uint32_t select = static_cast<uint32_t>(i) | (static_cast<uint32_t>(i + 4) << 4);
  return __byte_perm(__byte_perm(a, b, select), __byte_perm(c, d, select), 0x5410);
}

// XOR applied to the word index within tile row k: a multiple of 4 below 32, so it permutes the
// row's words in aligned groups of 4 (keeping 8-byte stores aligned).
__device__ __forceinline__ int tile_swizzle(int k) { return 4 * ((k / 16) % 8); }

template <typename T, bool kUe8m0, bool kTranspose>
__global__ void __launch_bounds__(kThreads)
    fp8_quant_128x128_kernel(const T* __restrict__ src, uint8_t* __restrict__ dst,
                             float* __restrict__ scales, int64_t src_rows, int64_t src_cols) {
  constexpr int kVec = 16 / sizeof(T);                     // elements per 16-byte load
  constexpr int kLanesPerRow = kTile / kVec;               // 16 (bf16) or 32 (fp32)
  constexpr int kRowsPerPass = kThreads / kLanesPerRow;    // 16 or 8
  constexpr int kPasses = kTile / kRowsPerPass;            // 8 or 16 loads per thread
  constexpr int kWords = kVec / 4;                         // E4M3 words per load: 2 or 1
  static_assert(kVec % 4 == 0 && kTile % kRowsPerPass == 0);

  const int64_t mat = blockIdx.z;
  const int64_t row_block = blockIdx.y;
  const int64_t col_block = blockIdx.x;
  const int col_lane = threadIdx.x % kLanesPerRow;
  const int row_in_pass = threadIdx.x / kLanesPerRow;
  const int64_t col = col_block * kTile + col_lane * kVec;
  // src_cols is a multiple of kVec, so a load is either entirely inside or entirely outside.
  const bool col_ok = col < src_cols;
  const int64_t first_row = row_block * kTile;
  const int64_t src_base = (mat * src_rows + first_row) * src_cols + col;

  uint4 packed[kPasses];
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int row = p * kRowsPerPass + row_in_pass;
    packed[p] = make_uint4(0u, 0u, 0u, 0u);  // zeros never raise the amax
    if (col_ok && first_row + row < src_rows) {
      packed[p] = __ldg(reinterpret_cast<const uint4*>(src + src_base + row * src_cols));
    }
  }

  uint32_t amax_bits = 0;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const T* elems = reinterpret_cast<const T*>(&packed[p]);
#pragma unroll
    for (int i = 0; i < kVec; ++i) amax_bits = max(amax_bits, abs_bits(to_float(elems[i])));
  }
#pragma unroll
  for (int distance = 16; distance > 0; distance /= 2) {
    amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, distance));
  }
  __shared__ uint32_t warp_amax[kWarps];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_amax[warp] = amax_bits;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) amax_bits = max(amax_bits, warp_amax[w]);

  const float scale = fp8_block_scale<kUe8m0>(amax_bits);
  const float inv_scale = __frcp_rn(scale);
  const int64_t row_blocks = (src_rows + kTile - 1) / kTile;
  const int64_t col_blocks = (src_cols + kTile - 1) / kTile;
  if (threadIdx.x == 0) {
    // Scales index the blocks of w_fp8: [mat, src row block, src col block] in the plain case,
    // [mat, src col block (N), src row block (K)] when transposed.
    const int64_t index = kTranspose ? (mat * col_blocks + col_block) * row_blocks + row_block
                                     : (mat * row_blocks + row_block) * col_blocks + col_block;
    scales[index] = scale;
  }

  uint32_t words[kPasses][kWords];  // E4M3 bytes of each load, element i in byte i % 4
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const T* elems = reinterpret_cast<const T*>(&packed[p]);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = to_float(elems[4 * w + i]);
      words[p][w] = quantize_e4m3x4(v, inv_scale);
    }
  }

  if constexpr (!kTranspose) {
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int row = p * kRowsPerPass + row_in_pass;
      if (!col_ok || first_row + row >= src_rows) continue;
      uint8_t* out = dst + src_base + row * src_cols;
      if constexpr (kWords == 2) {
        *reinterpret_cast<uint2*>(out) = make_uint2(words[p][0], words[p][1]);
      } else {
        *reinterpret_cast<uint32_t*>(out) = words[p][0];
      }
    }
  } else {
    // tile[k][n] as 32 words per k row; k = src row, n = src col within the block.
    __shared__ uint32_t tile[kTile * kTile / 4];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int row = p * kRowsPerPass + row_in_pass;
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        tile[row * (kTile / 4) + ((col_lane * kWords + w) ^ tile_swizzle(row))] = words[p][w];
      }
    }
    __syncthreads();

    // Warp `warp` owns tile words 4 * warp + 0..3 (n = 16 * warp + 0..15); lane = 8 * q + kc
    // reads rows k = 16 * kc + 0..15 of word n_word = 4 * warp + q. The words one read
    // instruction touches sit in banks 4 * (warp ^ kc) + q: all 32 distinct.
    const int k_chunk = lane % 8;
    const int n_word = 4 * warp + lane / 8;
    uint32_t patch[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int k = k_chunk * 16 + j;
      patch[j] = tile[k * (kTile / 4) + (n_word ^ tile_swizzle(k))];
    }
    // dst is [mat, N = src_cols, K = src_rows].
    const int64_t k0 = first_row + k_chunk * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = col_block * kTile + n_word * 4 + i;
      if (n >= src_cols) continue;
      uint4 out;
      out.x = byte_column(patch[0], patch[1], patch[2], patch[3], i);
      out.y = byte_column(patch[4], patch[5], patch[6], patch[7], i);
      out.z = byte_column(patch[8], patch[9], patch[10], patch[11], i);
      out.w = byte_column(patch[12], patch[13], patch[14], patch[15], i);
      *reinterpret_cast<uint4*>(dst + (mat * src_cols + n) * src_rows + k0) = out;
    }
  }
}

}  // namespace

void launch_fp8_quant_128x128(const void* w, bool w_is_bf16, void* w_fp8, float* scales,
                              int64_t num_mats, int64_t src_rows, int64_t src_cols, bool transpose,
                              bool ue8m0, int device, std::uintptr_t stream) {
  constexpr const char* kOp = "quantize_fp8_128x128";
  if (num_mats == 0 || src_rows == 0 || src_cols == 0) return;
  const int64_t row_blocks = (src_rows + kTile - 1) / kTile;
  const int64_t col_blocks = (src_cols + kTile - 1) / kTile;
  if (row_blocks > kMaxGridYZ || num_mats > kMaxGridYZ || col_blocks > INT32_MAX) {
    throw std::runtime_error(std::string(kOp) + ": grid too large (" + std::to_string(num_mats) +
                             " x " + std::to_string(row_blocks) + " x " +
                             std::to_string(col_blocks) + " blocks)");
  }
  CudaDeviceGuard guard(device, kOp);
  auto* out = static_cast<uint8_t*>(w_fp8);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(num_mats));

  auto launch = [&](auto elem, auto ue8m0_tag, auto transpose_tag) {
    using T = decltype(elem);
    const auto kernel =
        fp8_quant_128x128_kernel<T, decltype(ue8m0_tag)::value, decltype(transpose_tag)::value>;
    kernel<<<grid, kThreads, 0, cuda_stream>>>(static_cast<const T*>(w), out, scales, src_rows,
                                               src_cols);
  };
  auto with_transpose = [&](auto elem, auto ue8m0_tag) {
    if (transpose) {
      launch(elem, ue8m0_tag, std::true_type{});
    } else {
      launch(elem, ue8m0_tag, std::false_type{});
    }
  };
  auto with_ue8m0 = [&](auto elem) {
    if (ue8m0) {
      with_transpose(elem, std::true_type{});
    } else {
      with_transpose(elem, std::false_type{});
    }
  };
  if (w_is_bf16) {
    with_ue8m0(__nv_bfloat16{});
  } else {
    with_ue8m0(float{});
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::quant
