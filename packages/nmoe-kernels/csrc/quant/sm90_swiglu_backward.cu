// The gated SwiGLU backward of the fused MoE expert MLP in one memory-bound pass.
//
// Per row r (gate_r = gates[r]) and feature j, with g = h[r, 2j], u = h[r, 2j+1] and
// d = da[r, j] read from bf16, in float32 with every operation rounded on its own (__f*_rn, no
// FMA contraction; bit-identical to nmoe_kernels.reference.swiglu_backward_gated evaluated on a
// GPU, where torch.exp is the same full-precision expf):
//   s    = 1 / (1 + expf(-g))            sigmoid
//   silu = g * s;  a = silu * u          the forward activation
//   dA   = gate_r * d                    the gated activation gradient
//   ds   = s * (1 + g * (1 - s))         silu'(g)
//   dh[r, 2j] = (dA * u) * ds;  dh[r, 2j+1] = dA * silu;  ag[r, j] = gate_r * a   (to bf16, RNE)
//   dgate[r]  = sum_j a * d              (float32, in the fixed order below)
// With dh_fp8 set, the bf16 dh is also quantized to FP8 E4M3 with one scale per 1x128 block
// along 2F by the rule of fp8_scale.cuh, i.e. exactly quantize_fp8_1x128(dh_bf16).
//
// Work split: one warp owns one row at a time (grid-stride over rows). Lane l owns the chunks of
// 8 consecutive features c = 32 * i + l (i = 0, 1, ...): two 16-byte loads of h (16 bf16: 8
// gate/up pairs) and one of da per chunk, one 16-byte store of ag and two of dh (one of dh_fp8).
// A 1x128 block of dh is 64 features = 8 chunks = 8 adjacent lanes, so its amax is a 3-step
// xor-shuffle inside the 8-lane group.
//
// dgate reduction order (fixed; it depends on neither the grid nor the block size): lane l sums
// a * d over its chunks in increasing c, and inside a chunk over its 8 features in increasing j,
// starting from +0 (acc = acc + a * d, two roundings per term); then the 32 lane sums are
// combined as v[i] = v[i] + v[i + w] for w = 16, 8, 4, 2, 1 (an xor butterfly; float addition
// is commutative, so every lane ends with the same value) and v[0] is dgate[r].
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../cuda_check.h"
#include "fp8_scale.cuh"
#include "swiglu_backward_gated.h"

namespace nmoe::quant {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;             // features per lane and step
constexpr int kChunksPerBlock = 8;    // 1x128 block of dh = 64 features = 8 chunks
constexpr int kCtasPerSm = 8;         // grid cap for the grid-stride loop (64 warps per SM)

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

template <bool kQuant, bool kUe8m0, bool kMnMajor>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_gated_kernel(const __nv_bfloat16* __restrict__ h,
                                 const __nv_bfloat16* __restrict__ da,
                                 const float* __restrict__ gates, __nv_bfloat16* __restrict__ dh,
                                 __nv_bfloat16* __restrict__ ag, float* __restrict__ dgate,
                                 uint8_t* __restrict__ dh_fp8, float* __restrict__ dh_scales,
                                 int64_t num_rows, int64_t num_features, int64_t scales_ld) {
  const int lane = threadIdx.x % 32;
  const int64_t num_chunks = num_features / kChunk;  // a multiple of 16 (F % 128 == 0)
  const int64_t num_dh_blocks = num_features / 64;   // 1x128 blocks of a dh row
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;

  for (int64_t row = first_warp; row < num_rows; row += warp_stride) {  // warp-uniform
    const float gate_r = __ldg(gates + row);
    const uint4* h_row = reinterpret_cast<const uint4*>(h + row * 2 * num_features);
    const uint4* da_row = reinterpret_cast<const uint4*>(da + row * num_features);
    uint4* dh_row = reinterpret_cast<uint4*>(dh + row * 2 * num_features);
    uint4* ag_row = reinterpret_cast<uint4*>(ag + row * num_features);
    float acc = 0.0f;

    for (int64_t base = 0; base < num_chunks; base += 32) {  // warp-uniform
      const int64_t chunk = base + lane;
      if (chunk >= num_chunks) break;  // the tail step has 16 active lanes: whole 8-lane groups
      const uint4 h_lo = __ldg(h_row + 2 * chunk);      // features 8c .. 8c+3 (gate, up pairs)
      const uint4 h_hi = __ldg(h_row + 2 * chunk + 1);  // features 8c+4 .. 8c+7
      const uint4 d_v = __ldg(da_row + chunk);          // da of features 8c .. 8c+7
      const uint32_t hw[8] = {h_lo.x, h_lo.y, h_lo.z, h_lo.w, h_hi.x, h_hi.y, h_hi.z, h_hi.w};
      const uint32_t dw[4] = {d_v.x, d_v.y, d_v.z, d_v.w};

      uint32_t dh_words[8];
      uint32_t ag_words[4];
      float ag_pair[2];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float g = bf16_lo(hw[i]);
        const float u = bf16_hi(hw[i]);
        const float d = (i % 2 == 0) ? bf16_lo(dw[i / 2]) : bf16_hi(dw[i / 2]);
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
        const float silu = __fmul_rn(g, s);
        const float a = __fmul_rn(silu, u);
        const float d_act = __fmul_rn(gate_r, d);
        const float dsilu = __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s))));
        dh_words[i] = pack_bf16x2(__fmul_rn(__fmul_rn(d_act, u), dsilu), __fmul_rn(d_act, silu));
        ag_pair[i % 2] = __fmul_rn(gate_r, a);
        if (i % 2 == 1) ag_words[i / 2] = pack_bf16x2(ag_pair[0], ag_pair[1]);
        acc = __fadd_rn(acc, __fmul_rn(a, d));
      }
      dh_row[2 * chunk] = make_uint4(dh_words[0], dh_words[1], dh_words[2], dh_words[3]);
      dh_row[2 * chunk + 1] = make_uint4(dh_words[4], dh_words[5], dh_words[6], dh_words[7]);
      ag_row[chunk] = make_uint4(ag_words[0], ag_words[1], ag_words[2], ag_words[3]);

      if constexpr (kQuant) {
        float v[16];
        uint32_t amax_bits = 0;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          v[2 * i] = bf16_lo(dh_words[i]);
          v[2 * i + 1] = bf16_hi(dh_words[i]);
          amax_bits = max(amax_bits, max(abs_bits(v[2 * i]), abs_bits(v[2 * i + 1])));
        }
        const int64_t active = num_chunks - base < 32 ? num_chunks - base : 32;  // 16 or 32
        const unsigned mask = active == 32 ? 0xFFFFFFFFu : 0x0000FFFFu;
