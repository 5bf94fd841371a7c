"""FP8 blockscaled grouped GEMM for Hopper (sm_90a) in CuTeDSL, with an optional fused
SwiGLU + FP8 quantize epilogue (the DeepSeek-V3 recipe).

Shape letters: M rows (expert-sorted), K reduction dim (K % 128 == 0), N output columns of the
GEMM (N % 128 == 0; the W13 GEMM has N = 2F), F = N / 2 SwiGLU features, E experts,
Kb = K / 128, Nb = N / 128, Fb = F / 128, M_al = M rounded up to a multiple of 4.

Operands (all device pointers, row-major unless stated):

- A: x_fp8 [M, K] E4M3, with scales xs [M, Kb] fp32 stored MN-major over storage [Kb, M_al]
  (one scale per 1x128 block along K; as `quantize_fp8_1x128` returns them with
  ``scale_layout="mn_major_tma_aligned"``).
- B: w_fp8 [E, N, K] E4M3 (K-major: FP8 WGMMA on sm_90 reads both operands K-major), with scales
  ws [E, Nb, Kb] fp32 (one per 128x128 block).
- offsets [E + 1] int32 on the device: rows offsets[e]:offsets[e+1] belong to expert e (any
  length, including 0). Nothing is read back to the host.

Math (per output element, fp32 throughout): for every 128-wide K block kb, WGMMA accumulates
sum_k x_fp8 * w_fp8 into a fresh register accumulator, which is then promoted into the main fp32
accumulator as ``acc += (xs[m, kb] * ws[e, n // 128, kb]) * partial``.

Epilogues:

- "bf16": y [M, N] bf16 = round(acc).
- "swiglu_quant": W13 columns are interleaved (column 2j = gate_j, column 2j+1 = up_j), so each
  thread holds (gate, up) pairs. In fp32: g, u = bf16(acc_gate), bf16(acc_up);
  a = bf16(silu(g) * u) -- the same roundings as the unfused bf16 path -- then per row and 1x128
  block of F: scale = max(amax / 448, 2^-126) (rounded up to a power of two with ue8m0),
  q = E4M3_rne(clamp(a * (1 / scale), -448, 448)). Writes q [M, F] E4M3 and the scales
  [M, Fb] fp32 MN-major over storage [Fb, M_al] (the layout the next GEMM's A scales use).

Kernel structure (warp specialized, persistent): warpgroup 0 is the TMA producer (one warp issues
TMA loads of the A and B tiles of each 128-deep K block into a multi-stage smem ring);
warpgroups 1-2 run WGMMA, each on a 64 x 128 sub-tile (so each warpgroup's columns sit in one
128-wide weight-scale block). Each thread loads the A scales of its two accumulator rows and the
warpgroup's weight scale with plain loads issued before the stage wait, so their latency hides
behind the wait and the block's wgmma. (The scales are not loaded by TMA: a tile's first row is
arbitrary, and a TMA box of the MN-major scale column starting at an inner coordinate that is not
16-byte aligned faults with "illegal instruction" on H200.)
Tiles: "bf16" uses 128 x 128 (warpgroups stacked along M); "swiglu_quant" uses 64 x 256
(warpgroups side by side along N), so one tile holds the 128 SwiGLU outputs of a quantization
block and the row amax is reduced in the tile (quad shuffles, then the two warpgroups exchange
through smem). The tile scheduler walks (segment, m-tile, n-tile) in order: a CTA takes linear
tiles bid, bid + grid, ... and advances a cursor over the device offsets, so segments need no
padding and no host sync. A tile's A rows may run past its segment (they belong to the next
expert or are TMA zero fill); the epilogue stores only rows of the tile's own segment, via smem
and predicated 16-byte stores. Padding rows (segment E) get zero output without a mainloop.
"""

from __future__ import annotations

from dataclasses import dataclass

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64, const_expr
from cutlass.cute.runtime import make_ptr
from cutlass.tensor_utils import LayoutEnum

__all__ = [
    "EPILOGUES",
    "GroupedGemmFp8Kernel",
    "KernelConfig",
    "compile_kernel",
    "grid_size",
    "kernel_config",
    "launch",
]

EPILOGUES = ("bf16", "swiglu_quant")
BLOCK_K = 128  # quantization block along K == the K depth of one pipeline stage
SCALE_BLOCK_N = 128  # weight scale block along N == the N width of one MMA warpgroup
WG_TILE_M = 64  # rows of one MMA warpgroup (wgmma m64)
FP8_MAX = 448.0
MIN_SCALE = 2.0**-126
_NO_MORE_TILES = 1 << 30  # tile count given to the expert cursor once it passes the last expert


@dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one compiled kernel (the compile cache key)."""

    epilogue: str
    ue8m0: bool
    tile_m: int
    tile_n: int
    num_stages: int

    @property
    def wg_layout(self) -> tuple[int, int]:
        """MMA warpgroups along (M, N); each warpgroup owns a 64 x 128 sub-tile."""
        return self.tile_m // WG_TILE_M, self.tile_n // SCALE_BLOCK_N

def _stage_bytes(tile_m: int, tile_n: int) -> int:
    return tile_m * BLOCK_K + tile_n * BLOCK_K  # A and B tiles, fp8


def _epilogue_smem_bytes(epilogue: str, tile_m: int, tile_n: int) -> int:
    if epilogue == "bf16":
        return tile_m * (tile_n + 8) * 2
    return tile_m * (tile_n // 2 + 16) + 2 * tile_m * 4


def kernel_config(epilogue: str, ue8m0: bool = False) -> KernelConfig:
    """The tile shape and stage count used for ``epilogue`` ("bf16" or "swiglu_quant")."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    tile_m, tile_n = (128, 128) if epilogue == "bf16" else (64, 256)
    smem_capacity = 232448  # sm_90: 227 KiB of dynamic shared memory per CTA
    reserved = 2048  # mbarriers, alignment padding
    free = smem_capacity - reserved - _epilogue_smem_bytes(epilogue, tile_m, tile_n)
    num_stages = min(8, free // _stage_bytes(tile_m, tile_n))
    return KernelConfig(
        epilogue, bool(ue8m0 and epilogue == "swiglu_quant"), tile_m, tile_n, num_stages
    )


class GroupedGemmFp8Kernel:
    """The CuTeDSL kernel; ``cute.compile(kernel, *args)`` with the arguments of `__call__`."""

    def __init__(self, config: KernelConfig):
        self.config = config
        self.tile_m = config.tile_m
        self.tile_n = config.tile_n
        self.num_stages = config.num_stages
        self.wg_m, self.wg_n = config.wg_layout
        self.num_mma_wgs = self.wg_m * self.wg_n
        assert self.num_mma_wgs == 2, "the kernel is written for two MMA warpgroups"
        self.threads_per_wg = 128
        self.num_threads = (1 + self.num_mma_wgs) * self.threads_per_wg
        self.num_mma_threads = self.num_mma_wgs * self.threads_per_wg
        self.producer_regs = 40
        self.mma_regs = 232
        self.fused = config.epilogue == "swiglu_quant"
        self.ab_dtype = cutlass.Float8E4M3FN
        self.acc_dtype = Float32

    # ------------------------------------------------------------------ host side (traced)

    @cute.jit
    def __call__(
        self,
        a_ptr: cute.Pointer,  # [M, K] fp8
        sfa_ptr: cute.Pointer,  # [Kb, M_al] fp32
        b_ptr: cute.Pointer,  # [E, N, K] fp8
        sfb_ptr: cute.Pointer,  # [E, Nb, Kb] fp32
        out_ptr: cute.Pointer,  # bf16 [M, N] or fp8 [M, F]
        out_sf_ptr: cute.Pointer,  # fp32 [Fb, M_al] ("swiglu_quant"; ignored for "bf16")
        offsets_ptr: cute.Pointer,  # int32 [E + 1]
        num_rows: Int32,
        n: Int32,
        k: Int32,
        num_experts: Int32,
        rows_aligned: Int32,
        num_ctas: Int32,
        stream: cuda.CUstream,
    ):
        tile_m, tile_n = self.tile_m, self.tile_n
        k = cute.assume(k, divby=BLOCK_K)
        n = cute.assume(n, divby=tile_n)
        rows_aligned = cute.assume(rows_aligned, divby=4)
        num_k_blocks = k // BLOCK_K
        num_n_blocks = n // SCALE_BLOCK_N

        m_a = cute.make_tensor(a_ptr, cute.make_layout((num_rows, k), stride=(Int64(k), 1)))
        m_sfa = cute.make_tensor(
            sfa_ptr, cute.make_layout((num_rows, num_k_blocks), stride=(1, rows_aligned))
        )
        m_b = cute.make_tensor(
            b_ptr,
            cute.make_layout((n, k, num_experts), stride=(Int64(k), 1, Int64(n) * Int64(k))),
        )
        m_sfb = cute.make_tensor(
            sfb_ptr,
            cute.make_layout(
                (num_n_blocks, num_k_blocks, num_experts),
                stride=(num_k_blocks, 1, num_n_blocks * num_k_blocks),
            ),
        )
        m_offsets = cute.make_tensor(offsets_ptr, cute.make_layout((num_experts + 1,)))
        if const_expr(self.fused):
            f = n // 2
            m_out = cute.make_tensor(out_ptr, cute.make_layout((num_rows, f), stride=(Int64(f), 1)))
            m_out_sf = cute.make_tensor(
                out_sf_ptr,
                cute.make_layout((num_rows, f // BLOCK_K), stride=(1, rows_aligned)),
            )
        else:
            m_out = cute.make_tensor(out_ptr, cute.make_layout((num_rows, n), stride=(Int64(n), 1)))
            m_out_sf = m_sfa  # unused

        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            self.ab_dtype,
            self.ab_dtype,
            cute.nvgpu.OperandMajorMode.K,
            cute.nvgpu.OperandMajorMode.K,
            self.acc_dtype,
            (self.wg_m, self.wg_n, 1),
            tiler_mn=(WG_TILE_M, SCALE_BLOCK_N),
        )
        tile_mnk = (tile_m, tile_n, BLOCK_K)
        a_smem_staged = sm90_utils.make_smem_layout_a(
            LayoutEnum.ROW_MAJOR, tile_mnk, self.ab_dtype, self.num_stages
        )
        b_smem_staged = sm90_utils.make_smem_layout_b(
            LayoutEnum.ROW_MAJOR, tile_mnk, self.ab_dtype, self.num_stages
        )

        g2s = cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp()
        tma_a, m_a_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
            g2s, m_a, cute.slice_(a_smem_staged, (None, None, 0)), (tile_m, BLOCK_K)
        )
        tma_b, m_b_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
            g2s, m_b, cute.slice_(b_smem_staged, (None, None, 0)), (tile_n, BLOCK_K)
        )

        if const_expr(self.fused):
            out_smem = cute.make_layout(
                (tile_m, tile_n // 2), stride=(tile_n // 2 + 16, 1)
            )  # fp8, rows padded by 16 B

            @cute.struct
            class SharedStorage:
                pipe_barriers: cute.struct.MemRange[Int64, self.num_stages * 2]
                s_a: cute.struct.Align[
                    cute.struct.MemRange[self.ab_dtype, cute.cosize(a_smem_staged)], 1024
                ]
                s_b: cute.struct.Align[
                    cute.struct.MemRange[self.ab_dtype, cute.cosize(b_smem_staged)], 1024
                ]
                s_out: cute.struct.Align[
                    cute.struct.MemRange[self.ab_dtype, cute.cosize(out_smem)], 128
                ]
                s_amax: cute.struct.Align[cute.struct.MemRange[Float32, 2 * tile_m], 16]

        else:
            out_smem = cute.make_layout((tile_m, tile_n), stride=(tile_n + 8, 1))  # bf16

            @cute.struct
            class SharedStorage:
                pipe_barriers: cute.struct.MemRange[Int64, self.num_stages * 2]
                s_a: cute.struct.Align[
                    cute.struct.MemRange[self.ab_dtype, cute.cosize(a_smem_staged)], 1024
                ]
                s_b: cute.struct.Align[
                    cute.struct.MemRange[self.ab_dtype, cute.cosize(b_smem_staged)], 1024
                ]
                s_out: cute.struct.Align[
                    cute.struct.MemRange[cutlass.BFloat16, cute.cosize(out_smem)], 128
                ]
                s_amax: cute.struct.Align[cute.struct.MemRange[Float32, 4], 16]

        self.shared_storage = SharedStorage

        self.kernel(
            tma_a,
            m_a_tma,
            tma_b,
            m_b_tma,
            m_sfa,
            m_sfb,
            m_out,
            m_out_sf,
            m_offsets,
            num_experts,
            num_rows,
            tiled_mma,
            a_smem_staged,
            b_smem_staged,
            out_smem,
        ).launch(
            grid=[num_ctas, 1, 1],
            block=[self.num_threads, 1, 1],
            min_blocks_per_mp=1,
            stream=stream,
        )

    # ------------------------------------------------------------------ device side

    @cute.jit
    def _advance_cursor(
        self,
        tile: Int32,
        num_n_tiles: Int32,
        m_offsets: cute.Tensor,
        num_experts: Int32,
        num_rows: Int32,
        expert: Int32,
        tiles_before: Int32,
        seg_start: Int32,
        seg_end: Int32,
        expert_tiles: Int32,
    ):
        """Move the segment cursor forward until it holds linear tile ``tile``.

        The cursor is (segment, m-tiles of the segments before it, its rows [start, end), its
        m-tile count). Segments 0..E-1 are the experts; segment E is the padding rows
        [offsets[E], M), whose tiles get zero GEMM output. Past segment E the count is
        _NO_MORE_TILES and the segment index is E + 1.
        """
        m_tile = tile // num_n_tiles
        while m_tile >= tiles_before + expert_tiles:
            tiles_before = tiles_before + expert_tiles
            expert = expert + 1
            seg_start = seg_end
            if expert < num_experts:
                seg_end = m_offsets[expert + 1]
            else:
                seg_end = num_rows
            expert_tiles = (seg_end - seg_start + (self.tile_m - 1)) // self.tile_m
            if expert > num_experts:
                expert_tiles = Int32(_NO_MORE_TILES)
        return expert, tiles_before, seg_start, seg_end, expert_tiles

    @cute.jit
    def _first_cursor(self, m_offsets: cute.Tensor):
        seg_end = m_offsets[1]
        expert_tiles = (seg_end + (self.tile_m - 1)) // self.tile_m
        return Int32(0), Int32(0), Int32(0), seg_end, expert_tiles

    @cute.kernel
    def kernel(
        self,
        tma_a: cute.CopyAtom,
        m_a_tma: cute.Tensor,
        tma_b: cute.CopyAtom,
        m_b_tma: cute.Tensor,
        m_sfa: cute.Tensor,
        m_sfb: cute.Tensor,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
        m_offsets: cute.Tensor,
        num_experts: Int32,
        num_rows: Int32,
        tiled_mma: cute.TiledMma,
        a_smem_staged: cute.ComposedLayout,
        b_smem_staged: cute.ComposedLayout,
        out_smem: cute.Layout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_a)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_b)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        s_a = storage.s_a.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
        s_b = storage.s_b.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)
        s_out = storage.s_out.get_tensor(out_smem)
        s_amax = storage.s_amax.get_tensor(
            cute.make_layout((self.tile_m, 2), stride=(1, self.tile_m))
        )

        tx_bytes = cute.size_in_bytes(
            self.ab_dtype, cute.slice_(a_smem_staged, (None, None, 0))
        ) + cute.size_in_bytes(self.ab_dtype, cute.slice_(b_smem_staged, (None, None, 0)))
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.pipe_barriers.data_ptr(),
            num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(
                pipeline.Agent.Thread, self.num_mma_threads // 32
            ),
            tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
        )
        num_n_tiles = cute.size(m_b_tma, mode=[0]) // self.tile_n
        num_k_blocks = cute.size(m_b_tma, mode=[1]) // BLOCK_K

        wg_idx = cute.arch.make_warp_uniform(tidx // self.threads_per_wg)
        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                self._producer(
                    tma_a, m_a_tma, tma_b, m_b_tma, s_a, s_b, mainloop, m_offsets, num_experts,
                    num_rows, num_n_tiles, num_k_blocks,
                )
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self._consumer(
                tidx - self.threads_per_wg, wg_idx - 1, tiled_mma, s_a, s_b, s_out, s_amax,
                mainloop, m_sfa, m_sfb, m_out, m_out_sf, m_offsets, num_experts, num_rows,
                num_n_tiles, num_k_blocks,
            )

    @cute.jit
    def _producer(
        self,
        tma_a: cute.CopyAtom,
        m_a_tma: cute.Tensor,
        tma_b: cute.CopyAtom,
        m_b_tma: cute.Tensor,
        s_a: cute.Tensor,
        s_b: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        m_offsets: cute.Tensor,
        num_experts: Int32,
        num_rows: Int32,
        num_n_tiles: Int32,
        num_k_blocks: Int32,
    ):
        """One warp: TMA loads of the A and B tiles of every K block of this CTA's tiles."""
        tile_m = self.tile_m
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        # B: (TMA, n_tile, k_block, expert), fixed over the kernel.
        g_b = cute.local_tile(m_b_tma, (self.tile_n, BLOCK_K), (None, None, None))
        t_b_s, t_b_g = cute.nvgpu.cpasync.tma_partition(
            tma_b, 0, cute.make_layout(1), cute.group_modes(s_b, 0, 2), cute.group_modes(g_b, 0, 2)
        )
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        tile = Int32(bid)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._first_cursor(m_offsets)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
            tile, num_n_tiles, m_offsets, num_experts, num_rows,
            expert, tiles_before, seg_start, seg_end, expert_tiles,
        )  # fmt: skip
        while expert <= num_experts:
            m_tile = tile // num_n_tiles
            n_tile = tile - m_tile * num_n_tiles
            row0 = seg_start + (m_tile - tiles_before) * tile_m
            if expert < num_experts:  # the padding segment loads nothing
                g_a = cute.local_tile(
                    cute.domain_offset((row0, 0), m_a_tma), (tile_m, BLOCK_K), (0, None)
                )
                t_a_s, t_a_g = cute.nvgpu.cpasync.tma_partition(
                    tma_a, 0, cute.make_layout(1),
                    cute.group_modes(s_a, 0, 2), cute.group_modes(g_a, 0, 2),
                )  # fmt: skip
                for kb in cutlass.range(0, num_k_blocks, 1, unroll=1):
                    mainloop.producer_acquire(state)
                    barrier = mainloop.producer_get_barrier(state)
                    cute.copy(
                        tma_a, t_a_g[(None, kb)], t_a_s[(None, state.index)], tma_bar_ptr=barrier
                    )
                    cute.copy(
                        tma_b,
                        t_b_g[(None, n_tile, kb, expert)],
                        t_b_s[(None, state.index)],
                        tma_bar_ptr=barrier,
                    )
                    mainloop.producer_commit(state)
                    state.advance()
            tile = tile + grid
            expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
                tile, num_n_tiles, m_offsets, num_experts, num_rows,
                expert, tiles_before, seg_start, seg_end, expert_tiles,
            )  # fmt: skip
        mainloop.producer_tail(state)

    @cute.jit
    def _consumer(
        self,
        mma_tidx: Int32,
        mma_wg: Int32,
        tiled_mma: cute.TiledMma,
        s_a: cute.Tensor,
        s_b: cute.Tensor,
        s_out: cute.Tensor,
        s_amax: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        m_sfa: cute.Tensor,
        m_sfb: cute.Tensor,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
        m_offsets: cute.Tensor,
        num_experts: Int32,
        num_rows: Int32,
        num_n_tiles: Int32,
        num_k_blocks: Int32,
    ):
        """Two MMA warpgroups: blockscaled mainloop with per-K-block promotion, then epilogue."""
        tile_m, tile_n = self.tile_m, self.tile_n
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        wg_tidx = mma_tidx - mma_wg * self.threads_per_wg
        wg_n_idx = mma_wg % self.wg_n  # this warpgroup's 128-column block inside the tile

        thr_mma_wg = tiled_mma.get_slice(mma_wg * self.threads_per_wg)
        t_c_ra = tiled_mma.make_fragment_A(thr_mma_wg.partition_A(s_a))
        t_c_rb = tiled_mma.make_fragment_B(thr_mma_wg.partition_B(s_b))
        num_mma_k = cute.size(t_c_ra, mode=[2])

        thr_mma = tiled_mma.get_slice(mma_tidx)
        t_c_coord = thr_mma.partition_C(cute.make_identity_tensor((tile_m, tile_n)))
        acc = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        partial = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        # wgmma m64 accumulator fragment ((2, 2, N/8), 1, 1): value v sits in row
        # base + 8 * ((v // 2) % 2) and column base + (v % 2) + 8 * (v // 4).
        row_lo = t_c_coord[0][0]
        row_hi = t_c_coord[2][0]

        wg_barrier = pipeline.NamedBarrier(barrier_id=1 + mma_wg, num_threads=self.threads_per_wg)
        mma_barrier = pipeline.NamedBarrier(barrier_id=3, num_threads=self.num_mma_threads)

        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.num_stages)
        tile = Int32(bid)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._first_cursor(m_offsets)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
            tile, num_n_tiles, m_offsets, num_experts, num_rows,
            expert, tiles_before, seg_start, seg_end, expert_tiles,
        )  # fmt: skip
        while expert <= num_experts:
            m_tile = tile // num_n_tiles
            n_tile = tile - m_tile * num_n_tiles
            row0 = seg_start + (m_tile - tiles_before) * tile_m
            valid_rows = cutlass.min(seg_end - row0, tile_m)
            n_block = n_tile * (tile_n // SCALE_BLOCK_N) + wg_n_idx
            # rows past M only feed rows that are never stored: clamp their scale reads
            sfa_row_lo = cutlass.min(row0 + row_lo, num_rows - 1)
            sfa_row_hi = cutlass.min(row0 + row_hi, num_rows - 1)

            acc.fill(0.0)
            if expert < num_experts:  # padding rows get a zero product
                for kb in cutlass.range(0, num_k_blocks, 1, unroll=1):
                    # The scale loads issue before the wait; their latency hides behind it and
                    # the block's wgmma.
                    scale_b = m_sfb[(n_block, kb, expert)]
                    scale_a_lo = m_sfa[(sfa_row_lo, kb)]
                    scale_a_hi = m_sfa[(sfa_row_hi, kb)]
                    mainloop.consumer_wait(state)
                    cute.nvgpu.warpgroup.fence()
                    tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
                    for kk in cutlass.range_constexpr(num_mma_k):
                        coord = (None, None, kk, state.index)
                        cute.gemm(tiled_mma, partial, t_c_ra[coord], t_c_rb[coord], partial)
                        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                    cute.nvgpu.warpgroup.commit_group()
                    cute.nvgpu.warpgroup.wait_group(0)
                    mainloop.consumer_release(state)
                    state.advance()
                    # promotion: acc += (x_scale * w_scale) * partial, per accumulator row
                    scale_lo = scale_a_lo * scale_b
                    scale_hi = scale_a_hi * scale_b
                    for v in cutlass.range_constexpr(cute.size(acc)):
                        if const_expr((v // 2) % 2 == 0):
                            acc[v] = acc[v] + scale_lo * partial[v]
                        else:
                            acc[v] = acc[v] + scale_hi * partial[v]

            if const_expr(self.fused):
                self._epilogue_swiglu_quant(
                    acc, t_c_coord, s_out, s_amax, m_out, m_out_sf, row0, valid_rows, n_tile,
                    mma_tidx, wg_tidx, wg_n_idx, mma_barrier,
                )
            else:
                self._epilogue_bf16(
                    acc, thr_mma, s_out, m_out, row0, valid_rows, n_tile, mma_wg, wg_tidx,
                    wg_barrier,
                )
            cute.arch.sync_warp()  # reconverge after the predicated stores, before wgmma
            tile = tile + grid
            expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
                tile, num_n_tiles, m_offsets, num_experts, num_rows,
                expert, tiles_before, seg_start, seg_end, expert_tiles,
            )  # fmt: skip

    @cute.jit
    def _epilogue_bf16(
        self,
        acc: cute.Tensor,
        thr_mma: cute.core.ThrMma,
        s_out: cute.Tensor,
        m_out: cute.Tensor,
        row0: Int32,
        valid_rows: Int32,
        n_tile: Int32,
        mma_wg: Int32,
        wg_tidx: Int32,
        wg_barrier: pipeline.NamedBarrier,
    ):
        """Round to bf16, stage this warpgroup's 64 x 128 block in smem, store valid rows."""
        wg_rows = WG_TILE_M
        wg_cols = SCALE_BLOCK_N
        wg_m_idx = mma_wg // self.wg_n
        wg_n_idx = mma_wg % self.wg_n
        acc_bf16 = cute.make_fragment_like(acc, cutlass.BFloat16)
        acc_bf16.store(acc.load().to(cutlass.BFloat16))
        wg_barrier.arrive_and_wait()  # the previous tile's reads of s_out are done
        cute.autovec_copy(acc_bf16, thr_mma.partition_C(s_out))
        wg_barrier.arrive_and_wait()

        s_blk = cute.local_tile(s_out, (wg_rows, wg_cols), (wg_m_idx, wg_n_idx))
        g_tile = cute.local_tile(
            cute.domain_offset((row0, 0), m_out), (self.tile_m, self.tile_n), (0, n_tile)
        )
        g_blk = cute.local_tile(g_tile, (wg_rows, wg_cols), (wg_m_idx, wg_n_idx))
        self._store_rows(
            s_blk, g_blk, valid_rows - wg_m_idx * wg_rows, wg_tidx, self.threads_per_wg,
            cutlass.BFloat16,
        )

    @cute.jit
    def _epilogue_swiglu_quant(
        self,
        acc: cute.Tensor,
        t_c_coord: cute.Tensor,
        s_out: cute.Tensor,
        s_amax: cute.Tensor,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
        row0: Int32,
        valid_rows: Int32,
        n_tile: Int32,
        mma_tidx: Int32,
        wg_tidx: Int32,
        wg_n_idx: Int32,
        mma_barrier: pipeline.NamedBarrier,
    ):
        """SwiGLU of interleaved (gate, up) pairs, 1x128 FP8 quantization, store valid rows."""
        num_pairs = cute.size(acc) // 2
        # Round gate/up to bf16 as the unfused path does (GEMM output in bf16).
        h = cute.make_fragment_like(acc)
        h.store(acc.load().to(cutlass.BFloat16).to(Float32))
        act = cute.make_rmem_tensor((num_pairs,), Float32)
        for p in cutlass.range_constexpr(num_pairs):
            # pair p = values (2p, 2p+1) of the fragment: (gate, up) of one feature
            gate = h[2 * p]
            up = h[2 * p + 1]
            act[p] = gate / (Float32(1.0) + cute.math.exp(-gate)) * up
        act.store(act.load().to(cutlass.BFloat16).to(Float32))

        # Row amax: pair p belongs to row half (p % 2) (lo rows: even p, hi rows: odd p).
        amax_lo = Float32(0.0)
        amax_hi = Float32(0.0)
        for p in cutlass.range_constexpr(num_pairs):
            if const_expr(p % 2 == 0):
                amax_lo = cutlass.max(amax_lo, cute.math.absf(act[p]))
            else:
                amax_hi = cutlass.max(amax_hi, cute.math.absf(act[p]))
        for offset in cutlass.range_constexpr(2):  # the 4 lanes of a quad share the rows
            amax_lo = cutlass.max(amax_lo, cute.arch.shuffle_sync_bfly(amax_lo, offset=1 << offset))
            amax_hi = cutlass.max(amax_hi, cute.arch.shuffle_sync_bfly(amax_hi, offset=1 << offset))
        row_lo = t_c_coord[0][0]
        row_hi = t_c_coord[2][0]
        s_amax[(row_lo, wg_n_idx)] = amax_lo
        s_amax[(row_hi, wg_n_idx)] = amax_hi
        mma_barrier.arrive_and_wait()  # amax of both halves visible; previous s_out reads done
        amax_lo = cutlass.max(s_amax[(row_lo, 0)], s_amax[(row_lo, 1)])
        amax_hi = cutlass.max(s_amax[(row_hi, 0)], s_amax[(row_hi, 1)])
        scale_lo = self._fp8_scale(amax_lo)
        scale_hi = self._fp8_scale(amax_hi)
        inv_lo = Float32(1.0) / scale_lo
        inv_hi = Float32(1.0) / scale_hi

        q = cute.make_rmem_tensor((num_pairs,), Float32)
        for p in cutlass.range_constexpr(num_pairs):
            inv = inv_lo if const_expr(p % 2 == 0) else inv_hi
            q[p] = cutlass.min(cutlass.max(act[p] * inv, Float32(-FP8_MAX)), Float32(FP8_MAX))
        q8 = cute.make_rmem_tensor((num_pairs,), self.ab_dtype)
        q8.store(q.load().to(self.ab_dtype))
        for p in cutlass.range_constexpr(num_pairs):
            coord = t_c_coord[2 * p]  # the gate column 2j of feature j
            s_out[(coord[0], coord[1] // 2)] = q8[p]
        mma_barrier.arrive_and_wait()

        # Scales: one thread per row (lane 0 of each quad in the first warpgroup).
        if wg_n_idx == 0:
            if wg_tidx % 4 == 0:
                if row_lo < valid_rows:
                    m_out_sf[(row0 + row_lo, n_tile)] = scale_lo
                if row_hi < valid_rows:
                    m_out_sf[(row0 + row_hi, n_tile)] = scale_hi

        out_cols = self.tile_n // 2
        g_tile = cute.local_tile(
            cute.domain_offset((row0, 0), m_out), (self.tile_m, out_cols), (0, n_tile)
        )
        self._store_rows(s_out, g_tile, valid_rows, mma_tidx, self.num_mma_threads, self.ab_dtype)

    @cute.jit
    def _store_rows(
        self,
        s_blk: cute.Tensor,
        g_blk: cute.Tensor,
        valid_rows: Int32,
        tidx: Int32,
        num_threads: cutlass.Constexpr[int],
        dtype: cutlass.Constexpr,
    ):
        """Copy rows [0, valid_rows) of a row-major smem block to global in 16-byte chunks.

        Rows of both blocks start at 16-byte aligned addresses (padded smem rows; global rows of
        N bf16 or F fp8 elements with N % 128 == 0).
        """
        rows, cols = s_blk.shape
        elems = 128 // dtype.width
        chunks_per_row = cols // elems
        rows_per_pass = num_threads // chunks_per_row
        row = tidx // chunks_per_row
        col = (tidx % chunks_per_row) * elems
        frag = cute.make_rmem_tensor((elems,), dtype)
        for i in cutlass.range_constexpr(rows // rows_per_pass):
            r = row + i * rows_per_pass
            if r < valid_rows:
                src = cute.make_tensor(
                    (s_blk.iterator + s_blk.layout((r, col))).align(16), cute.make_layout(elems)
                )
                dst = cute.make_tensor(
                    (g_blk.iterator + g_blk.layout((r, col))).align(16), cute.make_layout(elems)
                )
                cute.autovec_copy(src, frag)
                cute.autovec_copy(frag, dst)

    @cute.jit
    def _fp8_scale(self, amax: Float32) -> Float32:
        """max(amax / 448, 2^-126), rounded up to a power of two with ue8m0 (the reference rule)."""
        scale = amax / Float32(FP8_MAX)
        if scale < Float32(MIN_SCALE):
            scale = Float32(MIN_SCALE)
        if const_expr(self.config.ue8m0):
            bits = cute.make_rmem_tensor((1,), Float32)
            bits[0] = scale
            as_int = cute.recast_tensor(bits, Int32)
            as_int[0] = (as_int[0] + 0x007FFFFF) & 0x7F800000
            scale = bits[0]
        return scale


def grid_size(num_rows: int, n: int, num_experts: int, config: KernelConfig, num_sms: int) -> int:
    """Persistent CTAs to launch: at most one per SM and never more than the tile upper bound.

    Each of the E + 1 segments (experts, then padding) adds at most one partial m-tile, so
    m-tiles <= M // tile_m + E + 1.
    """
    max_tiles = (num_rows // config.tile_m + num_experts + 1) * (n // config.tile_n)
    return max(1, min(num_sms, max_tiles))


def _pointer_args(epilogue: str, a, sfa, b, sfb, out, out_sf, offsets) -> tuple:
    gmem = cute.AddressSpace.gmem
    fp8 = cutlass.Float8E4M3FN
    out_dtype = cutlass.BFloat16 if epilogue == "bf16" else fp8
    return (
        make_ptr(fp8, a, gmem, assumed_align=16),
        make_ptr(Float32, sfa, gmem, assumed_align=16),
        make_ptr(fp8, b, gmem, assumed_align=16),
        make_ptr(Float32, sfb, gmem, assumed_align=16),
        make_ptr(out_dtype, out, gmem, assumed_align=16),
        make_ptr(Float32, out_sf, gmem, assumed_align=16),
        make_ptr(Int32, offsets, gmem, assumed_align=4),
    )


def compile_kernel(epilogue: str, ue8m0: bool = False, *, ptx_dir: str | None = None):
    """Compile the kernel for ``epilogue`` for sm_90a (all shapes symbolic); needs no GPU.

    Returns the compiled callable that `launch` runs. With ``ptx_dir`` the PTX is also written
    there and kept in the result's ``.artifacts.PTX``.
    """
    kernel = GroupedGemmFp8Kernel(kernel_config(epilogue, ue8m0))
    pointers = _pointer_args(epilogue, 0, 0, 0, 0, 0, 0, 0)
    sizes = tuple(Int32(v) for v in (128, 256, 128, 1, 128, 1))
    options = "--gpu-arch=sm_90a"
    if ptx_dir is not None:
        options += f" --keep-ptx --dump-dir={ptx_dir}"
    return cute.compile(kernel, *pointers, *sizes, cuda.CUstream(0), options=options)


def launch(
    compiled,
    epilogue: str,
    a: int,
    sfa: int,
    b: int,
    sfb: int,
    out: int,
    out_sf: int,
    offsets: int,
    num_rows: int,
    n: int,
    k: int,
    num_experts: int,
    rows_aligned: int,
    num_sms: int,
    stream: int,
) -> None:
    """Run a `compile_kernel` result on device addresses (the wrapper validates them)."""
    num_ctas = grid_size(num_rows, n, num_experts, kernel_config(epilogue), num_sms)
    compiled(
        *_pointer_args(epilogue, a, sfa, b, sfb, out, out_sf, offsets),
        Int32(num_rows),
        Int32(n),
        Int32(k),
        Int32(num_experts),
        Int32(rows_aligned),
        Int32(num_ctas),
        cuda.CUstream(stream),
    )
