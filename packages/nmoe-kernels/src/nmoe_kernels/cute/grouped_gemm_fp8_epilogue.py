"""Epilogues of the FP8 blockscaled grouped GEMM (`grouped_gemm_fp8`), as a mixin of its kernel
class: "bf16" (round, stage in smem, predicated row stores) and "swiglu_quant" (SwiGLU of the
interleaved gate/up pairs, 1x128 FP8 quantization with the row amax reduced across the tile,
scales and FP8 rows stored). The math and the tile layout they assume are described in
`grouped_gemm_fp8`'s module docstring; the mixin reads ``tile_m``, ``tile_n``, ``wg_n``,
``threads_per_wg``, ``num_mma_threads``, ``ab_dtype`` and ``config`` from the kernel object.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr

FP8_MAX = 448.0
MIN_SCALE = 2.0**-126
SCALE_BLOCK_N = 128  # weight scale block along N == the N width of one MMA warpgroup
WG_TILE_M = 64  # rows of one MMA warpgroup (wgmma m64)


class Fp8EpilogueMixin:
    """The epilogue methods of `grouped_gemm_fp8.GroupedGemmFp8Kernel`."""

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
            if const_expr(self.config.fast_silu):
                act[p] = gate * cute.arch.rcp_approx(Float32(1.0) + cute.math.exp(-gate)) * up
            else:
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
