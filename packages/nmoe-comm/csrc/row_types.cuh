// Device helpers for the row dtypes of nmoe_comm._C (float32, bfloat16, float16): conversion to
// float32 and back with round-to-nearest-even (what torch's `.to()` does), and `Pack`, the
// aligned vector of elements one load or store moves.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nmoe::comm {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

// kVec elements of T moved by one access of sizeof(T) * kVec bytes (a power of two, <= 16).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

}  // namespace nmoe::comm
