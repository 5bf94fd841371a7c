// NVLink all-to-all probe: how fast can the SMs (or the copy engines) of every GPU in a node move
// rows to all of their peers at once, by each way of copying? It bounds what the RDEP transport
// (rdep_stream.cu) can reach and says which copy method to build it on.
//
// One process drives every visible GPU (peer access enabled between all pairs). Each GPU holds
// `rows` source rows of `row_bytes` and sends them all to its peers: row j goes to peer
// (me + 1 + (j / 32) % (W - 1)) % W, in chunks of 32 consecutive rows, as the pipelined dispatch
// sends them. Every GPU receives as many rows as it sends, so each link carries traffic both
// ways, like a dispatch or a combine.
//
// Methods (kernels start together: every block waits for a flag in host memory that the host sets
// after launching on all GPUs; the time of a GPU is the span between its earliest block start
// and its latest block end, by %globaltimer):
//   push    a warp per row: 16-byte loads of the local row, 16-byte stores to the peer row
//           (unrolled UNROLL deep), as warp_copy does in the transport.
//   push_na the same with ld.global.nc.L1::no_allocate and st.global.L1::no_allocate.
//   pull    a warp per row: 16-byte loads from the peer's row, stores to local memory (the peer
//           pulls what it is sent).
//   push+local  push from 75% of the blocks while the other 25% copy this GPU's receive buffer
//           into a local buffer (rows * row_bytes * 4/3 bytes, as a dispatch's receivers and local
//           rows do): the ceiling with the transport's local HBM traffic beside the NVLink one.
//   tma     one lane per warp: a bulk copy (cp.async.bulk) of the local row into shared memory,
//           then a bulk copy from shared memory to the peer row; two buffers per warp, so one
//           row loads while the previous one is stored.
//   ce      cudaMemcpyPeerAsync, one stream per (GPU, peer), contiguous per-peer regions (timed on
//           the host: from before the first copy is queued to the last stream's completion).
//
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a nvlink_probe.cu -o nvlink_probe
// Run:   ./nvlink_probe [row_bytes=14336] [rows=24576] [reps=10]   (prints a table and JSON)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(call)                                                                         \
  do {                                                                                      \
    cudaError_t err_ = (call);                                                              \
    if (err_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                     \
                   cudaGetErrorString(err_));                                               \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

namespace {

constexpr int kMaxGpus = 8;
constexpr int kChunk = 32;  // consecutive rows per peer, as kStreamChunkRows
constexpr int kWarp = 32;

struct Peers {
  char* dst[kMaxGpus];  // each GPU's receive buffer, mapped here
  char* src[kMaxGpus];  // each GPU's source rows, mapped here (pull reads them)
};

struct Job {
  Peers peers;
  const char* src;  // this GPU's rows
  char* dst;        // this GPU's receive buffer
  char* local;      // push+local: a local buffer of local_rows rows
  int64_t local_rows;
  int send_blocks;  // push+local: blocks that push (the others copy locally)
  int64_t rows;
  int64_t row_bytes;
  int me;
  int world;
  const volatile int* go;            // host-mapped start flag
  unsigned long long* span;          // [2]: min start, max end (globaltimer ns)
};

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Row j of source `me`: its peer and its row in the peer's receive buffer (region of source me).
__device__ __forceinline__ void place(const Job& job, int64_t j, int& peer, int64_t& row) {
  const int others = job.world - 1;
  const int64_t chunk = j / kChunk;
  peer = (job.me + 1 + static_cast<int>(chunk % others)) % job.world;
  const int64_t per_source = (job.rows + others - 1) / others + kChunk;
  row = job.me * per_source + (chunk / others) * kChunk + j % kChunk;
}

__device__ void gate(const Job& job) {
  __shared__ unsigned long long t0;
  if (threadIdx.x == 0) {
    while (*job.go == 0) {
    }
    t0 = now_ns();
    atomicMin(&job.span[0], t0);
  }
  __syncthreads();
}

__device__ void ungate(const Job& job) {
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(&job.span[1], now_ns());
}

template <int kUnroll, bool kNoAlloc>
__device__ __forceinline__ void warp_copy16(char* dst, const char* src, int64_t nbytes, int lane) {
  const int64_t n = nbytes / 16;
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  for (int64_t base = lane; base < n; base += kWarp * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kWarp;
      if (i < n) {
        if constexpr (kNoAlloc) {
          asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                       : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                       : "l"(s + i));
        } else {
          v[u] = s[i];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kWarp;
      if (i < n) {
        if constexpr (kNoAlloc) {
          asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(d + i),
                       "r"(v[u].x), "r"(v[u].y), "r"(v[u].z), "r"(v[u].w)
                       : "memory");
        } else {
          d[i] = v[u];
        }
      }
    }
  }
}

template <int kUnroll, bool kNoAlloc, bool kPull>
__global__ void __launch_bounds__(256) copy_kernel(Job job) {
  gate(job);
  const int lane = threadIdx.x % kWarp;
  int blocks = static_cast<int>(gridDim.x), block = static_cast<int>(blockIdx.x);
  if (job.send_blocks > 0) {  // push+local
    if (block >= job.send_blocks) {  // local copy: receive buffer rows -> local rows
      const int64_t copiers = static_cast<int64_t>(blocks - job.send_blocks) * (blockDim.x / kWarp);
      const int64_t dst_rows = job.local_rows;
      for (int64_t j = (block - job.send_blocks) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
           j < dst_rows; j += copiers) {
        warp_copy16<kUnroll, kNoAlloc>(job.local + j * job.row_bytes,
                                       job.dst + (j % job.rows) * job.row_bytes, job.row_bytes,
                                       lane);
      }
      ungate(job);
      return;
    }
    blocks = job.send_blocks;
  }
  const int64_t warps = static_cast<int64_t>(blocks) * (blockDim.x / kWarp);
  for (int64_t j = block * (blockDim.x / kWarp) + threadIdx.x / kWarp; j < job.rows;
       j += warps) {
    int peer;
    int64_t row;
    place(job, j, peer, row);
    if constexpr (kPull) {
      // The peer pulls: here this GPU reads row j of the GPU that would push it here. Same
      // traffic pattern with the roles swapped: source `peer` -> this GPU's region of `peer`.
      const char* src = job.peers.src[peer] + j * job.row_bytes;
      char* dst = job.dst + row * job.row_bytes;
      warp_copy16<kUnroll, kNoAlloc>(dst, src, job.row_bytes, lane);
    } else {
      warp_copy16<kUnroll, kNoAlloc>(job.peers.dst[peer] + row * job.row_bytes,
                                     job.src + j * job.row_bytes, job.row_bytes, lane);
    }
  }
  ungate(job);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One lane per warp drives the bulk copy engine; two row buffers per warp in dynamic smem.
__global__ void __launch_bounds__(128) tma_kernel(Job job) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) unsigned long long bars[4][2];
  gate(job);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int64_t first = blockIdx.x * (blockDim.x / kWarp) + warp;
  const uint32_t bytes = static_cast<uint32_t>(job.row_bytes);
  if (lane == 0) {
    char* buf[2] = {smem + (2 * warp) * job.row_bytes, smem + (2 * warp + 1) * job.row_bytes};
    for (int b = 0; b < 2; ++b) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bars[warp][b])));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    auto load = [&](int64_t j, int b) {
      const uint32_t bar = smem_addr(&bars[warp][b]);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                   "r"(bytes)
                   : "memory");
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
          "[%3];" ::"r"(smem_addr(buf[b])),
          "l"(job.src + j * job.row_bytes), "r"(bytes), "r"(bar)
          : "memory");
    };
    int phase[2] = {0, 0};
    int64_t k = 0;
    if (first < job.rows) load(first, 0);
    for (int64_t j = first; j < job.rows; j += warps, ++k) {
      const int b = static_cast<int>(k & 1);
      const uint32_t bar = smem_addr(&bars[warp][b]);
      asm volatile(
          "{\n .reg .pred p;\n WAIT_%=:\n"
          " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
          " @!p bra WAIT_%=;\n}" ::"r"(bar),
          "r"(phase[b])
          : "memory");
      phase[b] ^= 1;
      int peer;
      int64_t row;
      place(job, j, peer, row);
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                       job.peers.dst[peer] + row * job.row_bytes),
                   "r"(smem_addr(buf[b])), "r"(bytes)
                   : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      if (j + warps < job.rows) {
        // The other buffer's store (committed one group earlier) must have read its smem.
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        load(j + warps, b ^ 1);
      }
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
  __syncwarp();
  ungate(job);
}

