// Multi-tensor AdamW step: every tensor of an optimizer group in one launch, float32 parameters
// and gradients, moments in float32 or bfloat16, the gradient-clipping factor read on the device.
//
// Per element, in float32 (the operations of nmoe_kernels.reference.adamw_step_, which follows
// torch's single-tensor AdamW):
//   g  = grad * coef                                  (coef = *grad_coef, or no multiply)
//   p  = p * decay                                    decay = 1 - lr * wd
//   m  = m + (1 - b1) * (g - m)                       torch's lerp for a weight below 0.5
//   v  = v * b2 + (1 - b2) * g * g
//   p  = p + neg_step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps))
//   store p; store m, v (rounded to nearest even when the moments are bfloat16)
//   store bf16(p) into the tensor's low-precision copy, when the table names one (round to
//   nearest even, as torch's .to(torch.bfloat16)): a training step's bf16 weight copy is then
//   written by the update instead of by a separate cast that reads p again
// Without fast-math sqrt and division are IEEE; nvcc may still contract a multiply-add into an
// FMA, so a result can differ from the CPU reference in its last bit or two (the GPU tests bound
// this per element). The parameter update uses this step's unrounded m and v.
//
// Work split: the Python wrapper cuts tensor t into ceil(numel_t / kAdamwBlockElems) chunks, one
// CTA each, and writes the index of each tensor's first CTA into the table; a CTA finds its
// tensor by binary search over that column (a few hundred rows, read through L1). 256 threads
// each take 4 consecutive elements per iteration: 16-byte float32 and 8-byte bfloat16 vector
// accesses when every pointer of the tensor allows them, scalar accesses otherwise and for the
// last numel % 4 elements. Every byte is read and written once: 28 bytes per parameter with
// float32 moments, 20 with bfloat16 (torch's fused AdamW: 28, and 32 when it writes back the
// scaled gradients), plus 2 per parameter that has a bf16 copy (a separate cast: 6).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_check.h"
#include "adamw.h"

namespace nmoe::optim {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
static_assert(kAdamwBlockElems % (kThreads * kVec) == 0, "a CTA's chunk is whole vector rounds");

template <typename M>
struct MomentIO;

template <>
struct MomentIO<float> {
  static __device__ __forceinline__ float load(const float* ptr) { return *ptr; }
  static __device__ __forceinline__ void store(float* ptr, float x) { *ptr = x; }
  static __device__ __forceinline__ void load4(const float* ptr, float (&x)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(ptr);
    x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
  }
  static __device__ __forceinline__ void store4(float* ptr, const float (&x)[4]) {
    *reinterpret_cast<float4*>(ptr) = make_float4(x[0], x[1], x[2], x[3]);
  }
  static constexpr int kVecBytes = 16;
};

template <>
struct MomentIO<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* ptr) {
    return __bfloat162float(*ptr);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* ptr, float x) {
    *ptr = __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ void load4(const __nv_bfloat16* ptr, float (&x)[4]) {
    const uint2 q = *reinterpret_cast<const uint2*>(ptr);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&q.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&q.y));
    x[0] = lo.x; x[1] = lo.y; x[2] = hi.x; x[3] = hi.y;
  }
  static __device__ __forceinline__ void store4(__nv_bfloat16* ptr, const float (&x)[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(x[0], x[1]);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(x[2], x[3]);
    uint2 q;
    q.x = *reinterpret_cast<const uint32_t*>(&lo);
    q.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(ptr) = q;
  }
  static constexpr int kVecBytes = 8;
};

struct Element {
  float p, m, v;
};

__device__ __forceinline__ Element update(float p, float g, float m, float v,
                                          const AdamwScalars& s) {
  p = p * s.decay;
  m = m + s.one_minus_beta1 * (g - m);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
  return {p, m, v};
}

