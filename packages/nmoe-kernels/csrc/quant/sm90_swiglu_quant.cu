// SwiGLU of an interleaved W13 GEMM output, quantized to FP8 E4M3 with 1x128 scales along F.
//
// Per output element j of a row (column 2j of h is gate_j, column 2j+1 is up_j), in float32 with
// every operation rounded on its own (bit-identical to
// nmoe_kernels.reference.swiglu_quantize_fp8_1x128 evaluated on a GPU, where torch.exp is expf):
//   silu = __fdiv_rn(gate, __fadd_rn(1, expf(-gate)))
//   y    = __fmul_rn(silu, up)
// then, per block of 128 outputs, the FP8 scale rule of fp8_scale.cuh. The kernel is built
// without fast math, so expf is CUDA's full-precision expf, as in torch.
//
// One warp owns 4 consecutive 1x128 output blocks (256 input columns each) and issues all their
// loads first: per block each lane does one (bf16) or two (fp32) 16-byte loads, a warp load
// covering 512 contiguous bytes, and computes 4 outputs; the warp reduces amax with xor-shuffles
// and each lane stores its 4 (bf16) or 2 + 2 (fp32) E4M3 bytes, coalesced.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../cuda_check.h"
#include "fp8_scale.cuh"
#include "swiglu_quant_fp8_1x128.h"

namespace nmoe::quant {
namespace {

constexpr int kBlockF = 128;  // outputs per scale block (= per warp)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerWarp = 4;  // 1x128 output blocks per warp: 4 loads in flight per lane

__device__ __forceinline__ float swiglu(float gate, float up) {
  const float silu = __fdiv_rn(gate, __fadd_rn(1.0f, expf(-gate)));
  return __fmul_rn(silu, up);
}

template <typename T, bool kUe8m0, bool kMnMajor>
__global__ void __launch_bounds__(kThreads)
    swiglu_quant_fp8_1x128_kernel(const T* __restrict__ h, uint8_t* __restrict__ y_fp8,
                                  float* __restrict__ scales, int64_t num_rows,
                                  int64_t num_features, int64_t scales_ld) {
  constexpr int kVec = 16 / sizeof(T);  // inputs per 16-byte load: 8 (bf16) or 4 (fp32)
  constexpr int kPairs = kVec / 2;      // outputs per load: 4 or 2
  constexpr int kLoads = 4 / kPairs;    // loads per lane and block: 1 or 2 (4 outputs per lane)
  static_assert(kLoads * kPairs * 32 == kBlockF);

  const int64_t num_blocks = num_features / kBlockF;
  const int64_t total_blocks = num_rows * num_blocks;
  // Blocks first_block .. first_block + kBlocksPerWarp - 1 (row-major over (row, block)) are
  // contiguous in h: the warp issues all their loads before any math.
  const int64_t first_block =
      (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * kBlocksPerWarp;
  if (first_block >= total_blocks) return;  // warp-uniform: the shuffles below stay full
  const int lane = threadIdx.x % 32;

  uint4 packed[kBlocksPerWarp][kLoads];
#pragma unroll
  for (int b = 0; b < kBlocksPerWarp; ++b) {
    if (first_block + b >= total_blocks) break;
    const T* in = h + (first_block + b) * 2 * kBlockF;  // rows are contiguous: block-linear
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      packed[b][l] = __ldg(reinterpret_cast<const uint4*>(in + (l * 32 + lane) * kVec));
    }
  }

#pragma unroll
  for (int b = 0; b < kBlocksPerWarp; ++b) {
    const int64_t block = first_block + b;
    if (block >= total_blocks) break;  // warp-uniform
    float y[4];  // outputs (l * 32 + lane) * kPairs + p of the block, at y[l * kPairs + p]
    uint32_t amax_bits = 0;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const T* elems = reinterpret_cast<const T*>(&packed[b][l]);
#pragma unroll
      for (int p = 0; p < kPairs; ++p) {
        const float value = swiglu(to_float(elems[2 * p]), to_float(elems[2 * p + 1]));
        y[l * kPairs + p] = value;
        amax_bits = max(amax_bits, abs_bits(value));
      }
    }
#pragma unroll
    for (int distance = 16; distance > 0; distance /= 2) {
      amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, distance));
    }

    const float scale = fp8_block_scale<kUe8m0>(amax_bits);
    const float inv_scale = __frcp_rn(scale);
    const uint32_t word = quantize_e4m3x4(y, inv_scale);
    uint8_t* out = y_fp8 + block * kBlockF;  // y_fp8 [M, F] is block-linear too
    if constexpr (kLoads == 1) {
      *reinterpret_cast<uint32_t*>(out + lane * 4) = word;
    } else {
      *reinterpret_cast<uint16_t*>(out + lane * 2) = static_cast<uint16_t>(word);
      *reinterpret_cast<uint16_t*>(out + (32 + lane) * 2) = static_cast<uint16_t>(word >> 16);
    }

    if (lane == 0) {
      if constexpr (kMnMajor) {
        const int64_t row = block / num_blocks;
        const int64_t feature_block = block % num_blocks;
        scales[feature_block * scales_ld + row] = scale;
        if (row == num_rows - 1) {
          for (int64_t pad = num_rows; pad < scales_ld; ++pad) {
            scales[feature_block * scales_ld + pad] = 0.0f;
          }
        }
      } else {
        scales[block] = scale;
      }
    }
  }
}

}  // namespace

void launch_swiglu_quant_fp8_1x128(const void* h, bool h_is_bf16, void* y_fp8, float* scales,
                                   int64_t num_rows, int64_t num_features, bool scales_mn_major,
                                   int64_t scales_ld, bool ue8m0, int device,
                                   std::uintptr_t stream) {
  constexpr const char* kOp = "swiglu_quantize_fp8_1x128";
  if (num_rows == 0 || num_features == 0) return;
  CudaDeviceGuard guard(device, kOp);
  auto* out = static_cast<uint8_t*>(y_fp8);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int64_t num_warps = (num_rows * (num_features / kBlockF) + kBlocksPerWarp - 1) /
                            kBlocksPerWarp;
  const int64_t num_ctas = (num_warps + kWarps - 1) / kWarps;

  auto launch = [&](auto elem, auto ue8m0_tag, auto mn_major_tag) {
    using T = decltype(elem);
    const auto kernel = swiglu_quant_fp8_1x128_kernel<T, decltype(ue8m0_tag)::value,
                                                      decltype(mn_major_tag)::value>;
    kernel<<<num_ctas, kThreads, 0, cuda_stream>>>(static_cast<const T*>(h), out, scales,
                                                   num_rows, num_features, scales_ld);
  };
  auto with_layout = [&](auto elem, auto ue8m0_tag) {
    if (scales_mn_major) {
      launch(elem, ue8m0_tag, std::true_type{});
    } else {
      launch(elem, ue8m0_tag, std::false_type{});
    }
  };
  auto with_ue8m0 = [&](auto elem) {
    if (ue8m0) {
      with_layout(elem, std::true_type{});
    } else {
      with_layout(elem, std::false_type{});
    }
  };
  if (h_is_bf16) {
    with_ue8m0(__nv_bfloat16{});
  } else {
    with_ue8m0(float{});
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::quant
