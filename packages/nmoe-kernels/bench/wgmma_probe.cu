// Tensor-core probe for the FP8 grouped GEMM's mainloop designs on Hopper (sm_90a): how fast can
// two MMA warpgroups of one CTA drive the tensor cores with FP8 wgmma (m64nNk32, e4m3 x e4m3 ->
// f32) under each way the kernel could be written, with and without a producer filling the
// shared-memory stages the way TMA does?
//
// Each CTA (one per SM, persistent) runs `iters` K blocks of 128 through a 4-stage ring ("@3": 3): one
// producer thread arms a stage's "full" mbarrier and bulk-copies (cp.async.bulk) the stage's A
// (128 rows x 128 B) and B (NT rows x 128 B) bytes from an L2-resident global buffer into it
// ("fill"), or only arrives on the barrier ("nofill": the operands stay what they were). Two MMA
// warpgroups (64 rows each) wait for the stage, run the block's wgmmas, and release the stage.
// The data is arbitrary: only the time is measured. Variants (name = mode_tile_wgmma_operand):
//   plain    accumulate every block into the same registers (no promotion: a rowwise- or
//            tensor-scaled GEMM's mainloop), wait_group 0 per block.
//   serial   each block (and each column half, on 128 x 256 tiles with n128 wgmmas) into a fresh
//            partial accumulator, wait_group 0, then acc += scale * partial (64 FFMAs per half),
//            as DeepGEMM's FP8 kernel and nmoe's 128 x 256 tile do.
//   (nmoe's 128 x 128 tile overlaps the promotion -- two partials in turn, wait_group 1 -- but
//   written here in CUDA with inline PTX, ptxas serialized that loop's wgmmas, C7513 / C7514,
//   so the probe leaves it out; the CuTeDSL kernel's own overlapped loop compiles clean.)
//   scaled   serial, with the promotion's scales as a GEMM reads them (part 2 only): this
//            thread's two rows' activation scales and each column half's weight scale, plain
//            global loads one block ahead, acc += (s_a * s_b) * partial per row.
//   smemscaled  scaled, but a warp of the producer warpgroup copies each block's scales into
//            a slot of its stage (4-byte cp.async, arriving on the stage's full barrier when
//            they land) and the MMA warps read them from shared memory.
//   ss / rs  A by shared-memory descriptor, or in registers (ldmatrix from the stage first).
// Every variant reports TFLOP/s of the CTA tiles' math over the kernel's time (median of 5).
//
// Part 2 loads what a grouped GEMM loads: tensor-map TMA boxes (128-byte swizzle) of A
// [groups * rows, K] and B [groups * N, K], operands far larger than L2, walked by a persistent
// tile schedule (`Walk`: nmoe's m-major order, or bands of column tiles), at DeepGEMM's grouped
// shape and dsv3-local's W13 -- the kernel's mainloop without its scales and epilogue. Part 3
// varies the TMA settings on the slot-scaled 128 x 256 loop: the tensor maps' L2 promotion (none,
// 128 B, 256 B), loads with an L2 cache hint of policy 0, as CuTeDSL's TMA copies carry, and
// barrier waits with the suspend-time hint of CUTLASS's and CuTeDSL's waits.
//
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a wgmma_probe.cu -o wgmma_probe
// Run:   ./wgmma_probe [iters=8192] [reps=5] [only]   (part 1's K blocks per CTA; 0 skips part 1)
//        `only` = "VARIANT@SHAPE" (e.g. smemscaled_128x256_n128@dsv3-local) runs just that part-2
//        variant, m-major, on that shape, and skips part 3: one kernel, warm-up then `reps`
//        launches, for a profiler (ncu --kernel-name regex:probe_kernel --launch-skip 1).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
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

constexpr int kBlockK = 128;  // bytes (fp8 elements) of K per block
constexpr int kThreads = 384;
constexpr uint32_t kABytes = 128 * kBlockK;

enum Mode { kPlain = 0, kSerial = 1, kSerialScaled = 2, kSmemScaled = 3 };
enum Fill { kNoFill = 0, kL2 = 1, kGemm = 2 };