#pragma unroll
        for (int distance = 1; distance < kChunksPerBlock; distance *= 2) {
          amax_bits = max(amax_bits, __shfl_xor_sync(mask, amax_bits, distance));
        }
        const float scale = fp8_block_scale<kUe8m0>(amax_bits);
        const float inv_scale = __frcp_rn(scale);
        reinterpret_cast<uint4*>(dh_fp8 + row * 2 * num_features)[chunk] =
            make_uint4(quantize_e4m3x4(v, inv_scale), quantize_e4m3x4(v + 4, inv_scale),
                       quantize_e4m3x4(v + 8, inv_scale), quantize_e4m3x4(v + 12, inv_scale));
        if (chunk % kChunksPerBlock == 0) {
          const int64_t block = chunk / kChunksPerBlock;
          if constexpr (kMnMajor) {
            dh_scales[block * scales_ld + row] = scale;
          } else {
            dh_scales[row * num_dh_blocks + block] = scale;
          }
        }
      }
    }

#pragma unroll
    for (int distance = 16; distance > 0; distance /= 2) {
      acc = __fadd_rn(acc, __shfl_xor_sync(0xFFFFFFFFu, acc, distance));
    }
    if (lane == 0) dgate[row] = acc;

    if constexpr (kQuant && kMnMajor) {
      if (row == num_rows - 1) {  // zero the TMA pad columns [num_rows, scales_ld) of each block
        const int64_t pad = scales_ld - num_rows;
        for (int64_t i = lane; i < pad * num_dh_blocks; i += 32) {
          dh_scales[(i / pad) * scales_ld + num_rows + i % pad] = 0.0f;
        }
      }
    }
  }
}

}  // namespace

void launch_swiglu_backward_gated(const void* h, const void* da, const float* gates, void* dh,
                                  void* ag, float* dgate, void* dh_fp8, float* dh_scales,
                                  int64_t num_rows, int64_t num_features, bool scales_mn_major,
                                  int64_t scales_ld, bool ue8m0, int device,
                                  std::uintptr_t stream) {
  constexpr const char* kOp = "swiglu_backward_gated";
  if (num_rows == 0) return;
  CudaDeviceGuard guard(device, kOp);
  int num_sms = 0;
  NMOE_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), kOp);
  const int64_t num_ctas =
      std::min<int64_t>((num_rows + kWarps - 1) / kWarps, static_cast<int64_t>(num_sms) * kCtasPerSm);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);

  auto launch = [&](auto quant_tag, auto ue8m0_tag, auto mn_major_tag) {
    const auto kernel =
        swiglu_backward_gated_kernel<decltype(quant_tag)::value, decltype(ue8m0_tag)::value,
                                     decltype(mn_major_tag)::value>;
    kernel<<<static_cast<unsigned>(num_ctas), kThreads, 0, cuda_stream>>>(
        static_cast<const __nv_bfloat16*>(h), static_cast<const __nv_bfloat16*>(da), gates,
        static_cast<__nv_bfloat16*>(dh), static_cast<__nv_bfloat16*>(ag), dgate,
        static_cast<uint8_t*>(dh_fp8), dh_scales, num_rows, num_features, scales_ld);
  };
  if (dh_fp8 == nullptr) {
    launch(std::false_type{}, std::false_type{}, std::false_type{});
  } else if (ue8m0) {
    if (scales_mn_major) {
      launch(std::true_type{}, std::true_type{}, std::true_type{});
    } else {
      launch(std::true_type{}, std::true_type{}, std::false_type{});
    }
  } else if (scales_mn_major) {
    launch(std::true_type{}, std::false_type{}, std::true_type{});
  } else {
    launch(std::true_type{}, std::false_type{}, std::false_type{});
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::quant
