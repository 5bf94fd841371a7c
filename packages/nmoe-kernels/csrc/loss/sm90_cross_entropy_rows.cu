// Fused cross-entropy rows: per row of logits, the log-sum-exp, the loss and, written over the
// logits, the gradient (softmax - onehot(target)) * row_scale, in one kernel.
//
// Per row n, x = logits[n, :] read as float32, t = targets[n], L = log2(e):
//   pass 1   (m, s) = (max x, sum exp(x - m))    online: each thread keeps a running max and a
//            sum rescaled when the max grows; exp(x - m) = exp2f(fma(x, L, -m * L)); the per
//            thread pairs are combined across the block (warp xor-shuffles, then one warp).
//            lse[n] = m + logf(s);  loss[n] = lse[n] - x[t] (0 for ignored rows, NaN for a target
//            outside [0, V)).
//   pass 2   logits[n, j] <- rne(exp2f(fma(x_j, L, -lse * L)) * scale) for every j; then, after a
//            barrier, thread 0 rewrites the target element as rne((exp(x_t - lse) - 1) * scale).
//            scale = row_scale[n] (or the host scale_value), and ignored rows are written as 0.
// These are the float32 operations of the torch path (nmoe_kernels.reference.cross_entropy_rows)
// in another order: the lse differs from torch's by a few float32 ulps and exp2f by 2 ulps, so a
// gradient element differs by far less than one bf16 ulp before rounding (tests: at most one ulp
// after it, or 2^-20 absolute where p - 1 cancels).
//
// Work split: one CTA per row. The row is read as 16-byte vectors (8 bf16 or 4 fp32) after a
// scalar head up to the first 16-byte boundary (rows of an odd V start anywhere) and before a
// scalar tail. Thread i owns vectors k * blockDim + i (k = 0, 1, ...); the first `cached` of them
// are kept in shared memory from pass 1 to pass 2 (as many as fit: up to 227 KB, about 57% of a
// 201088-token bf16 row, all of a 50257-token one), the rest are read again in pass 2, in reverse
// order so the most recently read (likely still in L2) come first. Loads of smem-cached vectors
// use the evict-first hint, leaving L2 to the vectors that are read twice; the gradient is stored
// with the streaming hint (the next reader is a GEMM over gigabytes).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "../cuda_check.h"
#include "cross_entropy_rows.h"

