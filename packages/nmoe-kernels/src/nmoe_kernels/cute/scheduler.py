"""Device-side tile schedule for grouped GEMMs over a contiguous, expert-sorted row layout.

Shape letters: E experts, M rows (expert-sorted), BM / BN tile sizes along the GEMM's M / N.

The host never reads the expert offsets: a persistent CTA copies ``offsets_E1`` into shared
memory once (`build_expert_table`), turns the segment lengths into a cumulative count of output
tiles (M tiles x N tiles per segment) with one warp-level prefix sum, and then maps every linear
tile index to (segment, M tile, N tile) with a forward walk over that table (`locate_tile`).
Segment ``E`` is the padding after the last expert (rows ``offsets[E]:M``); kernels give it zero
output.

Tile order inside a segment ("raster"): "m" sweeps the N tiles of one block of BM rows before the
next block (consecutive CTAs share rows of A); "n" sweeps the M tiles of one N tile first
(consecutive CTAs share a column block of the expert's weights); "b<G>" (e.g. "b4") cuts the
segment into bands of G blocks of BM rows and sweeps each band as "n" does, band after band (the
usual L2 swizzle: CTAs at work at once touch G row blocks and a few column blocks). "b1" is "m"
and a band as tall as the segment is "n". A CTA's linear indices only grow
(``blockIdx.x + i * gridDim.x``), so the walk state is carried from one tile to the next and each
CTA walks the table at most once.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32

# Largest expert count the shared-memory tables hold (two int32 tables of MAX_EXPERTS + 2).
MAX_EXPERTS = 1024
TABLE_LEN = MAX_EXPERTS + 2
RASTERS = ("m", "n", "b2", "b4", "b8", "b16")


def band_rows(raster: str) -> int:
    """Blocks of BM rows per band of ``raster``: 1 for "m", 0 (the whole segment) for "n", G for
    "b<G>"."""
    if raster not in RASTERS:
        raise ValueError(f"raster must be one of {RASTERS}, got {raster!r}")
    if raster == "m":
        return 1
    if raster == "n":
        return 0
    return int(raster[1:])


@cute.jit
def spin_wait(barrier: cute.Pointer, phase: Int32):
    """Wait for phase ``phase`` of the mbarrier at ``barrier`` by retrying ``mbarrier.try_wait``
    without a suspend-time hint. The pipelines' own waits pass one (10 ms), which ptxas turns into
    a NANOSLEEP.SYNCS between tries: bench/wgmma_probe.cu's 128 x 256 FP8 mainloop ran 11-13%
    slower with it at DeepGEMM's shape on one H100 (bench/results/wgmma_probe_H100.txt); in the
    FP8 kernel the two measured within noise (bench/results/fp8_H100_smem_scales.txt). Both
    grouped GEMMs (FP8 and BF16) wait through these."""
    done = cute.arch.mbarrier_try_wait(barrier, phase)
    while not done:
        done = cute.arch.mbarrier_try_wait(barrier, phase)


@cute.jit
def consumer_wait(mainloop, state):
    """`PipelineTmaAsync.consumer_wait` through `spin_wait`: the stage at ``state`` is full."""
    spin_wait(mainloop.sync_object_full.get_barrier(state.index), state.phase)


@cute.jit
def producer_acquire(mainloop, state):
    """`PipelineTmaAsync.producer_acquire` through `spin_wait`: wait until the stage at
    ``state`` is empty, then arm its full barrier with the stage's transaction bytes."""
    spin_wait(mainloop.sync_object_empty.get_barrier(state.index), state.phase)
    mainloop.sync_object_full.arrive(state.index, mainloop.producer_mask)


@cute.jit
def cluster_position(cluster_m: cutlass.Constexpr[int], cluster_size: cutlass.Constexpr[int]):
    """(cluster index, cluster count, CTA coordinate along M, along N in the cluster) of this CTA
    in a 1-D grid of clusters of ``cluster_size`` CTAs, ``cluster_m`` of them along M (rank =
    m + cluster_m * n). One CTA: its block index, the grid size, (0, 0)."""
    bidx, _, _ = cute.arch.block_idx()
    grid_x, _, _ = cute.arch.grid_dim()
    if cutlass.const_expr(cluster_size == 1):
        return Int32(bidx), Int32(grid_x), Int32(0), Int32(0)
    rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
    return (
        Int32(bidx) // cluster_size,
        Int32(grid_x) // cluster_size,
        rank % cluster_m,
        rank // cluster_m,
    )


