"""The wide tile of the FP8 blockscaled grouped GEMM (`grouped_gemm_fp8`, ``tile=(128, 256)``), as
a mixin of its kernel class: the ``_wide_*`` per-tile methods that the kernel's tile loop
(`_consumer`) calls on this tile shape -- operand setup, K loop, epilogue.

Why: on 128 x 128 tiles the mainloop reads 32 KiB of A and B per 128-deep K block, 4 MFLOP,
and runs at about half the H100's FP8 peak with L2 busy 66-86% of the cycles
(bench/results/fp8_H100_ncu.txt). A 128 x 256 tile reads 48 KiB for 8 MFLOP: 25% fewer operand
bytes per FLOP (with a (2, 1) cluster multicasting B, half of the 128 x 128 tile's).

The register budget decides the layout. Each of the two MMA warpgroups owns 64 rows x 256 columns:
two fp32 accumulators of 64 registers per thread (one per 128-column half, ``acc0`` and
``acc1``) and one 64-register block accumulator ``partial`` -- 192 registers, as many as the
128 x 128 tile's overlapped promotion holds (a 64 x 256 block accumulator would not fit). Per K
block a warpgroup runs, one after the other:

    wgmma(A_kb, B_kb[columns   0-127]) -> partial; wait; acc0 += s_a * s_b0 * partial
    wgmma(A_kb, B_kb[columns 128-255]) -> partial; wait; release the stage;
    acc1 += s_a * s_b1 * partial

with s_a the row's activation scale of block kb and s_b0 / s_b1 the weight scales of the two
128-column blocks (each half sits in one weight-scale block, so a half's promotion needs one
product per row), read from the stage's scale slot (`Fp8MainloopMixin._load_scales`) before
the first wait. A warpgroup's own promotion does not overlap its wgmma (one block accumulator);
the two warpgroups share the tensor cores and take turns: while one promotes, the other's wgmma
runs (DeepGEMM's sm90 FP8 kernels rely on the same). The promotion order per output element is
the 128 x 128 tile's -- K blocks in order, ``acc += (s_a * s_b) * partial`` -- so every tile
shape writes the same bits.

With ``epi_overlap`` a warpgroup issues the first half-block (K block 0, columns 0-127) of its
next tile before it runs the epilogue, as the 128 x 128 tile's loop does; that loop is peeled the
same way (its last tile after it) so the in-flight ``partial`` never meets a branch merge.

Epilogues: "bf16" stages and stores the two 128-column halves one after the other through a
128 x 128 smem buffer (3 pipeline stages of 48 KiB fit beside it); "swiglu_quant" has the whole
128-feature quantization block of its rows in registers: SwiGLU of both halves, the row amax over
both (quad shuffles), 1x128 quantization and FP8 stores (`_store_quantized_block`, shared with
the paired 128 x 128 tile's second half).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32, const_expr

from .grouped_gemm_fp8_epilogue import BLOCK_K, SCALE_BLOCK_N
from .scheduler import consumer_wait


class Fp8WideMixin:
    """The ``tile=(128, 256)`` methods of `grouped_gemm_fp8.GroupedGemmFp8Kernel`."""

    @cute.jit
    def _wide_first(self, mma: tuple, tiled_mma: cute.TiledMma, state: pipeline.PipelineState):
        """Issue K block 0's first half into ``partial`` (not waited for; its stage, scale slot
        included, stays held until `_wide_finish_block`)."""
        t_c_ra, t_c_rb0, t_c_rb1, acc0, acc1, partial, mainloop, sc = mma
        consumer_wait(mainloop, state)
        tiled_mma = self._issue_block(
            tiled_mma, partial, t_c_ra, t_c_rb0, state.index, cute.size(t_c_ra, mode=[2])
        )
        return state, tiled_mma

    @cute.jit
    def _wide_finish_block(self, k: tuple, tiled_mma: cute.TiledMma,
                           state: pipeline.PipelineState):
        """Finish the K block at ``state`` whose first half is in flight in ``partial``: promote
        it into ``acc0``, run the second half, release the stage, promote into ``acc1`` (each
        half's scales read from the stage's slot before its wait)."""
        t_c_ra, t_c_rb1, acc0, acc1, partial, mainloop, sc = k
        s_lo0, s_hi0 = self._block_scales(sc, state.index)
        if const_expr(self.config.early_scales):
            s_lo1, s_hi1 = self._block_scales(sc, state.index, 1)
        cute.nvgpu.warpgroup.wait_group(0)
        self._promote(acc0, partial, s_lo0, s_hi0)
        tiled_mma = self._issue_block(
            tiled_mma, partial, t_c_ra, t_c_rb1, state.index, cute.size(t_c_ra, mode=[2])
        )
        if const_expr(not self.config.early_scales):
            s_lo1, s_hi1 = self._block_scales(sc, state.index, 1)
        cute.nvgpu.warpgroup.wait_group(0)
        mainloop.consumer_release(state)
        state.advance()
        self._promote(acc1, partial, s_lo1, s_hi1)
        return state, tiled_mma

    @cute.jit
    def _wide_rest(self, mma: tuple, tiled_mma: cute.TiledMma, state: pipeline.PipelineState,
                   num_k_blocks: Int32):
        """The K loop after `_wide_first`: every block promoted into ``acc0`` / ``acc1`` and
        every stage released."""
        t_c_ra, t_c_rb0, t_c_rb1, acc0, acc1, partial, mainloop, sc = mma
        k = (t_c_ra, t_c_rb1, acc0, acc1, partial, mainloop, sc)
        num_mma_k = cute.size(t_c_ra, mode=[2])
        for _kb in cutlass.range(1, num_k_blocks, 1, unroll=1):
            state, tiled_mma = self._wide_finish_block(k, tiled_mma, state)
            consumer_wait(mainloop, state)
            tiled_mma = self._issue_block(
                tiled_mma, partial, t_c_ra, t_c_rb0, state.index, num_mma_k
            )
        state, tiled_mma = self._wide_finish_block(k, tiled_mma, state)
        return state, tiled_mma

    @cute.jit
    def _epilogue_wide(
        self,
        epi: tuple,
        acc0: cute.Tensor,
        acc1: cute.Tensor,
        row0: Int32,
        valid_rows: Int32,
        n_tile: Int32,
    ):
        """The configured epilogue of a 128 x 256 tile (``skip_epilogue``: only in a branch
        that never runs, which keeps the mainloop's results live)."""
        thr_mma, t_c_coord, s_out, m_out, m_out_sf, mma_wg, wg_tidx, wg_barrier = epi
        if const_expr(self.config.skip_epilogue):
            run = valid_rows < Int32(-(1 << 30))
        else:
            run = True
        if run:
            if const_expr(self.fused):
                act0 = self._swiglu_act(acc0)
                act1 = self._swiglu_act(acc1)
                lo0, hi0 = self._quad_row_amax(act0)
                lo1, hi1 = self._quad_row_amax(act1)
                scale_lo, scale_hi, inv_lo, inv_hi = self._row_scales(
                    cutlass.max(lo0, lo1), cutlass.max(hi0, hi1)
                )
                q0 = self._quantize_pairs(act0, inv_lo, inv_hi)
                q1 = self._quantize_pairs(act1, inv_lo, inv_hi)
                self._store_quantized_block(
                    q0, q1, scale_lo, scale_hi, t_c_coord, s_out, m_out, m_out_sf, row0,
                    valid_rows, n_tile, mma_wg, wg_tidx, wg_barrier,
                )  # fmt: skip
            else:
                self._epilogue_bf16(
                    acc0, thr_mma, s_out, m_out, row0, valid_rows, n_tile * 2, mma_wg, wg_tidx,
                    wg_barrier,
                )  # fmt: skip
                self._epilogue_bf16(
                    acc1, thr_mma, s_out, m_out, row0, valid_rows, n_tile * 2 + 1, mma_wg,
                    wg_tidx, wg_barrier,
                )  # fmt: skip
        cute.arch.sync_warp()  # reconverge after the predicated stores, before wgmma

    @cute.jit
    def _wide_setup(
        self,
        mma_tidx: Int32,
        mma_wg: Int32,
        tiled_mma: cute.TiledMma,
        s_a: cute.Tensor,
        s_b: cute.Tensor,
        s_out: cute.Tensor,
        s_amax: cute.Tensor,
        s_stash: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        s_sc: cute.Tensor,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
    ):
        """(mma, epi) of `_consumer` on 128 x 256 tiles: the B tile's two 128-column halves,
        the two tile accumulators, the block accumulator and the scale slots."""
        wg_tidx = mma_tidx - mma_wg * self.threads_per_wg
        thr_mma_wg = tiled_mma.get_slice(mma_wg * self.threads_per_wg)
        t_c_ra = tiled_mma.make_fragment_A(thr_mma_wg.partition_A(s_a))
        # the B tile's two 128-column halves (rows of the [N, K] stage), each with every stage
        t_c_rb0 = tiled_mma.make_fragment_B(
            thr_mma_wg.partition_B(cute.local_tile(s_b, (SCALE_BLOCK_N, BLOCK_K), (0, 0, None)))
        )
        t_c_rb1 = tiled_mma.make_fragment_B(
            thr_mma_wg.partition_B(cute.local_tile(s_b, (SCALE_BLOCK_N, BLOCK_K), (1, 0, None)))
        )
        thr_mma = tiled_mma.get_slice(mma_tidx)
        # coordinates of this thread's values in a 128-column half (both halves alike)
        t_c_coord = thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, SCALE_BLOCK_N)))
        acc0 = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        acc1 = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        partial = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        wg_barrier = pipeline.NamedBarrier(barrier_id=1 + mma_wg, num_threads=self.threads_per_wg)
        epi = (thr_mma, t_c_coord, s_out, m_out, m_out_sf, mma_wg, wg_tidx, wg_barrier)
        # scale slots at the thread's rows lo / hi; weight-scale block 0 (half 1: block 1)
        sc = (s_sc, t_c_coord[0][0], t_c_coord[2][0], 0)
        mma = (t_c_ra, t_c_rb0, t_c_rb1, acc0, acc1, partial, mainloop, sc)
        return mma, epi

    @cute.jit
    def _wide_pipelined(
        self,
        mma: tuple,
        epi: tuple,
        tiled_mma: cute.TiledMma,
        state: pipeline.PipelineState,
        release_state: pipeline.PipelineState,
        row0: Int32,
        n_tile: Int32,
        valid_rows: Int32,
        num_k_blocks: Int32,
        issue_next: cutlass.Constexpr[bool],
    ):
        """One tile of the epilogue-overlapped loop, its first half-block in flight: the rest
        of its K loop, then (with ``issue_next``) the next tile's first half-block, then its
        epilogue. ``release_state`` passes through (this loop releases at ``state``)."""
        acc0, acc1 = mma[3], mma[4]
        acc0.fill(0.0)
        acc1.fill(0.0)
        state, tiled_mma = self._wide_rest(mma, tiled_mma, state, num_k_blocks)
        if const_expr(issue_next):
            state, tiled_mma = self._wide_first(mma, tiled_mma, state)
        self._epilogue_wide(epi, acc0, acc1, row0, valid_rows, n_tile)
        return state, release_state, tiled_mma

    @cute.jit
    def _wide_zero_tile(self, mma: tuple, epi: tuple, row0: Int32, valid_rows: Int32,
                        n_tile: Int32):
        """A padding tile: the epilogue of zero accumulators."""
        acc0, acc1 = mma[3], mma[4]
        acc0.fill(0.0)
        acc1.fill(0.0)
        self._epilogue_wide(epi, acc0, acc1, row0, valid_rows, n_tile)

    @cute.jit
    def _wide_plain_tile(
        self,
        mma: tuple,
        epi: tuple,
        tiled_mma: cute.TiledMma,
        state: pipeline.PipelineState,
        release_state: pipeline.PipelineState,
        row0: Int32,
        n_tile: Int32,
        valid_rows: Int32,
        expert: Int32,
        num_experts: Int32,
        num_k_blocks: Int32,
    ):
        """One tile without the epilogue overlap: its K loop (none for padding rows), then its
        epilogue."""
        acc0, acc1 = mma[3], mma[4]
        acc0.fill(0.0)
        acc1.fill(0.0)
        if expert < num_experts:  # padding rows get a zero product
            state, tiled_mma = self._wide_first(mma, tiled_mma, state)
            state, tiled_mma = self._wide_rest(mma, tiled_mma, state, num_k_blocks)
        self._epilogue_wide(epi, acc0, acc1, row0, valid_rows, n_tile)
        return state, release_state, tiled_mma