namespace nmoe::loss {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMinThreads = 128;
constexpr int kUnroll = 4;              // 16-byte loads in flight per thread in pass 1 and 2
constexpr int kStaticSmemReserve = 1024;  // bytes left for the static shared memory
constexpr float kLog2e = 1.4426950408889634f;

struct MaxSum {
  float max;
  float sum;  // sum of exp(x - max)
};

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
  __device__ __forceinline__ static void unpack(const uint4& w, float (&f)[kVec]) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(words[i] << 16);
      f[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);  // .x low half
      words[i] = *reinterpret_cast<const uint32_t*>(&v);
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
  __device__ __forceinline__ static void unpack(const uint4& w, float (&f)[kVec]) {
    f[0] = __uint_as_float(w.x);
    f[1] = __uint_as_float(w.y);
    f[2] = __uint_as_float(w.z);
    f[3] = __uint_as_float(w.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

// exp(x - offset) as exp2f(fma(x, L, -offset * L)); neg_offset_log2 = -offset * L.
__device__ __forceinline__ float exp_shifted(float x, float neg_offset_log2) {
  return exp2f(__fmaf_rn(x, kLog2e, neg_offset_log2));
}

// Adds `count` values to a running (max, sum): one rescale of the sum when the max grows.
template <int kCount>
__device__ __forceinline__ void online_add(MaxSum& state, const float* values) {
  float new_max = values[0];
#pragma unroll
  for (int i = 1; i < kCount; ++i) new_max = fmaxf(new_max, values[i]);
  if (new_max > state.max) {
    // exp2f(-inf) = 0 covers the first finite value after state.max = -inf.
    state.sum = __fmul_rn(state.sum, exp2f(__fmul_rn(__fsub_rn(state.max, new_max), kLog2e)));
    state.max = new_max;
  }
  if (state.max == -CUDART_INF_F) return;  // only -inf so far: every term is exp(-inf) = 0
  const float neg_max_log2 = __fmul_rn(-state.max, kLog2e);
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    state.sum = __fadd_rn(state.sum, exp_shifted(values[i], neg_max_log2));
  }
}

__device__ __forceinline__ MaxSum combine(const MaxSum& a, const MaxSum& b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -CUDART_INF_F) return {m, 0.0f};
  return {m, __fadd_rn(__fmul_rn(a.sum, exp2f(__fmul_rn(__fsub_rn(a.max, m), kLog2e))),
                       __fmul_rn(b.sum, exp2f(__fmul_rn(__fsub_rn(b.max, m), kLog2e))))};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum state) {
#pragma unroll
  for (int distance = 16; distance > 0; distance /= 2) {
    const MaxSum other{__shfl_xor_sync(0xFFFFFFFFu, state.max, distance),
                       __shfl_xor_sync(0xFFFFFFFFu, state.sum, distance)};
    state = combine(state, other);
  }
  return state;
}

// The (max, sum) of the whole block, returned to every thread. blockDim.x % 32 == 0.
__device__ __forceinline__ MaxSum block_combine(MaxSum state, MaxSum* partials) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  state = warp_combine(state);
  if (lane == 0) partials[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < static_cast<int>(blockDim.x / 32) ? partials[lane]
                                                    : MaxSum{-CUDART_INF_F, 0.0f};
    state = warp_combine(state);
    if (lane == 0) partials[32] = state;
  }
  __syncthreads();
  return partials[32];
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1)
    cross_entropy_rows_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
                              float* __restrict__ loss, float* __restrict__ lse_out,
                              const float* __restrict__ row_scale, float scale_value,
                              int64_t ignore_index, int64_t vocab, int64_t cached) {
  using E = Elem<T>;
  constexpr int kVec = E::kVec;
  extern __shared__ uint4 row_cache[];  // [cached * blockDim.x]: vector k of thread i at k*bdim+i
  __shared__ MaxSum partials[33];

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t threads = blockDim.x;
  T* x = logits + row * vocab;
  const int64_t target = targets[row];
  const bool ignored = target == ignore_index;
  const bool hit = !ignored && target >= 0 && target < vocab;
  float target_logit = 0.0f;
  if (tid == 0 && hit) target_logit = E::load(x + target);  // read before pass 2 overwrites it

  // Scalar head up to the first 16-byte boundary, 16-byte vectors, scalar tail.
  const int misaligned = static_cast<int>(reinterpret_cast<std::uintptr_t>(x) % 16 / sizeof(T));
  const int64_t head = misaligned ? min(static_cast<int64_t>(kVec - misaligned), vocab) : 0;
  const int64_t num_vecs = (vocab - head) / kVec;
  const int64_t tail_start = head + num_vecs * kVec;
  const int64_t num_tail = vocab - tail_start;
  uint4* body = reinterpret_cast<uint4*>(x + head);
  const int64_t per_thread = (num_vecs + threads - 1) / threads;
  const int64_t num_cached = min(cached, per_thread);

  // Pass 1: running (max, sum) over this thread's elements.
  MaxSum state{-CUDART_INF_F, 0.0f};
  if (tid < head) {
    const float v = E::load(x + tid);
    online_add<1>(state, &v);
  }
  if (tid < num_tail) {
    const float v = E::load(x + tail_start + tid);
    online_add<1>(state, &v);
  }
  for (int64_t k0 = 0; k0 < per_thread; k0 += kUnroll) {
    uint4 words[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u;
      const int64_t v = k * threads + tid;
      words[u] = make_uint4(0, 0, 0, 0);
      if (v < num_vecs) words[u] = k < num_cached ? __ldcs(body + v) : __ldcg(body + v);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u;
      const int64_t v = k * threads + tid;
      if (v < num_vecs) {
        if (k < num_cached) row_cache[k * threads + tid] = words[u];
        float f[kVec];
        E::unpack(words[u], f);
        online_add<kVec>(state, f);
      }
    }
  }
  const MaxSum total = block_combine(state, partials);
  const float lse = __fadd_rn(total.max, logf(total.sum));
  if (tid == 0) {
    lse_out[row] = lse;
    loss[row] = ignored ? 0.0f : (hit ? __fsub_rn(lse, target_logit) : CUDART_NAN_F);
  }

  // Pass 2: the gradient, written over the logits.
  const float scale = ignored ? 0.0f : (row_scale != nullptr ? row_scale[row] : scale_value);
  const float neg_lse_log2 = __fmul_rn(-lse, kLog2e);
  auto grad_vec = [&](const uint4& in) {
    float f[kVec];
    if (ignored) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) f[i] = 0.0f;
    } else {
      E::unpack(in, f);
#pragma unroll
      for (int i = 0; i < kVec; ++i) f[i] = __fmul_rn(exp_shifted(f[i], neg_lse_log2), scale);
    }
    return E::pack(f);
  };
  auto grad_scalar = [&](T* p) {
    E::store(p, ignored ? 0.0f : __fmul_rn(exp_shifted(E::load(p), neg_lse_log2), scale));
  };
  if (tid < head) grad_scalar(x + tid);
  if (tid < num_tail) grad_scalar(x + tail_start + tid);
  for (int64_t k0 = per_thread - 1; k0 >= num_cached; k0 -= kUnroll) {  // re-read, newest first
    uint4 words[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 - u;
      const int64_t v = k * threads + tid;
      words[u] = make_uint4(0, 0, 0, 0);
      if (k >= num_cached && v < num_vecs) words[u] = __ldcs(body + v);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 - u;
      const int64_t v = k * threads + tid;
      if (k >= num_cached && v < num_vecs) __stcs(body + v, grad_vec(words[u]));
    }
  }
  for (int64_t k = 0; k < num_cached; ++k) {  // from shared memory
    const int64_t v = k * threads + tid;
    if (v < num_vecs) __stcs(body + v, grad_vec(row_cache[k * threads + tid]));
  }

  // The -1 at the target, over the value its owner wrote (ordered by the barrier).
  __syncthreads();
  if (tid == 0 && hit) {
    E::store(x + target,
             __fmul_rn(__fsub_rn(exp_shifted(target_logit, neg_lse_log2), 1.0f), scale));
  }
}