__device__ __forceinline__ bool aligned(const void* ptr, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

template <typename M>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const int64_t* __restrict__ table,
                                                         int64_t num_tensors, int cols,
                                                         AdamwScalars s,
                                                         const float* __restrict__ grad_coef) {
  const int64_t block = blockIdx.x;
  // The last row whose first block is <= this block (rows are in block order).
  int64_t lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (__ldg(table + mid * cols + 5) <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * cols;
  float* __restrict__ param = reinterpret_cast<float*>(__ldg(row + 0));
  const float* __restrict__ grad = reinterpret_cast<const float*>(__ldg(row + 1));
  M* __restrict__ exp_avg = reinterpret_cast<M*>(__ldg(row + 2));
  M* __restrict__ exp_avg_sq = reinterpret_cast<M*>(__ldg(row + 3));
  const int64_t numel = __ldg(row + 4);
  __nv_bfloat16* __restrict__ copy =
      cols > kAdamwCopyCol ? reinterpret_cast<__nv_bfloat16*>(__ldg(row + kAdamwCopyCol))
                           : nullptr;
  const int64_t start = (block - __ldg(row + 5)) * kAdamwBlockElems;
  const int64_t end = min(start + kAdamwBlockElems, numel);
  const float coef = grad_coef != nullptr ? __ldg(grad_coef) : 1.0f;
  const bool scaled = grad_coef != nullptr;

  using IO = MomentIO<M>;
  const bool vectorised = aligned(param, 16) && aligned(grad, 16) &&
                          aligned(exp_avg, IO::kVecBytes) && aligned(exp_avg_sq, IO::kVecBytes) &&
                          aligned(copy, 8);
  int64_t scalar_from = start;
  if (vectorised) {
    const int64_t vec_end = start + (end - start) / kVec * kVec;
    for (int64_t i = start + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) {
      const float4 p4 = *reinterpret_cast<const float4*>(param + i);
      const float4 g4 = __ldcs(reinterpret_cast<const float4*>(grad + i));
      float m[4], v[4];
      IO::load4(exp_avg + i, m);
      IO::load4(exp_avg_sq + i, v);
      const float p[4] = {p4.x, p4.y, p4.z, p4.w};
      const float g[4] = {g4.x, g4.y, g4.z, g4.w};
      float out_p[4], out_m[4], out_v[4];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float gk = scaled ? g[k] * coef : g[k];
        const Element e = update(p[k], gk, m[k], v[k], s);
        out_p[k] = e.p; out_m[k] = e.m; out_v[k] = e.v;
      }
      *reinterpret_cast<float4*>(param + i) = make_float4(out_p[0], out_p[1], out_p[2], out_p[3]);
      IO::store4(exp_avg + i, out_m);
      IO::store4(exp_avg_sq + i, out_v);
      if (copy != nullptr) MomentIO<__nv_bfloat16>::store4(copy + i, out_p);
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    const float g = scaled ? grad[i] * coef : grad[i];
    const Element e = update(param[i], g, IO::load(exp_avg + i), IO::load(exp_avg_sq + i), s);
    param[i] = e.p;
    IO::store(exp_avg + i, e.m);
    IO::store(exp_avg_sq + i, e.v);
    if (copy != nullptr) copy[i] = __float2bfloat16_rn(e.p);
  }
}

}  // namespace

void launch_adamw_step(const int64_t* table, int64_t num_tensors, int cols, int64_t num_blocks,
                       bool moments_bf16, const AdamwScalars& scalars, const float* grad_coef,
                       int device, std::uintptr_t stream) {
  constexpr const char* kOp = "adamw_step_";
  if (num_tensors == 0 || num_blocks == 0) return;
  if (num_blocks > 0x7fffffffLL) {
    throw std::runtime_error(std::string(kOp) + ": " + std::to_string(num_blocks) +
                             " blocks exceed the grid limit 2^31 - 1; split the tensor list");
  }
  CudaDeviceGuard guard(device, kOp);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(num_blocks));
  if (moments_bf16) {
    adamw_kernel<__nv_bfloat16><<<grid, kThreads, 0, cuda_stream>>>(table, num_tensors, cols,
                                                                     scalars, grad_coef);
  } else {
    adamw_kernel<float><<<grid, kThreads, 0, cuda_stream>>>(table, num_tensors, cols, scalars,
                                                             grad_coef);
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::optim