// A grouped GEMM's tile walk (FILL == kGemm): `groups` segments of `rows` rows, each against its
// own B [n, k]; CTA c takes tiles c, c + grid, ... of the linear order (group, then within the
// group either m-major -- every column tile of a row tile before the next row tile, nmoe's order
// -- or, with band > 0, bands of `band` column tiles, every row tile of a band before the next).
struct Walk {
  int groups, rows, n, k, band;
  // bit 0: TMA loads with .L2::cache_hint and a zero policy (as CuTeDSL emits them); bit 1:
  // barrier waits with CUTLASS's suspend-time hint
  int hint;
  const float* sfa;  // [k / 128][m_al]: activation scales, MN-major (kSerialScaled)
  const float* sfb;  // [groups * n / 128][k / 128]: weight scales
  int m_al;
  __device__ int tiles_of(int cta, int grid, int nt) const {
    const int total = groups * (rows / 128) * (n / nt);
    return cta < total ? (total - cta + grid - 1) / grid : 0;
  }
  __device__ void coords(int tile, int nt, int* row, int* col) const {
    const int tm = rows / 128, tn = n / nt, per = tm * tn;
    const int g = tile / per, r = tile % per;
    int m, c;
    if (band == 0) {
      m = r / tn;
      c = r % tn;
    } else {
      const int in_band = tm * band, bi = r / in_band, w = r % in_band;
      m = w / band;
      c = bi * band + w % band;
    }
    *row = g * rows + m * 128;
    *col = g * n + c * nt;
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// K-major operand with the 128-byte swizzle: 8-row atoms of 1024 bytes (stride byte offset), the
// leading byte offset unused; a k32 step advances the start address by 32 bytes.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  uint64_t d = (addr >> 4) & 0x3FFF;
  d |= uint64_t{1} << 16;
  d |= uint64_t{1024 >> 4} << 32;
  d |= uint64_t{1} << 62;
  return d;
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Spins until the phase with `parity` completes; with `sleep`, each try carries the suspend-time
// hint CUTLASS's and CuTeDSL's barrier waits use (0x989680 ns), which ptxas turns into a
// NANOSLEEP.SYNCS between tries.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity, bool sleep = false) {
  uint32_t ok = 0;
  do {
    if (sleep) {
      asm volatile(
          "{\n.reg .pred P1;\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%1], %2, %3;\n"
          "selp.b32 %0, 1, 0, P1;\n}\n"
          : "=r"(ok)
          : "r"(smem_u32(bar)), "r"(parity), "r"(0x989680)
          : "memory");
    } else {
      asm volatile(
          "{\n.reg .pred P1;\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%1], %2;\n"
          "selp.b32 %0, 1, 0, P1;\n}\n"
          : "=r"(ok)
          : "r"(smem_u32(bar)), "r"(parity)
          : "memory");
    }
  } while (!ok);
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
// A 2-D tensor-map load of box (x, y); `hint`: with .L2::cache_hint and a zero policy, as
// CuTeDSL's TMA copies carry.
__device__ __forceinline__ void tma_2d(void* dst, const CUtensorMap* map, int x, int y,
                                       uint64_t* bar, bool hint) {
  const uint64_t m = reinterpret_cast<uint64_t>(map);
  if (hint) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        ".L2::cache_hint [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_u32(dst)),
        "l"(m), "r"(x), "r"(y), "r"(smem_u32(bar)), "l"(uint64_t{0})
        : "memory");
  } else {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
        "{%2, %3}], [%4];" ::"r"(smem_u32(dst)),
        "l"(m), "r"(x), "r"(y), "r"(smem_u32(bar))
        : "memory");
  }
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(dst)), "l"(src)
               : "memory");
}
// arrives on `bar` once this thread's earlier cp.async copies have landed (the barrier's count
// includes the arrival: .noinc)
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of `d` across a wgmma wait.
template <int ND>
__device__ __forceinline__ void fence_regs(float (&d)[ND]) {
#pragma unroll
  for (int i = 0; i < ND; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

// generated: wgmma.mma_async m64nNk32 e4m3 wrappers (SS: both operands by descriptor; RS: A in
// four registers per thread), accumulating into d when scale_d != 0
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_ss_n256(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_rs_n256(float (&d)[128], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, {%128,%129,%130,%131}, %132, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}


template <int WN, bool RS>
__device__ __forceinline__ void mma_k32(float (&d)[WN / 2], uint64_t da, const uint32_t (&a)[4],
                                        uint64_t db, int scale_d) {
  if constexpr (RS) {
    if constexpr (WN == 128) wgmma_rs_n128(d, a, db, scale_d);
    else wgmma_rs_n256(d, a, db, scale_d);
  } else {
    if constexpr (WN == 128) wgmma_ss_n128(d, da, db, scale_d);
    else wgmma_ss_n256(d, da, db, scale_d);
  }
}

template <int NT, int WN, int MODE, bool RS, int FILL, int kStages = 4>
__global__ void __launch_bounds__(kThreads, 1)
    probe_kernel(const uint8_t* __restrict__ src, size_t src_bytes, int iters,
                 float* __restrict__ out, const __grid_constant__ CUtensorMap tmap_a,
                 const __grid_constant__ CUtensorMap tmap_b, Walk walk) {
  constexpr int H = NT / WN;  // wgmma column halves per block
  constexpr int ND = WN / 2;  // accumulator registers per thread per half
  constexpr uint32_t kStage = kABytes + NT * kBlockK;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStage);
  uint64_t* empty = full + kStages;
  float* scales = reinterpret_cast<float*>(empty + kStages);
  float* slots = scales + 64;  // kSmemScaled: [kStages][128 + 4] scales of each stage's block
  const int wg = threadIdx.x / 128, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (FILL == kGemm) {  // this CTA's K blocks: its tiles of the walk, all of K
    iters = walk.tiles_of(blockIdx.x, gridDim.x, NT) * (walk.k / kBlockK);
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + s, MODE == kSmemScaled ? 1 + 32 : 1);  // + the scale warp's lanes
      mbar_init(empty + s, 8);  // one arrival per MMA warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (threadIdx.x < 64) scales[threadIdx.x] = 1.0f + threadIdx.x * 1e-3f;
  __syncthreads();

  if (wg == 0) {  // producer
    regs_dec<40>();
    if (warp == 0 && lane == 0) {
      const int kb_per_tile = walk.k / kBlockK;
      int tile = blockIdx.x, kb = 0, row = 0, col = 0;
      for (int b = 0; b < iters; ++b) {
        const int s = b % kStages;
        if (b >= kStages) mbar_wait(empty + s, ((b / kStages) - 1) & 1, walk.hint & 2);
        uint8_t* stage = smem + s * kStage;
        if constexpr (FILL == kGemm) {
          if (kb == 0) walk.coords(tile, NT, &row, &col);
          mbar_expect_tx(full + s, kStage);
          tma_2d(stage, &tmap_a, kb * kBlockK, row, full + s, walk.hint & 1);
          tma_2d(stage + kABytes, &tmap_b, kb * kBlockK, col, full + s, walk.hint & 1);
          if (++kb == kb_per_tile) {
            kb = 0;
            tile += gridDim.x;
          }
        } else if constexpr (FILL == kL2) {
          const size_t off =
              (static_cast<size_t>(blockIdx.x * 131 + b) * kStage) % (src_bytes - kStage) &
              ~size_t{1023};
          mbar_expect_tx(full + s, kStage);
          bulk_g2s(stage, src + off, kABytes, full + s);
          bulk_g2s(stage + kABytes, src + off + kABytes, NT * kBlockK, full + s);
        } else {
          mbar_arrive(full + s);
        }
      }
    }
    if constexpr (MODE == kSmemScaled) {
      if (warp == 1) {  // the scale warp: each block's scales into its stage's slot (cp.async)
        const int kbt = walk.k / kBlockK;
        int tile = blockIdx.x, kb = 0, row = 0, col = 0;
        walk.coords(tile, NT, &row, &col);
        for (int b = 0; b < iters; ++b) {
          const int s = b % kStages;
          if (b >= kStages) mbar_wait(empty + s, ((b / kStages) - 1) & 1, walk.hint & 2);
          float* slot = slots + s * 132;
          const float* sa = walk.sfa + size_t(kb) * walk.m_al + row;
#pragma unroll
          for (int j = 0; j < 4; ++j) cp_async_4(slot + lane + 32 * j, sa + lane + 32 * j);
          if (lane < H) cp_async_4(slot + 128 + lane, walk.sfb + size_t(col / 128 + lane * WN / 128) * kbt + kb);
          cp_async_arrive_noinc(full + s);
          if (++kb == kbt) {
            kb = 0;
            tile += gridDim.x;
            walk.coords(tile, NT, &row, &col);
          }
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
      }
    }
    return;
  }
  regs_inc<232>();
  const int mwg = wg - 1;
  const uint32_t smem_base = smem_u32(smem);
  float acc[H][ND];
#pragma unroll
  for (int h = 0; h < H; ++h)
#pragma unroll
    for (int i = 0; i < ND; ++i) acc[h][i] = 0.0f;
  constexpr int NP = 1;  // partial accumulators
  float part[NP][ND];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int i = 0; i < ND; ++i) part[p][i] = 0.0f;
  uint32_t areg[NP][4][4];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int j = 0; j < 4; ++j) areg[p][k][j] = 0;

  auto a_desc = [&](int s, int k) {
    return desc_sw128(smem_base + s * kStage + mwg * 8192 + k * 32);
  };
  auto b_desc = [&](int s, int h, int k) {
    return desc_sw128(smem_base + s * kStage + kABytes + h * WN * kBlockK + k * 32);
  };
  auto load_a = [&](uint32_t (&a)[4][4], int s) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      ldsm_x4(a[k], smem_base + s * kStage + mwg * 8192 + (warp % 4) * 2048 + k * 512 + lane * 16);
  };
  // block b's wgmmas for column half h into d (fresh unless `accumulate`)
  auto issue = [&](float (&d)[ND], const uint32_t (&a)[4][4], int s, int h, bool accumulate) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      mma_k32<WN, RS>(d, a_desc(s, k), a[k], b_desc(s, h, k), (accumulate || k > 0) ? 1 : 0);
  };
  // acc += scale * partial, with the scale of each value's row (lo: the thread's upper row,
  // hi: 8 rows below; wgmma m64 accumulators hold them in groups of two)
  auto promote = [&](float (&a)[ND], const float (&p)[ND], float lo, float hi) {
#pragma unroll
    for (int i = 0; i < ND; ++i) a[i] = fmaf((i / 2) % 2 ? hi : lo, p[i], a[i]);
  };
  auto wait_full = [&](int b) { mbar_wait(full + b % kStages, (b / kStages) & 1, walk.hint & 2); };
  auto release = [&](int b) {
    if (lane == 0) mbar_arrive(empty + b % kStages);
  };
  // the serial modes' column half h of block b: its wgmmas into the partial, wait, release the
  // stage after the last half, promote with the row scales (lo, hi)
  auto serial_half = [&](int b, int h, float lo, float hi) {
    wg_fence();
    issue(part[0], areg[0], b % kStages, h, false);
    wg_commit();
    wg_wait<0>();
    fence_regs(part[0]);
    if (h == H - 1) release(b);
    promote(acc[h], part[0], lo, hi);
    fence_regs(acc[h]);
  };

  if constexpr (MODE == kPlain) {
    for (int b = 0; b < iters; ++b) {
      wait_full(b);
      if constexpr (RS) load_a(areg[0], b % kStages);
      wg_fence();
#pragma unroll
      for (int h = 0; h < H; ++h) issue(acc[h], areg[0], b % kStages, h, true);
      wg_commit();
      wg_wait<0>();
#pragma unroll
      for (int h = 0; h < H; ++h) fence_regs(acc[h]);
      release(b);
    }
  } else if constexpr (MODE == kSerial) {
    for (int b = 0; b < iters; ++b) {
      wait_full(b);
      if constexpr (RS) load_a(areg[0], b % kStages);
      const float sc = scales[b & 63];
#pragma unroll
      for (int h = 0; h < H; ++h) serial_half(b, h, sc, sc);
    }
  } else if constexpr (MODE == kSerialScaled) {
    // serial, with the GEMM's scales: per K block this thread's two rows' activation scales
    // and the weight scale of each column half, plain global loads one block ahead (as nmoe's
    // 128 x 256 tile loads them)
    static_assert(FILL == kGemm, "scales need the GEMM walk");
    const int kbt = walk.k / kBlockK;
    const int r_lo = mwg * 64 + (warp % 4) * 16 + lane / 4;
    int tile = blockIdx.x, kb = 0, row = 0, col = 0;
    walk.coords(tile, NT, &row, &col);
    auto load = [&](int kb_, int row_, int col_, float (&sa)[2], float (&sb)[H]) {
      sa[0] = walk.sfa[size_t(kb_) * walk.m_al + row_ + r_lo];
      sa[1] = walk.sfa[size_t(kb_) * walk.m_al + row_ + r_lo + 8];
#pragma unroll
      for (int h = 0; h < H; ++h) sb[h] = walk.sfb[size_t(col_ / 128 + h * WN / 128) * kbt + kb_];
    };
    float sa[2], sb[H], na[2], nb[H];
    if (iters > 0) load(0, row, col, sa, sb);
    for (int b = 0; b < iters; ++b) {
      if (++kb == kbt) {  // the next block's tile
        kb = 0;
        tile += gridDim.x;
        walk.coords(tile, NT, &row, &col);
      }
      if (b + 1 < iters) load(kb, row, col, na, nb);
      wait_full(b);
#pragma unroll
      for (int h = 0; h < H; ++h) serial_half(b, h, sa[0] * sb[h], sa[1] * sb[h]);
#pragma unroll
      for (int j = 0; j < 2; ++j) sa[j] = na[j];
#pragma unroll
      for (int h = 0; h < H; ++h) sb[h] = nb[h];
    }
  } else if constexpr (MODE == kSmemScaled) {
    // serial, the scales read from the stage's slot (written by the scale warp)
    const int r_lo = mwg * 64 + (warp % 4) * 16 + lane / 4;
    for (int b = 0; b < iters; ++b) {
      wait_full(b);
      const float* slot = slots + (b % kStages) * 132;
      const float a_lo = slot[r_lo], a_hi = slot[r_lo + 8];
      float sb[H];
#pragma unroll
      for (int h = 0; h < H; ++h) sb[h] = slot[128 + h];
#pragma unroll
      for (int h = 0; h < H; ++h) serial_half(b, h, a_lo * sb[h], a_hi * sb[h]);
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int h = 0; h < H; ++h)
#pragma unroll
    for (int i = 0; i < ND; ++i) sum += acc[h][i];
  out[blockIdx.x * 256 + threadIdx.x - 128] = sum;
}