@cute.jit
def tma_load(atom, src, dst, barrier, mcast_mask, multicast: cutlass.Constexpr[bool]):
    """One TMA load of ``src`` into ``dst`` completing on ``barrier``; with ``multicast`` also
    into the same shared-memory offset of the cluster's CTAs in ``mcast_mask``."""
    if cutlass.const_expr(multicast):
        cute.copy(atom, src, dst, tma_bar_ptr=barrier, mcast_mask=mcast_mask)
    else:
        cute.copy(atom, src, dst, tma_bar_ptr=barrier)


@cute.jit
def band_tile(local: Int32, num_m_tiles: Int32, num_n_tiles, band: cutlass.Constexpr[int]):
    """(m_tile, n_tile) of tile ``local`` of a segment of ``num_m_tiles`` x ``num_n_tiles``
    tiles in the order of `band_rows` ``band`` (module docstring)."""
    m_tile = Int32(0)
    n_tile = Int32(0)
    if cutlass.const_expr(band == 1):
        m_tile = local // num_n_tiles
        n_tile = local - m_tile * num_n_tiles
    elif cutlass.const_expr(band == 0):
        n_tile = local // num_m_tiles
        m_tile = local - n_tile * num_m_tiles
    else:
        first_row = local // (band * num_n_tiles) * band
        rows = cutlass.min(num_m_tiles - first_row, Int32(band))
        rest = local - first_row * num_n_tiles
        n_tile = rest // rows
        m_tile = first_row + rest - n_tile * rows
    return m_tile, n_tile


@cute.jit
def build_expert_table(
    mOffsets: cute.Tensor,
    num_experts: Int32,
    num_rows: Int32,
    sOffsets: cute.Tensor,
    sTileStart: cute.Tensor,
    tile_m: cutlass.Constexpr[int],
    num_n_tiles: cutlass.Constexpr[int],
    num_threads: cutlass.Constexpr[int],
):
    """Fill the per-CTA schedule tables; every thread of the CTA must call this.

    After the call (and the CTA barrier it ends with):
      sOffsets[i]   = offsets[i] clamped to [0, M] for i <= E, and sOffsets[E + 1] = M (the end
                      of the padding);
      sTileStart[i] = number of output tiles of segments 0..i-1 (i <= E + 1): a segment of L rows
                      has ceil(L / tile_m) * num_n_tiles tiles.
    """
    tidx, _, _ = cute.arch.thread_idx()
    num_segments = num_experts + 1
    for i in range(tidx, num_experts + 2, num_threads):
        bound = num_rows
        if i <= num_experts:
            # Clamped into [0, M]: malformed offsets cannot make a kernel touch memory outside
            # its tensors (their results are unspecified).
            bound = cutlass.max(cutlass.min(mOffsets[i], num_rows), Int32(0))
        sOffsets[i] = bound
    cute.arch.sync_threads()
    for i in range(tidx, num_segments, num_threads):
        length = cutlass.max(sOffsets[i + 1] - sOffsets[i], Int32(0))
        sTileStart[i + 1] = (length + (tile_m - 1)) // tile_m * num_n_tiles
    if tidx == 0:
        sTileStart[0] = Int32(0)
    cute.arch.sync_threads()
    warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
    if warp_idx == 0:
        lane = cute.arch.lane_idx()
        carry = Int32(0)
        for base in range(0, num_segments, 32):
            i = base + lane
            count = Int32(0)
            if i < num_segments:
                count = sTileStart[i + 1]
            for shift in cutlass.range_constexpr(5):
                delta = 1 << shift
                neighbour = cute.arch.shuffle_sync_up(count, delta)
                if lane >= delta:
                    count = count + neighbour
            count = count + carry
            if i < num_segments:
                sTileStart[i + 1] = count
            carry = cute.arch.shuffle_sync(count, 31)
    cute.arch.sync_threads()


@cute.jit
def locate_tile(
    linear_idx: Int32,
    segment: Int32,
    sTileStart: cute.Tensor,
    num_segments: Int32,
    num_n_tiles: cutlass.Constexpr[int],
    raster: cutlass.Constexpr[str],
):
    """Map a linear tile index to (is_valid, segment, m_tile_in_segment, n_tile).

    ``segment`` is the walk state from the previous call (0 for the first); it is returned
    advanced. Indices past the last tile give is_valid False.
    """
    is_valid = linear_idx < sTileStart[num_segments]
    seg = segment
    if is_valid:
        while sTileStart[seg + 1] <= linear_idx:
            seg = seg + 1
    first = sTileStart[seg]
    num_m_tiles = cutlass.max((sTileStart[seg + 1] - first) // num_n_tiles, Int32(1))
    m_tile, n_tile = band_tile(linear_idx - first, num_m_tiles, num_n_tiles, band_rows(raster))
    return is_valid, seg, m_tile, n_tile
