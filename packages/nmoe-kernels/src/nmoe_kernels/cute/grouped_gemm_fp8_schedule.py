"""Tile schedule of the FP8 blockscaled grouped GEMM (`grouped_gemm_fp8`), as a mixin of its
kernel class: the per-CTA segment cursor over the device offsets (`_first_cursor`,
`_advance_cursor`), the CTA tile of a linear cluster tile (`_cta_tile`) and the epilogue's
coordinates of a tile (`_tile_coords`). The schedule is described in `grouped_gemm_fp8`'s module
docstring; the mixin reads ``tile_m``, ``sched_n``, ``cluster_m``, ``cluster_rows`` and
``config`` from the kernel object.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

# tile count given to the expert cursor once it passes the last expert
_NO_MORE_TILES = 1 << 30


class Fp8ScheduleMixin:
    """The tile-schedule methods of `grouped_gemm_fp8.GroupedGemmFp8Kernel`."""

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
        """Move the segment cursor forward until it holds linear cluster tile ``tile``.

        A cluster tile is cluster_m x cluster_n CTA tiles (rows of one segment); ``num_n_tiles``
        counts cluster tiles along N. The cursor is (segment, cluster m-tiles of the segments
        before it, its rows [start, end), its cluster m-tile count). Segments 0..E-1 are the
        experts; segment E is the padding rows [offsets[E], M), whose tiles get zero GEMM output.
        Past segment E the count is _NO_MORE_TILES and the segment index is E + 1.
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
            expert_tiles = (seg_end - seg_start + (self.cluster_rows - 1)) // self.cluster_rows
            if expert > num_experts:
                expert_tiles = Int32(_NO_MORE_TILES)
        return expert, tiles_before, seg_start, seg_end, expert_tiles

    @cute.jit
    def _first_cursor(self, m_offsets: cute.Tensor):
        seg_end = m_offsets[1]
        expert_tiles = (seg_end + (self.cluster_rows - 1)) // self.cluster_rows
        return Int32(0), Int32(0), Int32(0), seg_end, expert_tiles

    @cute.jit
    def _cta_tile(
        self,
        tile: Int32,
        num_n_groups: Int32,
        tiles_before: Int32,
        seg_start: Int32,
        m_rank: Int32,
        n_rank: Int32,
        expert_tiles: Int32,
    ):
        """(first row, n-tile) of this CTA's tile in linear cluster tile ``tile`` of the segment
        whose cluster m-tiles start at ``tiles_before`` (``expert_tiles`` of them); the segment
        owns linear tiles [tiles_before, tiles_before + expert_tiles) x num_n_groups: every
        column group of a cluster m-tile before the next m-tile, or (``tile_band`` b > 0) in
        bands of b column groups, every m-tile of a band before the next band, column groups
        first inside the band (b = 1: ``n_major``).

        The row may lie past the segment (its last cluster tile is partly empty) and the n-tile
        past N (an odd n-tile count); such CTA tiles run the mainloop but store nothing.
        """
        local = tile - tiles_before * num_n_groups
        if const_expr(self.config.tile_band > 0):
            band = self.config.tile_band
            band_idx = local // (expert_tiles * band)
            in_band = local - band_idx * (expert_tiles * band)
            width = cutlass.min(band, num_n_groups - band_idx * band)  # the last may be narrower
            m_local = in_band // width
            n_group = band_idx * band + in_band - m_local * width
        else:
            m_local = local // num_n_groups
            n_group = local - m_local * num_n_groups
        row0 = seg_start + (m_local * self.cluster_m + m_rank) * self.tile_m
        return row0, n_group * self.cluster_n + n_rank

    @cute.jit
    def _tile_coords(
        self,
        tile: Int32,
        num_n_groups: Int32,
        tiles_before: Int32,
        seg_start: Int32,
        seg_end: Int32,
        m_rank: Int32,
        n_rank: Int32,
        num_n_tiles: Int32,
        expert_tiles: Int32,
    ):
        """(first row, scheduled n-tile, rows to store) of this CTA's tile in linear cluster
        tile ``tile``."""
        row0, n_tile = self._cta_tile(
            tile, num_n_groups, tiles_before, seg_start, m_rank, n_rank, expert_tiles
        )
        # <= 0 for a CTA tile past its segment's rows or past N: it stores nothing
        valid_rows = cutlass.min(seg_end - row0, self.tile_m)
        if n_tile >= num_n_tiles:
            valid_rows = Int32(0)
            n_tile = num_n_tiles - 1  # the columns the producer loaded (never stored)
        return row0, n_tile, valid_rows