struct Variant {
  const char* name;
  void (*kernel)(const uint8_t*, size_t, int, float*, const CUtensorMap, const CUtensorMap, Walk);
  int nt;
  int stages = 4;
};

#define V(name, NT, WN, MODE, RS) \
  {name "/nofill", probe_kernel<NT, WN, MODE, RS, kNoFill>, NT}, \
  {name "/fill", probe_kernel<NT, WN, MODE, RS, kL2>, NT}
#define G(name, NT, WN, MODE) {name, probe_kernel<NT, WN, MODE, false, kGemm>, NT}
#define G3(name, NT, WN, MODE) {name "@3", probe_kernel<NT, WN, MODE, false, kGemm, 3>, NT, 3}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// [rows, k] fp8, row-major, boxes of box_rows x 128 bytes with the 128-byte swizzle
CUtensorMap make_map(EncodeTiled encode, void* base, uint64_t rows, uint64_t k,
                     uint32_t box_rows,
                     CUtensorMapL2promotion promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {k, rows};
  const cuuint64_t strides[1] = {k};
  const cuuint32_t box[2] = {kBlockK, box_rows};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, base, dims, strides, box,
                            estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            promotion,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(1);
  }
  return map;
}

struct Timer {
  cudaEvent_t e0, e1;
  Timer() {
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
  }
  template <typename F>
  double median_ms(F launch, int reps) {
    launch();  // warm-up
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<float> ms(reps);
    for (int r = 0; r < reps; ++r) {
      CHECK(cudaEventRecord(e0));
      launch();
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    std::sort(ms.begin(), ms.end());
    return ms[reps / 2];
  }
};

int smem_bytes(int nt, int stages = 4) {
  return stages * (kABytes + nt * kBlockK) + 1024 + 2 * stages * 8 + 256 + stages * 132 * 4;
}

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 8192;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 5;
  const std::string only = argc > 3 ? argv[3] : "";
  const std::string only_variant = only.substr(0, only.find('@'));
  const std::string only_shape =
      only.find('@') == std::string::npos ? "" : only.substr(only.find('@') + 1);
  if (iters < 0) {
    std::fprintf(stderr, "iters must be >= 0 (0: skip part 1)\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int grid = prop.multiProcessorCount;
  const size_t src_bytes = size_t{32} << 20;
  uint8_t* src = nullptr;
  float* out = nullptr;
  CHECK(cudaMalloc(&src, src_bytes));
  CHECK(cudaMemset(src, 0x38, src_bytes));  // e4m3 1.0
  CHECK(cudaMalloc(&out, static_cast<size_t>(grid) * 256 * sizeof(float)));
  EncodeTiled encode = nullptr;
  cudaDriverEntryPointQueryResult found{};
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled",
                                         reinterpret_cast<void**>(&encode), 12000,
                                         cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || encode == nullptr) {
    std::fprintf(stderr, "no cuTensorMapEncodeTiled\n");
    return 1;
  }
  Timer timer;
  std::printf("device: %s, %d SMs, one CTA per SM, %d reps (median)\n", prop.name, grid, reps);

  // 1. Stages filled from an L2-resident 32 MiB buffer (or not at all), `iters` K blocks per CTA.
  const Variant l2_variants[] = {
      V("plain_128x256_n256_ss", 256, 256, kPlain, false),
      V("plain_128x256_n256_rs", 256, 256, kPlain, true),
      V("plain_128x256_n128_ss", 256, 128, kPlain, false),
      V("plain_128x128_n128_ss", 128, 128, kPlain, false),
      V("plain_128x128_n128_rs", 128, 128, kPlain, true),
      V("serial_128x128_n128_ss", 128, 128, kSerial, false),
      V("serial_128x128_n128_rs", 128, 128, kSerial, true),
      V("serial_128x256_n128_ss", 256, 128, kSerial, false),
      V("serial_128x256_n128_rs", 256, 128, kSerial, true),
  };
  const Walk none{};
  const CUtensorMap no_map{};
  if (iters) std::printf("\n%d K blocks per CTA\n%-40s %9s %9s\n", iters, "variant", "ms", "TFLOP/s");
  for (const Variant& v : l2_variants) {
    if (!iters) break;
    const int smem = smem_bytes(v.nt);
    CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const double t = timer.median_ms(
        [&] { v.kernel<<<grid, kThreads, smem>>>(src, src_bytes, iters, out, no_map, no_map, none); },
        reps);
    const double flop = 2.0 * 128 * v.nt * kBlockK * double(iters) * grid;
    std::printf("%-40s %9.3f %9.1f\n", v.name, t, flop / (t * 1e-3) / 1e12);
    std::fflush(stdout);
  }

  // 2. The GEMM's own loads: tensor-map TMA of A [G * Mg, K] and B [G * N, K] tiles, walked as
  //    a grouped GEMM's persistent schedule (`Walk`), operands far larger than L2.
  const Variant gemm_variants[] = {
      G("serial_128x256_n128", 256, 128, kSerial),
      G("scaled_128x256_n128", 256, 128, kSerialScaled),
      G3("scaled_128x256_n128", 256, 128, kSerialScaled),
      G("smemscaled_128x256_n128", 256, 128, kSmemScaled),
      G3("smemscaled_128x256_n128", 256, 128, kSmemScaled),
      G("plain_128x256_n256", 256, 256, kPlain),
      G("serial_128x128_n128", 128, 128, kSerial),
      G("scaled_128x128_n128", 128, 128, kSerialScaled),
      G("smemscaled_128x128_n128", 128, 128, kSmemScaled),
      G("plain_128x128_n128", 128, 128, kPlain),
  };
  struct Shape {
    const char* name;
    int groups, rows, n, k;
  };
  const Shape shapes[] = {{"deepgemm", 4, 8192, 4096, 7168}, {"dsv3-local", 32, 2048, 4096, 7168}};
  for (const Shape& sh : shapes) {
    if (!only_shape.empty() && only_shape != sh.name) continue;
    const size_t a_bytes = size_t(sh.groups) * sh.rows * sh.k;
    const size_t b_bytes = size_t(sh.groups) * sh.n * sh.k;
    uint8_t *a = nullptr, *b = nullptr;
    CHECK(cudaMalloc(&a, a_bytes));
    CHECK(cudaMalloc(&b, b_bytes));
    CHECK(cudaMemset(a, 0x38, a_bytes));
    CHECK(cudaMemset(b, 0x38, b_bytes));
    const int m_al = sh.groups * sh.rows, kbt = sh.k / kBlockK;
    float *sfa = nullptr, *sfb = nullptr;
    CHECK(cudaMalloc(&sfa, size_t(m_al) * kbt * sizeof(float)));
    CHECK(cudaMalloc(&sfb, size_t(sh.groups) * (sh.n / 128) * kbt * sizeof(float)));
    CHECK(cudaMemset(sfa, 0, size_t(m_al) * kbt * sizeof(float)));
    CHECK(cudaMemset(sfb, 0, size_t(sh.groups) * (sh.n / 128) * kbt * sizeof(float)));
    const CUtensorMap map_a = make_map(encode, a, uint64_t(sh.groups) * sh.rows, sh.k, 128);
    std::printf("\n%s: %d groups x %d rows, N %d, K %d (A %.0f MB, B %.0f MB)\n%-40s %9s %9s\n",
                sh.name, sh.groups, sh.rows, sh.n, sh.k, a_bytes / 1e6, b_bytes / 1e6,
                "variant/raster", "ms", "TFLOP/s");
    for (const Variant& v : gemm_variants) {
      if (!only.empty() && only_variant != v.name) continue;
      const CUtensorMap map_b = make_map(encode, b, uint64_t(sh.groups) * sh.n, sh.k, v.nt);
      const int smem = smem_bytes(v.nt, v.stages);
      CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      for (int band : {0, 2, 4, 8}) {
        if (band && ((sh.n / v.nt) % band || !only.empty())) continue;
        const Walk walk{sh.groups, sh.rows, sh.n, sh.k, band, 0, sfa, sfb, m_al};
        const double t = timer.median_ms(
            [&] { v.kernel<<<grid, kThreads, smem>>>(src, src_bytes, 0, out, map_a, map_b, walk); },
            reps);
        const double flop = 2.0 * sh.groups * double(sh.rows) * sh.n * sh.k;
        char name[96];
        std::snprintf(name, sizeof name, "%s/%s%d", v.name, band ? "band" : "m-major", band);
        std::printf("%-40s %9.3f %9.1f\n", name, t, flop / (t * 1e-3) / 1e12);
        std::fflush(stdout);
      }
    }
    // 3. The TMA settings, on the slot-scaled 128 x 256 mainloop in m-major order: the tensor
    //    maps' L2 promotion, and loads with an L2 cache hint of policy 0 (CuTeDSL's TMA copies).
    const Variant& tv = gemm_variants[3];  // smemscaled_128x256_n128
    const struct {
      const char* name;
      CUtensorMapL2promotion promotion;
      int hint;
    } settings[] = {{"promotion 256B", CU_TENSOR_MAP_L2_PROMOTION_L2_256B, 0},
                    {"promotion 128B", CU_TENSOR_MAP_L2_PROMOTION_L2_128B, 0},
                    {"promotion none", CU_TENSOR_MAP_L2_PROMOTION_NONE, 0},
                    {"promotion 256B, hint 0", CU_TENSOR_MAP_L2_PROMOTION_L2_256B, 1},
                    {"promotion none, hint 0", CU_TENSOR_MAP_L2_PROMOTION_NONE, 1},
                    {"promotion 256B, sleeping waits", CU_TENSOR_MAP_L2_PROMOTION_L2_256B, 2},
                    {"promotion 256B, hint 0, sleeping waits", CU_TENSOR_MAP_L2_PROMOTION_L2_256B, 3}};
    for (const auto& st : settings) {
      if (!only.empty()) break;
      const CUtensorMap ma = make_map(encode, a, uint64_t(sh.groups) * sh.rows, sh.k, 128,
                                      st.promotion);
      const CUtensorMap mb = make_map(encode, b, uint64_t(sh.groups) * sh.n, sh.k, tv.nt,
                                      st.promotion);
      const int smem = smem_bytes(tv.nt, tv.stages);
      const Walk walk{sh.groups, sh.rows, sh.n, sh.k, 0, st.hint, sfa, sfb, m_al};
      const double t = timer.median_ms(
          [&] { tv.kernel<<<grid, kThreads, smem>>>(src, src_bytes, 0, out, ma, mb, walk); },
          reps);
      const double flop = 2.0 * sh.groups * double(sh.rows) * sh.n * sh.k;
      char name[96];
      std::snprintf(name, sizeof name, "%s/%s", tv.name, st.name);
      std::printf("%-40s %9.3f %9.1f\n", name, t, flop / (t * 1e-3) / 1e12);
      std::fflush(stdout);
    }
    CHECK(cudaFree(sfa));
    CHECK(cudaFree(sfb));
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
  }
  return 0;
}