struct Gpu {
  char* src = nullptr;
  char* dst = nullptr;
  char* local = nullptr;
  unsigned long long* span = nullptr;
  cudaStream_t stream[kMaxGpus] = {};
  int sms = 0;
};

struct Result {
  std::string method;
  int blocks_per_sm;
  int sm_percent;
  double us;     // median over reps of the slowest GPU's span
  double gbps;   // bytes each GPU sends / us
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t row_bytes = argc > 1 ? std::atoll(argv[1]) : 14336;
  const int64_t rows = argc > 2 ? std::atoll(argv[2]) : 24576;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 10;
  int world = 0;
  CHECK(cudaGetDeviceCount(&world));
  if (world < 2 || world > kMaxGpus) {
    std::fprintf(stderr, "nvlink_probe needs 2 to %d GPUs, found %d\n", kMaxGpus, world);
    return 1;
  }
  if (row_bytes % 16 != 0) {
    std::fprintf(stderr, "row_bytes must be a multiple of 16, got %lld\n",
                 static_cast<long long>(row_bytes));
    return 1;
  }
  const int others = world - 1;
  const int64_t per_source = (rows + others - 1) / others + kChunk;
  const int64_t dst_rows = per_source * world;
  const int64_t local_rows = rows * 4 / 3;  // a dispatch's received rows plus its own rows
  std::vector<Gpu> gpus(world);
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  for (int d = 0; d < world; ++d) {
    CHECK(cudaSetDevice(d));
    for (int p = 0; p < world; ++p) {
      if (p == d) continue;
      int ok = 0;
      CHECK(cudaDeviceCanAccessPeer(&ok, d, p));
      if (!ok) {
        std::fprintf(stderr, "GPU %d cannot access GPU %d\n", d, p);
        return 1;
      }
      CHECK(cudaDeviceEnablePeerAccess(p, 0));
    }
    CHECK(cudaMalloc(&gpus[d].src, rows * row_bytes));
    CHECK(cudaMalloc(&gpus[d].dst, dst_rows * row_bytes));
    CHECK(cudaMalloc(&gpus[d].local, local_rows * row_bytes));
    CHECK(cudaMemset(gpus[d].src, d + 1, rows * row_bytes));
    CHECK(cudaMalloc(&gpus[d].span, 2 * sizeof(unsigned long long)));
    for (int p = 0; p < world; ++p) CHECK(cudaStreamCreateWithFlags(&gpus[d].stream[p],
                                                                   cudaStreamNonBlocking));
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d));
    gpus[d].sms = sms;
    const int tma_smem = static_cast<int>(8 * row_bytes);
    CHECK(cudaFuncSetAttribute(tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               tma_smem));
  }
  Peers peers{};
  for (int d = 0; d < world; ++d) {
    peers.dst[d] = gpus[d].dst;
    peers.src[d] = gpus[d].src;
  }
  int* go_host = nullptr;
  CHECK(cudaHostAlloc(&go_host, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  int* go_dev = nullptr;
  CHECK(cudaHostGetDevicePointer(&go_dev, go_host, 0));

  std::vector<Result> results;
  auto run_kernel = [&](const std::string& method, int blocks_per_sm, int sm_percent) {
    std::vector<double> spans;
    for (int r = 0; r < reps + 2; ++r) {
      *reinterpret_cast<volatile int*>(go_host) = 0;
      for (int d = 0; d < world; ++d) {
        CHECK(cudaSetDevice(d));
        const unsigned long long init[2] = {~0ull, 0ull};
        CHECK(cudaMemcpyAsync(gpus[d].span, init, sizeof(init), cudaMemcpyHostToDevice,
                              gpus[d].stream[0]));
        CHECK(cudaStreamSynchronize(gpus[d].stream[0]));
        Job job{peers, gpus[d].src, gpus[d].dst, gpus[d].local, local_rows, 0, rows, row_bytes,
                d, world, go_dev, gpus[d].span};
        const int sms = std::max(1, gpus[d].sms * sm_percent / 100);
        const int grid = sms * blocks_per_sm;
        cudaStream_t s = gpus[d].stream[0];
        if (method == "push+local") {
          job.send_blocks = std::max(1, grid * 3 / 4);
          copy_kernel<4, false, false><<<grid, 256, 0, s>>>(job);
        } else if (method == "push") {
          copy_kernel<4, false, false><<<grid, 256, 0, s>>>(job);
        } else if (method == "push_u8") {
          copy_kernel<8, false, false><<<grid, 256, 0, s>>>(job);
        } else if (method == "push_na") {
          copy_kernel<4, true, false><<<grid, 256, 0, s>>>(job);
        } else if (method == "pull") {
          copy_kernel<4, false, true><<<grid, 256, 0, s>>>(job);
        } else if (method == "pull_u8") {
          copy_kernel<8, true, true><<<grid, 256, 0, s>>>(job);
        } else if (method == "tma") {
          tma_kernel<<<grid, 128, static_cast<int>(8 * row_bytes), s>>>(job);
        }
        CHECK(cudaGetLastError());
      }
      *reinterpret_cast<volatile int*>(go_host) = 1;
      double slowest = 0;
      for (int d = 0; d < world; ++d) {
        CHECK(cudaSetDevice(d));
        CHECK(cudaStreamSynchronize(gpus[d].stream[0]));
        unsigned long long span[2];
        CHECK(cudaMemcpy(span, gpus[d].span, sizeof(span), cudaMemcpyDeviceToHost));
        slowest = std::max(slowest, (span[1] - span[0]) * 1e-3);
      }
      if (r >= 2) spans.push_back(slowest);
    }
    const double us = median(spans);
    results.push_back({method, blocks_per_sm, sm_percent, us, rows * row_bytes / us * 1e-3});
    const Result& x = results.back();
    std::printf("%-8s %3d blk/SM %4d%% SMs %10.1f us %8.1f GB/s\n", x.method.c_str(),
                x.blocks_per_sm, x.sm_percent, x.us, x.gbps);
    std::fflush(stdout);
  };
  auto run_ce = [&]() {
    std::vector<double> walls;
    const int64_t per_peer = rows / others;
    for (int r = 0; r < reps + 2; ++r) {
      for (int d = 0; d < world; ++d) {
        CHECK(cudaSetDevice(d));
        CHECK(cudaDeviceSynchronize());
      }
      const auto t0 = std::chrono::steady_clock::now();
      for (int d = 0; d < world; ++d) {
        CHECK(cudaSetDevice(d));
        for (int o = 0; o < others; ++o) {
          const int p = (d + 1 + o) % world;
          CHECK(cudaMemcpyPeerAsync(gpus[p].dst + d * per_source * row_bytes, p,
                                    gpus[d].src + o * per_peer * row_bytes, d,
                                    per_peer * row_bytes, gpus[d].stream[o]));
        }
      }
      for (int d = 0; d < world; ++d) {
        CHECK(cudaSetDevice(d));
        CHECK(cudaDeviceSynchronize());
      }
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
              .count();
      if (r >= 2) walls.push_back(us);
    }
    const double us = median(walls);
    results.push_back({"ce", 0, 0, us, others * per_peer * row_bytes / us * 1e-3});
    std::printf("%-8s  copy engines, one stream per peer %10.1f us %8.1f GB/s\n", "ce", us,
                results.back().gbps);
    std::fflush(stdout);
  };

  std::printf("%s x%d, %d SMs; every GPU sends %lld rows of %lld B (%.1f MB) to its %d peers\n",
              prop.name, world, gpus[0].sms, static_cast<long long>(rows),
              static_cast<long long>(row_bytes), rows * row_bytes * 1e-6, others);
  for (const char* m : {"push", "push_u8", "push_na", "pull", "pull_u8"}) {
    for (int pct : {50, 75, 100}) {
      for (int bps : {1, 2}) run_kernel(m, bps, pct);
    }
  }
  for (int pct : {25, 50, 75, 100}) {
    for (int bps : {1, 2}) run_kernel("tma", bps, pct);
  }
  for (int bps : {1, 2, 4}) run_kernel("push+local", bps, 100);
  run_ce();

  std::printf("JSON [");
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& x = results[i];
    std::printf("%s{\"method\": \"%s\", \"blocks_per_sm\": %d, \"sm_percent\": %d, \"us\": %.1f, "
                "\"gbps\": %.1f}",
                i ? ", " : "", x.method.c_str(), x.blocks_per_sm, x.sm_percent, x.us, x.gbps);
  }
  std::printf("]\n");
  return 0;
}
