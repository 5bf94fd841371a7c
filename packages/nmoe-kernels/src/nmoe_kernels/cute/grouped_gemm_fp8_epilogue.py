"""Epilogues of the FP8 blockscaled grouped GEMM (`grouped_gemm_fp8`), as a mixin of its kernel
class: "bf16" (round, stage in smem, predicated row stores) and "swiglu_quant" (SwiGLU of the
interleaved gate/up pairs, 1x128 FP8 quantization with the row amax reduced across the
quantization block, scales and FP8 rows stored) -- on paired 128 x 128 tiles (two halves, the
first half's activations kept in smem) or on 64 x 256 tiles (row maxima exchanged between the
warpgroups). The math and the tile layout they assume are described in
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
BLOCK_K = 128  # quantization block along K == the K depth of one pipeline stage
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
        col_block: Int32,
        mma_wg: Int32,
        wg_tidx: Int32,
        wg_barrier: pipeline.NamedBarrier,
    ):
        """Round to bf16, stage this warpgroup's 64 x 128 block in smem, store valid rows;
        ``col_block`` is the block's column offset in units of 128."""
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
        g_blk = cute.local_tile(
            cute.domain_offset((row0, 0), m_out), (wg_rows, wg_cols), (wg_m_idx, col_block)
        )
        self._store_rows(
            s_blk, g_blk, valid_rows - wg_m_idx * wg_rows, wg_tidx, self.threads_per_wg,
            cutlass.BFloat16,
        )

    @cute.jit
    def _swiglu_act(self, acc: cute.Tensor) -> cute.Tensor:
        """silu(gate) * up of the interleaved (gate, up) pairs of ``acc``, with the unfused bf16
        path's roundings: g, u = bf16(acc) and a = bf16(silu(g) * u), held in float32. Pair p
        is values (2p, 2p + 1) of the fragment: row lo for even p, row hi for odd p."""
        num_pairs = cute.size(acc) // 2
        h = cute.make_fragment_like(acc)
        h.store(acc.load().to(cutlass.BFloat16).to(Float32))
        act = cute.make_rmem_tensor((num_pairs,), Float32)
        for p in cutlass.range_constexpr(num_pairs):
            gate = h[2 * p]
            up = h[2 * p + 1]
            if const_expr(self.config.fast_silu):
                act[p] = gate * cute.arch.rcp_approx(Float32(1.0) + cute.math.exp(-gate)) * up
            else:
                act[p] = gate / (Float32(1.0) + cute.math.exp(-gate)) * up
        act.store(act.load().to(cutlass.BFloat16).to(Float32))
        return act

    @cute.jit
    def _quad_row_amax(self, act: cute.Tensor):
        """(max |a| of row lo, of row hi) over the 4 lanes of a quad, which share both rows."""
        amax_lo = Float32(0.0)
        amax_hi = Float32(0.0)
        for p in cutlass.range_constexpr(cute.size(act)):
            if const_expr(p % 2 == 0):
                amax_lo = cutlass.max(amax_lo, cute.math.absf(act[p]))
            else:
                amax_hi = cutlass.max(amax_hi, cute.math.absf(act[p]))
        for offset in cutlass.range_constexpr(2):
            amax_lo = cutlass.max(amax_lo, cute.arch.shuffle_sync_bfly(amax_lo, offset=1 << offset))
            amax_hi = cutlass.max(amax_hi, cute.arch.shuffle_sync_bfly(amax_hi, offset=1 << offset))
        return amax_lo, amax_hi

    @cute.jit
    def _quantize_pairs(self, act: cute.Tensor, inv_lo: Float32, inv_hi: Float32) -> cute.Tensor:
        """E4M3_rne(clamp(a * (1 / scale), -448, 448)) of each pair's activation."""
        num_pairs = cute.size(act)
        q = cute.make_rmem_tensor((num_pairs,), Float32)
        for p in cutlass.range_constexpr(num_pairs):
            inv = inv_lo if const_expr(p % 2 == 0) else inv_hi
            q[p] = cutlass.min(cutlass.max(act[p] * inv, Float32(-FP8_MAX)), Float32(FP8_MAX))
        q8 = cute.make_rmem_tensor((num_pairs,), self.ab_dtype)
        q8.store(q.load().to(self.ab_dtype))
        return q8

    @cute.jit
    def _store_row_scales(self, m_out_sf, row0, valid_rows, row_lo, row_hi, col, scale_lo,
                          scale_hi):
        """Scale of rows lo / hi (if stored) at column ``col``; lane 0 of each quad writes."""
        if row_lo < valid_rows:
            m_out_sf[(row0 + row_lo, col)] = scale_lo
        if row_hi < valid_rows:
            m_out_sf[(row0 + row_hi, col)] = scale_hi

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
        """64 x 256 tiles (warpgroups side by side): SwiGLU of interleaved (gate, up) pairs,
        1x128 FP8 quantization with the row amax exchanged through smem, store valid rows."""
        num_pairs = cute.size(acc) // 2
        act = self._swiglu_act(acc)
        amax_lo, amax_hi = self._quad_row_amax(act)
        row_lo = t_c_coord[0][0]
        row_hi = t_c_coord[2][0]
        s_amax[(row_lo, wg_n_idx)] = amax_lo
        s_amax[(row_hi, wg_n_idx)] = amax_hi
        mma_barrier.arrive_and_wait()  # amax of both halves visible; previous s_out reads done
        amax_lo = cutlass.max(s_amax[(row_lo, 0)], s_amax[(row_lo, 1)])
        amax_hi = cutlass.max(s_amax[(row_hi, 0)], s_amax[(row_hi, 1)])
        scale_lo, scale_hi, inv_lo, inv_hi = self._row_scales(amax_lo, amax_hi)
        q8 = self._quantize_pairs(act, inv_lo, inv_hi)
        for p in cutlass.range_constexpr(num_pairs):
            coord = t_c_coord[2 * p]  # the gate column 2j of feature j
            s_out[(coord[0], coord[1] // 2)] = q8[p]
        mma_barrier.arrive_and_wait()

        if wg_n_idx == 0:  # one thread per row: lane 0 of each quad in the first warpgroup
            if wg_tidx % 4 == 0:
                self._store_row_scales(
                    m_out_sf, row0, valid_rows, row_lo, row_hi, n_tile, scale_lo, scale_hi
                )

        out_cols = self.tile_n // 2
        g_tile = cute.local_tile(
            cute.domain_offset((row0, 0), m_out), (self.tile_m, out_cols), (0, n_tile)
        )
        self._store_rows(s_out, g_tile, valid_rows, mma_tidx, self.num_mma_threads, self.ab_dtype)

    @cute.jit
    def _epilogue_swiglu_first_half(self, acc: cute.Tensor, s_stash: cute.Tensor, mma_tidx: Int32):
        """Paired 128 x 128 tiles, first column half (features 0-63 of the quantization block):
        SwiGLU; the activations (as bf16) and the two row maxima go to this thread's smem slots
        (kept out of registers, which the next half's K loop needs)."""
        act = self._swiglu_act(acc)
        amax = cute.make_rmem_tensor((2,), Float32)
        amax[0], amax[1] = self._quad_row_amax(act)
        a16 = cute.make_rmem_tensor((cute.size(act),), cutlass.BFloat16)
        a16.store(act.load().to(cutlass.BFloat16))  # exact: act holds bf16 values
        words = cute.recast_tensor(a16, Int32)
        for w in cutlass.range_constexpr(cute.size(words)):
            s_stash[(w, mma_tidx)] = words[w]
        amax_words = cute.recast_tensor(amax, Int32)
        s_stash[(cute.size(words), mma_tidx)] = amax_words[0]
        s_stash[(cute.size(words) + 1, mma_tidx)] = amax_words[1]

    @cute.jit
    def _epilogue_swiglu_second_half(
        self,
        acc: cute.Tensor,
        t_c_coord: cute.Tensor,
        s_stash: cute.Tensor,
        s_out: cute.Tensor,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
        row0: Int32,
        valid_rows: Int32,
        n_tile: Int32,
        mma_tidx: Int32,
        mma_wg: Int32,
        wg_tidx: Int32,
        wg_barrier: pipeline.NamedBarrier,
    ):
        """Paired 128 x 128 tiles, second column half: SwiGLU, row amax over both halves (each
        warpgroup owns its 64 rows, so no exchange), 1x128 quantization of both halves, FP8
        rows staged in smem and stored with the scales."""
        num_pairs = cute.size(acc) // 2
        act = self._swiglu_act(acc)
        amax_lo, amax_hi = self._quad_row_amax(act)
        amax0_words = cute.make_rmem_tensor((2,), Int32)
        amax0_words[0] = s_stash[(num_pairs // 2, mma_tidx)]
        amax0_words[1] = s_stash[(num_pairs // 2 + 1, mma_tidx)]
        amax0 = cute.recast_tensor(amax0_words, Float32)
        amax_lo = cutlass.max(amax_lo, amax0[0])
        amax_hi = cutlass.max(amax_hi, amax0[1])
        scale_lo, scale_hi, inv_lo, inv_hi = self._row_scales(amax_lo, amax_hi)
        words = cute.make_rmem_tensor((num_pairs // 2,), Int32)
        for w in cutlass.range_constexpr(num_pairs // 2):
            words[w] = s_stash[(w, mma_tidx)]
        act0 = cute.make_rmem_tensor((num_pairs,), Float32)
        act0.store(cute.recast_tensor(words, cutlass.BFloat16).load().to(Float32))
        q0 = self._quantize_pairs(act0, inv_lo, inv_hi)
        q1 = self._quantize_pairs(act, inv_lo, inv_hi)
        self._store_quantized_block(
            q0, q1, scale_lo, scale_hi, t_c_coord, s_out, m_out, m_out_sf, row0, valid_rows,
            n_tile, mma_wg, wg_tidx, wg_barrier,
        )  # fmt: skip

    @cute.jit
    def _store_quantized_block(
        self,
        q0: cute.Tensor,
        q1: cute.Tensor,
        scale_lo: Float32,
        scale_hi: Float32,
        t_c_coord: cute.Tensor,
        s_out: cute.Tensor,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
        row0: Int32,
        valid_rows: Int32,
        n_tile: Int32,
        mma_wg: Int32,
        wg_tidx: Int32,
        wg_barrier: pipeline.NamedBarrier,
    ):
        """The end of a swiglu_quant epilogue whose warpgroups own whole rows of a 128-feature
        quantization block: ``q0`` / ``q1`` are this thread's FP8 codes of the block's first and
        second 64 features (pairs at ``t_c_coord`` of a 128-column half) and ``scale_*`` its rows'
        scales. Stages the FP8 rows in smem and stores them with the scales (block ``n_tile`` of
        F / 128)."""
        num_pairs = cute.size(q1)
        wg_barrier.arrive_and_wait()  # this warpgroup's reads of its s_out rows are done
        half = SCALE_BLOCK_N // 2
        for p in cutlass.range_constexpr(num_pairs):
            coord = t_c_coord[2 * p]  # the gate column 2j of feature j (of this half)
            s_out[(coord[0], coord[1] // 2)] = q0[p]
            s_out[(coord[0], half + coord[1] // 2)] = q1[p]
        wg_barrier.arrive_and_wait()

        if wg_tidx % 4 == 0:  # one thread per row: lane 0 of each quad
            self._store_row_scales(
                m_out_sf, row0, valid_rows, t_c_coord[0][0], t_c_coord[2][0], n_tile, scale_lo,
                scale_hi,
            )  # fmt: skip
        s_blk = cute.local_tile(s_out, (WG_TILE_M, SCALE_BLOCK_N), (mma_wg, 0))
        g_tile = cute.local_tile(
            cute.domain_offset((row0, 0), m_out), (self.tile_m, SCALE_BLOCK_N), (0, n_tile)
        )
        g_blk = cute.local_tile(g_tile, (WG_TILE_M, SCALE_BLOCK_N), (mma_wg, 0))
        self._store_rows(
            s_blk, g_blk, valid_rows - mma_wg * WG_TILE_M, wg_tidx, self.threads_per_wg,
            self.ab_dtype,
        )  # fmt: skip

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
    def _row_scales(self, amax_lo: Float32, amax_hi: Float32):
        """(scale lo, scale hi, 1 / scale lo, 1 / scale hi) of rows lo / hi (`_fp8_scale`; the
        reciprocal correctly rounded, as the reference's)."""
        scale_lo = self._fp8_scale(amax_lo)
        scale_hi = self._fp8_scale(amax_hi)
        return scale_lo, scale_hi, Float32(1.0) / scale_lo, Float32(1.0) / scale_hi

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