int threads_for(int64_t vocab, int vec) {
  // About 4 vectors per thread, a power of two in [kMinThreads, kMaxThreads].
  const int64_t want = (vocab / vec + 3) / 4;
  int threads = kMinThreads;
  while (threads < kMaxThreads && threads < want) threads *= 2;
  return threads;
}

template <typename T>
void launch(T* logits, const int64_t* targets, float* loss, float* lse, const float* row_scale,
            float scale_value, int64_t ignore_index, int64_t num_rows, int64_t vocab, int device,
            cudaStream_t stream, const char* op) {
  constexpr int kVec = Elem<T>::kVec;
  const int threads = threads_for(vocab, kVec);
  const int64_t max_vecs = (vocab + kVec - 1) / kVec;  // bound on any row's vector count
  const int64_t per_thread = (max_vecs + threads - 1) / threads;
  int smem_optin = 0;
  NMOE_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op);
  const int64_t slot_bytes = static_cast<int64_t>(threads) * 16;
  const int64_t cached =
      std::min<int64_t>(per_thread, std::max(0, smem_optin - kStaticSmemReserve) / slot_bytes);
  const int64_t smem_bytes = cached * slot_bytes;
  const auto kernel = cross_entropy_rows_kernel<T>;
  if (smem_bytes > 48 * 1024) {
    NMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem_bytes)),
                    op);
  }
  kernel<<<static_cast<unsigned>(num_rows), threads, static_cast<size_t>(smem_bytes), stream>>>(
      logits, targets, loss, lse, row_scale, scale_value, ignore_index, vocab, cached);
}

}  // namespace

void launch_cross_entropy_rows(void* logits, bool is_bf16, const int64_t* targets, float* loss,
                               float* lse, const float* row_scale, float scale_value,
                               int64_t ignore_index, int64_t num_rows, int64_t vocab, int device,
                               std::uintptr_t stream) {
  constexpr const char* kOp = "cross_entropy_rows";
  if (num_rows == 0) return;
  CudaDeviceGuard guard(device, kOp);
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (is_bf16) {
    launch(static_cast<__nv_bfloat16*>(logits), targets, loss, lse, row_scale, scale_value,
           ignore_index, num_rows, vocab, device, cuda_stream, kOp);
  } else {
    launch(static_cast<float*>(logits), targets, loss, lse, row_scale, scale_value, ignore_index,
           num_rows, vocab, device, cuda_stream, kOp);
  }
  NMOE_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace nmoe::loss
