"""Mainloops of the FP8 blockscaled grouped GEMM (`grouped_gemm_fp8`), as a mixin of its
kernel class on 128 x 128 and 64 x 256 tiles: the K loop of one column tile (serial promotion, or
the overlapped promotion split into `_mainloop_first` -- block 0 issued -- and `_mainloop_rest`),
and the ``_narrow_*`` per-tile methods the kernel's tile loop (`_consumer`) calls on these tile
shapes: operand setup, a tile's first K block, one scheduled tile of the epilogue-overlapped loop
(`_narrow_pipelined`), a padding tile and a tile without the overlap; and the promotion
scales' path: the producer warp copies each K block's scales into a slot beside its smem stage
(`_load_scales`), the MMA warps read them there (`_block_scales`). (`_issue_block`, `_promote`
and `_block_scales` also serve the 128 x 256 tile's loop, `grouped_gemm_fp8_wide`.)
The math and the pipelining are described in `grouped_gemm_fp8`'s module docstring; the mixin
reads ``tile_m``, ``tile_n``, ``sub_tiles``, ``wg_n``, ``config`` and `_epilogue` from the
kernel object.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr

from .grouped_gemm_fp8_epilogue import SCALE_BLOCK_N
from .scheduler import consumer_wait


class Fp8MainloopMixin:
    """The K-loop methods of `grouped_gemm_fp8.GroupedGemmFp8Kernel`."""

    @cute.jit
    def _narrow_setup(
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
        """(mma, epi) of `_consumer`: the K loop's fragments, accumulators and scale slots, and
        the epilogue's operands, for this thread."""
        wg_tidx = mma_tidx - mma_wg * self.threads_per_wg
        wg_n_idx = mma_wg % self.wg_n  # this warpgroup's 128-column block inside the tile

        thr_mma_wg = tiled_mma.get_slice(mma_wg * self.threads_per_wg)
        t_c_ra = tiled_mma.make_fragment_A(thr_mma_wg.partition_A(s_a))
        t_c_rb = tiled_mma.make_fragment_B(thr_mma_wg.partition_B(s_b))

        thr_mma = tiled_mma.get_slice(mma_tidx)
        t_c_coord = thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n)))
        acc = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        partial = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        # second in-flight block accumulator of the overlapped mainloop (unused otherwise)
        partial_b = cute.make_rmem_tensor(t_c_coord.shape, self.acc_dtype)
        # wgmma m64 accumulator fragment ((2, 2, N/8), 1, 1): value v sits in row
        # base + 8 * ((v // 2) % 2) and column base + (v % 2) + 8 * (v // 4); the scale slots
        # are read at the thread's two rows (lo, hi) and its warpgroup's weight-scale block.
        sc = (s_sc, t_c_coord[0][0], t_c_coord[2][0], wg_n_idx)

        wg_barrier = pipeline.NamedBarrier(barrier_id=1 + mma_wg, num_threads=self.threads_per_wg)
        mma_barrier = pipeline.NamedBarrier(barrier_id=3, num_threads=self.num_mma_threads)
        epi = (
            thr_mma, t_c_coord, s_out, s_amax, s_stash, m_out, m_out_sf, mma_tidx, mma_wg,
            wg_tidx, wg_n_idx, wg_barrier, mma_barrier,
        )  # fmt: skip
        mma = (t_c_ra, t_c_rb, acc, partial, partial_b, mainloop, sc)
        return mma, epi

    @cute.jit
    def _narrow_first(self, mma: tuple, tiled_mma: cute.TiledMma, state: pipeline.PipelineState):
        """`_mainloop_first` of a tile's first column tile."""
        t_c_ra, t_c_rb, acc, partial, partial_b, mainloop, sc = mma
        return self._mainloop_first(tiled_mma, t_c_ra, t_c_rb, partial, mainloop, state)

    @cute.jit
    def _narrow_zero_tile(self, mma: tuple, epi: tuple, row0: Int32, valid_rows: Int32,
                          n_tile: Int32):
        """A padding tile: the epilogue of zero accumulators for every column tile."""
        acc = mma[2]
        for h in cutlass.range_constexpr(self.sub_tiles):
            acc.fill(0.0)
            self._epilogue(epi, acc, h, row0, valid_rows, n_tile)

    @cute.jit
    def _narrow_plain_tile(
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
        """One scheduled tile without the epilogue overlap: per column tile the whole K loop
        (overlapped or serial promotion; none for padding rows), then its epilogue."""
        t_c_ra, t_c_rb, acc, partial, partial_b, mainloop, sc = mma
        for h in cutlass.range_constexpr(self.sub_tiles):
            acc.fill(0.0)
            if const_expr(self.config.overlap):
                if expert < num_experts:  # padding rows get a zero product
                    state, tiled_mma = self._mainloop_first(
                        tiled_mma, t_c_ra, t_c_rb, partial, mainloop, state
                    )
                    state, release_state, tiled_mma = self._mainloop_rest(
                        tiled_mma, t_c_ra, t_c_rb, acc, partial, partial_b, mainloop, state,
                        release_state, sc, num_k_blocks,
                    )  # fmt: skip
            elif expert < num_experts:  # padding rows get a zero product
                state, tiled_mma = self._mainloop_serial(
                    tiled_mma, t_c_ra, t_c_rb, acc, partial, mainloop, state, sc, num_k_blocks
                )
            self._epilogue(epi, acc, h, row0, valid_rows, n_tile)
        return state, release_state, tiled_mma

    @cute.jit
    def _narrow_pipelined(
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
        """One scheduled tile of the epilogue-overlapped loop, its first K block already in
        flight: for each column tile, the rest of its K loop, then the first block of the next
        column tile (the tile's next half, or with ``issue_next`` the next tile's first), then
        its epilogue."""
        t_c_ra, t_c_rb, acc, partial, partial_b, mainloop, sc = mma
        for h in cutlass.range_constexpr(self.sub_tiles):
            acc.fill(0.0)
            state, release_state, tiled_mma = self._mainloop_rest(
                tiled_mma, t_c_ra, t_c_rb, acc, partial, partial_b, mainloop, state,
                release_state, sc, num_k_blocks,
            )  # fmt: skip
            if const_expr(h + 1 < self.sub_tiles or issue_next):
                state, tiled_mma = self._mainloop_first(
                    tiled_mma, t_c_ra, t_c_rb, partial, mainloop, state
                )
            self._epilogue(epi, acc, h, row0, valid_rows, n_tile)
        return state, release_state, tiled_mma

    @cute.jit
    def _block_scales(self, sc: tuple, stage: Int32, half: cutlass.Constexpr[int] = 0):
        """The promotion scales (x scale x w scale) of the K block in smem stage ``stage``, for
        the thread's rows lo / hi, from the stage's scale slot (`_load_scales`); ``half``: the
        weight-scale block after the thread's own (the 128 x 256 tile's second half)."""
        s_sc, row_lo, row_hi, b_slot = sc
        scale_b = s_sc[(self.tile_m + b_slot + half, stage)]
        return s_sc[(row_lo, stage)] * scale_b, s_sc[(row_hi, stage)] * scale_b

    @cute.jit
    def _load_scales(
        self,
        s_sc: cute.Tensor,
        stage: Int32,
        m_sfa: cute.Tensor,
        m_sfb: cute.Tensor,
        row0: Int32,
        kb: Int32,
        b_block: Int32,
        expert: Int32,
        num_rows: Int32,
        lane: Int32,
        barrier,
    ):
        """Producer warp, every lane: the promotion scales of one K block into its stage's slot
        -- the x scales of the tile's rows row0.. (rows past M clamped to the last: they feed
        only rows that are never stored) and the w scales of its weight-scale blocks b_block..
        -- as 4-byte cp.async copies, then an arrival on the stage's full barrier once they
        have landed (the barrier counts one per lane besides the TMA arrival)."""
        atom = cute.make_copy_atom(
            cute.nvgpu.cpasync.CopyG2SOp(), Float32, num_bits_per_copy=32
        )

        def element(t: cute.Tensor, coord) -> cute.Tensor:  # a one-element view of t at coord
            return cute.make_tensor(t.iterator + cute.crd2idx(coord, t.layout), cute.make_layout(1))

        for j in cutlass.range_constexpr(self.tile_m // 32):
            r = lane + 32 * j
            row = cutlass.min(row0 + r, num_rows - 1)
            cute.copy(atom, element(m_sfa, (row, kb)), element(s_sc, (r, stage)))
        if lane < self.tile_n // SCALE_BLOCK_N:
            cute.copy(
                atom,
                element(m_sfb, (b_block + lane, kb, expert)),
                element(s_sc, (self.tile_m + lane, stage)),
            )
        cute.arch.cp_async_mbarrier_arrive_noinc(barrier)

    @cute.jit
    def _mainloop_serial(
        self,
        tiled_mma: cute.TiledMma,
        t_c_ra: cute.Tensor,
        t_c_rb: cute.Tensor,
        acc: cute.Tensor,
        partial: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        state: pipeline.PipelineState,
        sc: tuple,
        num_k_blocks: Int32,
    ):
        """The K loop without overlap: each block's wgmma is waited for before its promotion."""
        num_mma_k = cute.size(t_c_ra, mode=[2])
        for _kb in cutlass.range(0, num_k_blocks, 1, unroll=1):
            consumer_wait(mainloop, state)
            tiled_mma = self._issue_block(
                tiled_mma, partial, t_c_ra, t_c_rb, state.index, num_mma_k
            )
            scale_lo, scale_hi = self._block_scales(sc, state.index)
            cute.nvgpu.warpgroup.wait_group(0)
            mainloop.consumer_release(state)
            state.advance()
            # promotion: acc += (x_scale * w_scale) * partial, per accumulator row
            self._promote(acc, partial, scale_lo, scale_hi)
        return state, tiled_mma

    @cute.jit
    def _issue_block(self, tiled_mma, partial, t_c_ra, t_c_rb, stage: Int32, num_mma_k: int):
        """wgmma of one 128-deep K block (smem stage ``stage``) into a fresh ``partial``."""
        cute.nvgpu.warpgroup.fence()
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
        for kk in cutlass.range_constexpr(num_mma_k):
            coord = (None, None, kk, stage)
            cute.gemm(tiled_mma, partial, t_c_ra[coord], t_c_rb[coord], partial)
            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        cute.nvgpu.warpgroup.commit_group()
        return tiled_mma  # rebound by the caller: its runtime field changed inside control flow

    @cute.jit
    def _promote(self, acc, partial, scale_lo: Float32, scale_hi: Float32):
        """acc += scale * partial, with the row scale of each accumulator value's row.

        A wgmma accumulator holds its values in groups of four: two columns of the thread's
        upper row (``scale_lo``), then the same two of its row 8 below (``scale_hi``). Two
        nested static loops unroll to the same code as one over all 64 values, without the
        DSL's warning about static loops of 64 or more iterations."""
        for g in cutlass.range_constexpr(cute.size(acc) // 4):
            for j in cutlass.range_constexpr(4):
                v = 4 * g + j
                if const_expr(j < 2):
                    acc[v] = acc[v] + scale_lo * partial[v]
                else:
                    acc[v] = acc[v] + scale_hi * partial[v]

    @cute.jit
    def _mainloop_first(
        self,
        tiled_mma: cute.TiledMma,
        t_c_ra: cute.Tensor,
        t_c_rb: cute.Tensor,
        partial_a: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        state: pipeline.PipelineState,
    ):
        """Start of the overlapped K loop: issue block 0's wgmma into ``partial_a`` (not waited
        for; its stage, scale slot included, stays held until `_mainloop_rest` promotes it)."""
        num_mma_k = cute.size(t_c_ra, mode=[2])
        consumer_wait(mainloop, state)
        tiled_mma = self._issue_block(tiled_mma, partial_a, t_c_ra, t_c_rb, state.index, num_mma_k)
        state.advance()
        return state, tiled_mma

    @cute.jit
    def _mainloop_rest(
        self,
        tiled_mma: cute.TiledMma,
        t_c_ra: cute.Tensor,
        t_c_rb: cute.Tensor,
        acc: cute.Tensor,
        partial_a: cute.Tensor,
        partial_b: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        state: pipeline.PipelineState,
        release_state: pipeline.PipelineState,
        sc: tuple,
        num_k_blocks: Int32,
    ):
        """The K loop with promotion behind the tensor cores, after `_mainloop_first` issued
        block 0 into ``partial_a``: the wgmma of block kb is issued before block kb - 1 is
        promoted, so the promotion FFMAs overlap it. Blocks alternate between two register
        accumulators (even kb: ``partial_a``, odd: ``partial_b``); a stage is released once its
        block's wgmma has completed (wait_group 1) and its scales are read. The loop body is
        straight-line (two blocks per trip) so that ptxas sees which accumulator is in flight.
        Ends with every block promoted into ``acc`` and every stage released.
        """
        k = (t_c_ra, t_c_rb, acc, mainloop, sc)
        for _kb in cutlass.range(1, num_k_blocks - 1, 2, unroll=1):
            # block kb -> partial_b; then promote block kb - 1 (partial_a)
            state, release_state, tiled_mma = self._overlapped_step(
                k, tiled_mma, state, release_state, partial_b, partial_a
            )
            # block kb + 1 -> partial_a; then promote block kb (partial_b)
            state, release_state, tiled_mma = self._overlapped_step(
                k, tiled_mma, state, release_state, partial_a, partial_b
            )
        if num_k_blocks % 2 == 0:  # one block left: it goes to partial_b
            state, release_state, tiled_mma = self._overlapped_step(
                k, tiled_mma, state, release_state, partial_b, partial_a
            )
            release_state = self._last_promotion(k, release_state, partial_b)
        else:
            release_state = self._last_promotion(k, release_state, partial_a)
        return state, release_state, tiled_mma

    @cute.jit
    def _overlapped_step(
        self,
        k: tuple,
        tiled_mma: cute.TiledMma,
        state: pipeline.PipelineState,
        release_state: pipeline.PipelineState,
        issue_into: cute.Tensor,
        promote_from: cute.Tensor,
    ):
        """Issue the next K block into ``issue_into``, read the scales of the block before it
        (its stage is still held), wait for that block (wait_group 1), release its stage and
        promote it from ``promote_from``."""
        t_c_ra, t_c_rb, acc, mainloop, sc = k
        consumer_wait(mainloop, state)
        tiled_mma = self._issue_block(
            tiled_mma, issue_into, t_c_ra, t_c_rb, state.index, cute.size(t_c_ra, mode=[2])
        )
        state.advance()
        scale_lo, scale_hi = self._block_scales(sc, release_state.index)
        cute.nvgpu.warpgroup.wait_group(1)
        mainloop.consumer_release(release_state)
        release_state.advance()
        self._promote(acc, promote_from, scale_lo, scale_hi)
        return state, release_state, tiled_mma

    @cute.jit
    def _last_promotion(self, k: tuple, release_state: pipeline.PipelineState,
                        promote_from: cute.Tensor):
        """The K loop's last block: its scales, wait for every wgmma, release, promote."""
        t_c_ra, t_c_rb, acc, mainloop, sc = k
        scale_lo, scale_hi = self._block_scales(sc, release_state.index)
        cute.nvgpu.warpgroup.wait_group(0)
        mainloop.consumer_release(release_state)
        release_state.advance()
        self._promote(acc, promote_from, scale_lo, scale_hi)
        return release_state
