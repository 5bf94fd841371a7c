"""BF16 grouped GEMMs for Hopper (sm_90a) in CuTeDSL: forward, SwiGLU-fused forward, dgrad, wgrad.

Shape letters: M rows (tokens routed here, sorted by expert), K input dim, N output dim, E experts,
F expert intermediate dim (N = 2F for the W13 projection). Tile letters: BM x BN x BK is one CTA
tile of the GEMM (BM = 128, BK = 64, BN in {128, 192, 256}).

One kernel class covers the four ops; the GEMM is C[BM x BN] = A[BM x K] @ B[K x BN]:

| op           | grouped | A (GEMM M x K)        | B (GEMM N x K)                   | C         |
| ------------ | ------- | --------------------- | -------------------------------- | --------- |
| fwd / swiglu | M rows  | x [M, K], K-major     | w [E, K, N] as (N, K, E) N-major | [M, N/F]  |
| dgrad        | M rows  | dy [M, N], K-major    | w [E, K, N] as (K, N, E) K-major | dx [M, K] |
| wgrad        | K rows  | x^T (K, M), M-major   | dy^T (N, M), N-major             | dw [E,K,N]|

The weights may also be stored [E, N, K] (``weight_nk``): B is then K-major for fwd / swiglu and
N-major for dgrad. Operand majorness only changes the TMA boxes and the WGMMA transpose bits.

Structure (persistent, warp-specialized, one CTA per SM, 384 threads):
- warp 0 (of warpgroup 0) is the TMA producer: it walks the tile schedule and streams A/B tiles
  of BK columns into a ring of shared-memory stages (mbarrier pipeline);
- warpgroups 1 and 2 consume: each issues WGMMA 64 x BN x 16 on its half of the BM rows with a
  float32 accumulator, then runs the epilogue for its 64 rows.
- Schedule: `scheduler.build_expert_table` / `locate_tile` map tile indices to experts from the
  offsets in device memory (no host sync). Grouped-M tiles start at their expert's first row, so
  a tile may load rows of the next expert; those rows are never stored. The padding rows after
  offsets[E] form one more segment whose tiles skip the mainloop and store zeros.
- Epilogue: registers -> bf16 (or silu(gate) * up in float32, rounded once; or, for wgrad with
  ``out_dtype="f32"``, the float32 accumulators unrounded) -> an XOR-swizzled (`EPI_SWIZZLE`),
  per-warpgroup shared-memory buffer (32 output columns, double-buffered) -> 16-byte global
  stores predicated per row and column, so no row outside the tile's segment is written.
- Clusters (``cluster`` = (CTAs along M, CTAs along N), each 1 or 2): a cluster takes cluster
  tiles of cluster_m x cluster_n CTA tiles of one segment (the schedule counts cluster tiles), and
  the CTAs that share an operand tile each load a slice of it and TMA-multicast it to the others
  (B along M: one expert's weight column block read once per two row blocks; A along N). A stage
  is released to every CTA that writes into it. CTA tiles past the segment's rows or past N (an
  odd tile count) still run the mainloop, which keeps the partner's pipeline going, and store
  nothing. Every cluster shape computes each output element with the same K order: same bits.
- Wgrad (grouped K): an expert's rows are the reduction dim. TMA loads whole BK-row blocks, so
  in the expert's last block the consumer warpgroups zero the rows that belong to the next
  expert (both operands, so padding NaNs cannot leak) before the WGMMA reads them. An expert
  with no rows gets a zero tile.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, const_expr
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.memory import SmemAllocator

from nmoe_kernels.cute.scheduler import (
    RASTERS,
    TABLE_LEN,
    band_rows,
    band_tile,
    build_expert_table,
    cluster_position,
    consumer_wait,
    locate_tile,
    producer_acquire,
    tma_load,
)

OPS = ("fwd", "swiglu", "dgrad", "wgrad")

TILE_M = 128
TILE_K = 64
EPI_COLS = 32  # output columns per epilogue sub-tile
# Epilogue rows are EPI_COLS elements, unpadded; the 16-byte chunks of a row are XOR-swizzled with
# its row bits (a cute Swizzle(bits, base, shift) on the element offset) so that both the
# accumulator stores and the 16-byte row reads are bank-conflict free: bf16 chunk ^= (row >> 1) & 3
# (4-byte stores of 8 rows per warp, 2 rows per 8-lane read phase), float32 8-element group
# ^= row & 3 (8-byte stores of 4 rows per half warp). A 16-byte pad (the earlier layout) left the
# bf16 reads and the float32 stores 2-way conflicted.
EPI_SWIZZLE = {2: (2, 3, 3), 4: (2, 3, 2)}  # element bytes -> (bits, base, shift)
SMEM_CAPACITY = 232448  # sm_90 max dynamic shared memory per block (227 KiB)
MAX_STAGES = 8


# 256-wide tiles run so much better than narrower ones (fewer shared-memory operand bytes per
# FLOP) that padding N up to a multiple of 256 pays while it stays small: on one H100, moonlight's
# dgrad W2 (N = 1408 = 11 x 128) took 1.026 ms with BN 256 (8% padded) against 1.082 ms with the
# exact BN 128 and 1.139 ms with BN 192, same bits (bench/results/sweep_bf16_H100.txt).
WIDE_TILE_MAX_PAD = 0.10  # BN 256 whenever it pads N by at most this fraction of N


def choose_tile_n(gemm_n: int, op: str) -> int:
    """BN 256 when it pads ``gemm_n`` by at most `WIDE_TILE_MAX_PAD` of it, else the BN that
    wastes the least (ties go to the wider tile); SwiGLU always 256."""
    if op == "swiglu":
        return 256
    if (-(-gemm_n // 256) * 256 - gemm_n) <= WIDE_TILE_MAX_PAD * gemm_n:
        return 256
    best = None
    for tile_n in (256, 192, 128):
        padded = -(-gemm_n // tile_n) * tile_n
        if best is None or padded < best[0]:
            best = (padded, tile_n)
    return best[1]


class GroupedGemmBf16Sm90:
    """Persistent TMA + WGMMA grouped GEMM (see the module docstring).

    Args:
        op: "fwd", "swiglu", "dgrad" or "wgrad".
        dim_k: the model's K (input dim of w [E, K, N]).
        dim_n: the model's N (output dim of w; 2F for swiglu).
        tile_n: BN; default `choose_tile_n`.
        raster: tile order inside an expert (`scheduler` docstring: "m", "n" or bands "b<G>");
            for wgrad (grouped K), "m" sweeps the N tiles of one block of BM output rows (dw's K
            dim) first, "n" the M tiles of one column block first, so each expert's dy column
            block is read once.
        weight_nk: fwd / swiglu / dgrad only: the weights are stored [E, N, K] (K contiguous,
            the nn.Linear layout) instead of [E, K, N]; B is then read K-major by fwd / swiglu
            and N-major by dgrad.
        out_dtype: "bf16", or "f32" for wgrad: the float32 accumulators are stored as they are
            (the gradient of float32 master weights, without a rounding to bf16 and a cast).
        cluster: (CTAs along M, CTAs along N) of a thread-block cluster, each 1 or 2 (module
            docstring): along M the CTAs multicast B, along N they multicast A.
    """

    def __init__(
        self,
        op: str,
        dim_k: int,
        dim_n: int,
        tile_n: int | None = None,
        raster: str = "m",
        weight_nk: bool = False,
        out_dtype: str = "bf16",
        cluster: tuple[int, int] = (1, 1),
    ):
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if raster not in RASTERS:
            raise ValueError(f"raster must be one of {RASTERS}, got {raster!r}")
        self.raster = raster
        if dim_k % 8 or dim_n % 8:
            raise ValueError(f"K={dim_k} and N={dim_n} must be multiples of 8 (16-byte rows)")
        self.op = op
        self.dim_k = dim_k
        self.dim_n = dim_n
        self.grouped_k = op == "wgrad"
        self.swiglu = op == "swiglu"
        # GEMM view: C[gemm_m x gemm_n] = A[gemm_m x gemm_k] B[gemm_k x gemm_n].
        if op in ("fwd", "swiglu"):
            self.gemm_n, self.gemm_k = dim_n, dim_k
        elif op == "dgrad":
            self.gemm_n, self.gemm_k = dim_k, dim_n
        else:
            self.gemm_m, self.gemm_n = dim_k, dim_n
        if weight_nk and op == "wgrad":
            raise ValueError("weight_nk applies to fwd, swiglu and dgrad (wgrad reads no weights)")
        self.weight_nk = weight_nk
        if out_dtype not in ("bf16", "f32") or (out_dtype == "f32" and op != "wgrad"):
            raise ValueError(f"out_dtype must be 'bf16', or 'f32' for wgrad; got {out_dtype!r} "
                             f"for {op}")
        self.out_dtype = out_dtype
        self.c_dtype = Float32 if out_dtype == "f32" else BFloat16
        self.c_bytes = 4 if out_dtype == "f32" else 2
        self.store_vec = 16 // self.c_bytes  # elements per 16-byte global store
        self.a_k_major = op != "wgrad"
        # w[e, k, n] sits at e * K * N + k * w_stride_k + n * w_stride_n.
        self.w_stride_k, self.w_stride_n = (1, dim_k) if weight_nk else (dim_n, 1)
        self.b_k_major = (op == "dgrad") != weight_nk
        self.tile_n = tile_n or choose_tile_n(self.gemm_n, op)
        if self.tile_n not in (128, 192, 256):
            raise ValueError(f"tile_n must be 128, 192 or 256, got {self.tile_n}")
        if self.swiglu and dim_n % 2:
            raise ValueError(f"swiglu needs an even N (2F), got {dim_n}")
        self.out_n = dim_n // 2 if self.swiglu else self.gemm_n
        # Accumulator columns per epilogue sub-tile and sub-tiles per tile.
        self.epi_acc_cols = EPI_COLS * (2 if self.swiglu else 1)
        self.num_epi_tiles = self.tile_n // self.epi_acc_cols
        self.num_n_tiles = -(-self.gemm_n // self.tile_n)
        if self.grouped_k:
            self.num_m_tiles = -(-self.gemm_m // TILE_M)
        cluster = tuple(cluster)
        if len(cluster) != 2 or any(c not in (1, 2) for c in cluster):
            raise ValueError(f"cluster must be (1 or 2, 1 or 2) CTAs along (M, N), got {cluster}")
        self.cluster_m, self.cluster_n = cluster
        self.cluster_size = self.cluster_m * self.cluster_n
        # The schedule counts cluster tiles: cluster_m row blocks x cluster_n column blocks.
        self.num_n_groups = -(-self.num_n_tiles // self.cluster_n)
        if self.grouped_k:
            self.num_m_groups = -(-self.num_m_tiles // self.cluster_m)

        self.threads_per_wg = 128
        self.num_threads = 3 * self.threads_per_wg
        self.num_consumer_threads = 2 * self.threads_per_wg
        self.epi_buffer_elems = 64 * EPI_COLS
        self.epi_wg_elems = 2 * self.epi_buffer_elems
        ab_bytes = (TILE_M + self.tile_n) * TILE_K * 2
        epi_bytes = 2 * self.epi_wg_elems * self.c_bytes
        table_bytes = 2 * TABLE_LEN * 4
        reserve = 2048  # mbarriers and alignment padding
        self.num_stages = min(
            MAX_STAGES, (SMEM_CAPACITY - epi_bytes - table_bytes - reserve) // ab_bytes
        )
        if self.num_stages < 2:
            raise ValueError("tile does not fit in shared memory")

    # ------------------------------------------------------------------ host side

    def _smem_layout(self, k_major: bool, tile_mn: int):
        kind = (
            warpgroup.SmemLayoutAtomKind.K_SW128
            if k_major
            else warpgroup.SmemLayoutAtomKind.MN_SW128
        )
        atom = warpgroup.make_smem_layout_atom(kind, BFloat16)
        return cute.tile_to_shape(
            atom,
            (tile_mn, TILE_K, self.num_stages),
            order=(0, 1, 2) if k_major else (1, 0, 2),
        )

    @cute.jit
    def __call__(
        self,
        a_ptr: cute.Pointer,
        b_ptr: cute.Pointer,
        c_ptr: cute.Pointer,
        offsets_ptr: cute.Pointer,
        num_rows: Int32,
        num_experts: Int32,
        num_ctas: Int32,
        stream,
    ):
        """Launch on ``stream``. Pointers are to bf16 (A, B), bf16 or float32 (C, ``out_dtype``)
        and int32 (offsets) device memory.

        num_rows is M (rows of x / dy), num_experts is E, num_ctas the persistent grid size
        (a multiple of the cluster size).
        """
        if const_expr(self.op in ("fwd", "swiglu")):
            mA = cute.make_tensor(
                a_ptr, cute.make_layout((num_rows, self.dim_k), stride=(self.dim_k, 1))
            )
            mB = cute.make_tensor(
                b_ptr,
                cute.make_layout(
                    (self.dim_n, self.dim_k, num_experts),
                    stride=(self.w_stride_n, self.w_stride_k, self.dim_k * self.dim_n),
                ),
            )
            mC = cute.make_tensor(
                c_ptr, cute.make_layout((num_rows, self.out_n), stride=(self.out_n, 1))
            )
        elif const_expr(self.op == "dgrad"):
            mA = cute.make_tensor(
                a_ptr, cute.make_layout((num_rows, self.dim_n), stride=(self.dim_n, 1))
            )
            mB = cute.make_tensor(
                b_ptr,
                cute.make_layout(
                    (self.dim_k, self.dim_n, num_experts),
                    stride=(self.w_stride_k, self.w_stride_n, self.dim_k * self.dim_n),
                ),
            )
            mC = cute.make_tensor(
                c_ptr, cute.make_layout((num_rows, self.dim_k), stride=(self.dim_k, 1))
            )
        else:
            mA = cute.make_tensor(
                a_ptr, cute.make_layout((self.dim_k, num_rows), stride=(1, self.dim_k))
            )
            mB = cute.make_tensor(
                b_ptr, cute.make_layout((self.dim_n, num_rows), stride=(1, self.dim_n))
            )
            mC = cute.make_tensor(
                c_ptr,
                cute.make_layout(
                    (self.dim_k, self.dim_n, num_experts),
                    stride=(self.dim_n, 1, self.dim_k * self.dim_n),
                ),
            )
        mOffsets = cute.make_tensor(offsets_ptr, cute.make_layout((num_experts + 1,)))

        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            BFloat16,
            BFloat16,
            OperandMajorMode.K if self.a_k_major else OperandMajorMode.MN,
            OperandMajorMode.K if self.b_k_major else OperandMajorMode.MN,
            Float32,
            (2, 1, 1),
            tiler_mn=(64, self.tile_n),
        )
        a_smem_layout = self._smem_layout(self.a_k_major, TILE_M)
        b_smem_layout = self._smem_layout(self.b_k_major, self.tile_n)

        # A is shared by the CTAs of a cluster along N, B by those along M.
        g2s = cpasync.CopyBulkTensorTileG2SOp()
        g2s_mcast = cpasync.CopyBulkTensorTileG2SMulticastOp()
        tma_atom_a, tma_a = cpasync.make_tiled_tma_atom(
            g2s_mcast if const_expr(self.cluster_n > 1) else g2s,
            mA,
            cute.slice_(a_smem_layout, (None, None, 0)),
            (TILE_M, TILE_K),
            num_multicast=self.cluster_n,
        )
        tma_atom_b, tma_b = cpasync.make_tiled_tma_atom(
            g2s_mcast if const_expr(self.cluster_m > 1) else g2s,
            mB,
            cute.slice_(b_smem_layout, (None, None, 0)),
            (self.tile_n, TILE_K),
            num_multicast=self.cluster_m,
        )

        @cute.struct
        class SharedStorage:
            pipeline_barriers: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            offsets: cute.struct.Align[cute.struct.MemRange[Int32, TABLE_LEN], 16]
            tile_start: cute.struct.Align[cute.struct.MemRange[Int32, TABLE_LEN], 16]
            epi: cute.struct.Align[cute.struct.MemRange[self.c_dtype, 2 * self.epi_wg_elems], 128]
            sA: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(a_smem_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(b_smem_layout)], 1024]

        self.shared_storage = SharedStorage

        self.kernel(
            tma_atom_a,
            tma_a,
            tma_atom_b,
            tma_b,
            mC,
            mOffsets,
            num_rows,
            num_experts,
            tiled_mma,
            a_smem_layout,
            b_smem_layout,
        ).launch(
            grid=[num_ctas, 1, 1],
            block=[self.num_threads, 1, 1],
            # No cluster attribute for one CTA: a cluster launch of 1 x 1 x 1 ran this kernel 2-8%
            # slower on H100 (bench/results/sweep_bf16_ab_attr_H100.txt).
            cluster=[self.cluster_size, 1, 1] if const_expr(self.cluster_size > 1) else None,
            min_blocks_per_mp=1,
            stream=stream,
        )

    # ---------------------------------------------------------------- device side

    @cute.jit
    def _tile(
        self,
        linear_idx: Int32,
        segment: Int32,
        sOffsets,
        sTileStart,
        num_experts: Int32,
        m_rank: Int32,
        n_rank: Int32,
    ):
        """Decode a linear cluster-tile index into this CTA's tile (``m_rank``, ``n_rank``: its
        coordinate in the cluster).

        Returns (is_valid, segment, row_or_m_base, n_tile, k_start, num_k_tiles, row_end):
        grouped M: row_base is the tile's first row, row_end its segment's end, k over gemm_k;
        grouped K: row_base is the GEMM-M offset (dim_k), k_start the expert's first row and
        row_end its last, and segment is the expert. The tile may lie past its segment's rows or
        past N (a cluster's spare CTA tile): its mainloop runs and its epilogue stores nothing.
        """
        if const_expr(not self.grouped_k):
            is_valid, seg, m_group, n_group = locate_tile(
                linear_idx, segment, sTileStart, num_experts + 1, self.num_n_groups, self.raster
            )
            m_tile = m_group * self.cluster_m + m_rank
            n_tile = n_group * self.cluster_n + n_rank
            row_base = sOffsets[seg] + m_tile * TILE_M
            row_end = sOffsets[seg + 1]
            num_k_tiles = Int32((self.gemm_k + TILE_K - 1) // TILE_K)
            if seg == num_experts:
                num_k_tiles = Int32(0)  # padding rows: zero output
            return is_valid, seg, row_base, n_tile, Int32(0), num_k_tiles, row_end
        else:
            tiles_per_expert = self.num_m_groups * self.num_n_groups
            expert = linear_idx // tiles_per_expert
            rest = linear_idx - expert * tiles_per_expert
            # "m": the N tiles of one block of dw rows first; "n": the M tiles of one column
            # block first (dy's column block read once); "b<G>": bands of G row blocks
            m_group, n_group = band_tile(
                rest, Int32(self.num_m_groups), self.num_n_groups, band_rows(self.raster)
            )
            m_tile = m_group * self.cluster_m + m_rank
            n_tile = n_group * self.cluster_n + n_rank
            is_valid = expert < num_experts
            k_start = Int32(0)
            k_end = Int32(0)
            if is_valid:
                k_start = sOffsets[expert]
                k_end = sOffsets[expert + 1]
            num_k_tiles = (k_end - k_start + TILE_K - 1) // TILE_K
            return is_valid, expert, m_tile * TILE_M, n_tile, k_start, num_k_tiles, k_end

    @cute.kernel
    def kernel(
        self,
        tma_atom_a: cute.CopyAtom,
        mA: cute.Tensor,
        tma_atom_b: cute.CopyAtom,
        mB: cute.Tensor,
        mC: cute.Tensor,
        mOffsets: cute.Tensor,
        num_rows: Int32,
        num_experts: Int32,
        tiled_mma: cute.TiledMma,
        a_smem_layout: cute.ComposedLayout,
        b_smem_layout: cute.ComposedLayout,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg_idx = cute.arch.make_warp_uniform(tidx // self.threads_per_wg)

        if warp_idx == 0:
            cpasync.prefetch_descriptor(tma_atom_a)
            cpasync.prefetch_descriptor(tma_atom_b)

        smem = SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
        sOffsets = storage.offsets.get_tensor(cute.make_layout(TABLE_LEN))
        sTileStart = storage.tile_start.get_tensor(cute.make_layout(TABLE_LEN))

        stage_bytes = cute.size_in_bytes(
            BFloat16, cute.slice_(a_smem_layout, (None, None, 0))
        ) + cute.size_in_bytes(BFloat16, cute.slice_(b_smem_layout, (None, None, 0)))
        # A stage of this CTA is written by the CTAs that share its A (along N) or B (along M),
        # so each consumer warp releases it to all of them: cluster_m + cluster_n - 1 arrivals
        # per warp on each such CTA's empty barrier. With a cluster, create() syncs the cluster
        # after the barrier init, before any multicast or remote arrive.
        mcast_peers = self.cluster_m + self.cluster_n - 1
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.pipeline_barriers.data_ptr(),
            num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(
                pipeline.Agent.Thread, mcast_peers * self.num_consumer_threads // 32
            ),
            tx_count=stage_bytes,
            cta_layout_vmnk=cute.make_layout((1, self.cluster_m, self.cluster_n, 1)),
            defer_sync=self.cluster_size == 1,
        )
        cute.arch.mbarrier_init_fence()
        # Ends with a CTA barrier, which also publishes the mbarrier initialisation.
        build_expert_table(
            mOffsets,
            num_experts,
            num_rows,
            sOffsets,
            sTileStart,
            TILE_M * self.cluster_m,
            self.num_n_groups,
            self.num_threads,
        )

        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(40)
            if warp_idx == 0:
                self._producer(
                    mainloop,
                    tma_atom_a,
                    mA,
                    tma_atom_b,
                    mB,
                    sA,
                    sB,
                    sOffsets,
                    sTileStart,
                    num_experts,
                )
        else:
            cute.arch.setmaxregister_increase(232)
            self._consumer(
                tiled_mma,
                mainloop,
                mC,
                sA,
                sB,
                storage,
                sOffsets,
                sTileStart,
                num_experts,
                tidx - self.threads_per_wg,
                wg_idx - 1,
            )

    @cute.jit
    def _producer(
        self,
        mainloop,
        tma_atom_a,
        mA,
        tma_atom_b,
        mB,
        sA,
        sB,
        sOffsets,
        sTileStart,
        num_experts,
    ):
        """One warp: TMA loads of the A and B tiles of every K tile of this CTA's tiles. In a
        cluster it loads its slice of each shared tile and multicasts it to the sharing CTAs."""
        cluster_id, num_clusters, m_rank, n_rank = cluster_position(
            self.cluster_m, self.cluster_size
        )
        cta_layout = cute.make_layout((self.cluster_m, self.cluster_n))
        a_mcast_mask = cute.make_layout_image_mask(cta_layout, (m_rank, n_rank), mode=1)
        b_mcast_mask = cute.make_layout_image_mask(cta_layout, (m_rank, n_rank), mode=0)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        linear_idx = cluster_id
        is_valid, seg, row_base, n_tile, k_start, num_k_tiles, row_end = self._tile(
            linear_idx, Int32(0), sOffsets, sTileStart, num_experts, m_rank, n_rank
        )
        while is_valid:
            if num_k_tiles > 0:
                # A spare CTA tile of a cluster past N (odd tile count) loads the last column
                # block, one past dw's rows the last row block, one past an expert's rows
                # whatever is there (TMA fills rows outside the tensor with zeros). It keeps the
                # cluster's pipeline going; its epilogue stores nothing. One CTA has no spares.
                n_load = n_tile
                if const_expr(self.cluster_n > 1):
                    n_load = cutlass.min(n_tile, Int32(self.num_n_tiles - 1))
                if const_expr(not self.grouped_k):
                    gA = cute.local_tile(
                        cute.domain_offset((row_base, 0), mA), (TILE_M, TILE_K), (0, None)
                    )
                    gB = cute.local_tile(
                        mB[(None, None, seg)], (self.tile_n, TILE_K), (n_load, None)
                    )
                else:
                    m_load = row_base // TILE_M
                    if const_expr(self.cluster_m > 1):
                        m_load = cutlass.min(m_load, Int32(self.num_m_tiles - 1))
                    gA = cute.local_tile(
                        cute.domain_offset((0, k_start), mA), (TILE_M, TILE_K), (m_load, None)
                    )
                    gB = cute.local_tile(
                        cute.domain_offset((0, k_start), mB),
                        (self.tile_n, TILE_K),
                        (n_load, None),
                    )
                tAsA, tAgA = cpasync.tma_partition(
                    tma_atom_a,
                    n_rank,
                    cute.make_layout(self.cluster_n),
                    cute.group_modes(sA, 0, 2),
                    cute.group_modes(gA, 0, 2),
                )
                tBsB, tBgB = cpasync.tma_partition(
                    tma_atom_b,
                    m_rank,
                    cute.make_layout(self.cluster_m),
                    cute.group_modes(sB, 0, 2),
                    cute.group_modes(gB, 0, 2),
                )
                for k_tile in range(num_k_tiles):
                    producer_acquire(mainloop, state)
                    barrier = mainloop.producer_get_barrier(state)
                    tma_load(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, state.index)],
                             barrier, a_mcast_mask, self.cluster_n > 1)
                    tma_load(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)],
                             barrier, b_mcast_mask, self.cluster_m > 1)
                    mainloop.producer_commit(state)
                    state.advance()
            linear_idx = linear_idx + num_clusters
            is_valid, seg, row_base, n_tile, k_start, num_k_tiles, row_end = self._tile(
                linear_idx, seg, sOffsets, sTileStart, num_experts, m_rank, n_rank
            )
        mainloop.producer_tail(state)

    @cute.jit
    def _consumer(
        self,
        tiled_mma,
        mainloop,
        mC,
        sA,
        sB,
        storage,
        sOffsets,
        sTileStart,
        num_experts,
        ctidx,
        cwg,
    ):
        """Consumer warpgroups: ctidx in [0, 256) is the thread's index, cwg in {0, 1} its group."""
        wg_mma = tiled_mma.get_slice(cwg * self.threads_per_wg)
        thr_mma = tiled_mma.get_slice(ctidx)
        tCrA = tiled_mma.make_fragment_A(wg_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(wg_mma.partition_B(sB))
        acc_shape = thr_mma.partition_shape_C((TILE_M, self.tile_n))
        acc = cute.make_rmem_tensor(acc_shape, Float32)
        num_k_blocks = cute.size(tCrA, mode=[2])

        consumers_barrier = pipeline.NamedBarrier(
            barrier_id=1, num_threads=self.num_consumer_threads
        )
        wg_barrier = pipeline.NamedBarrier(barrier_id=2 + cwg, num_threads=self.threads_per_wg)

        # Epilogue buffers: per warpgroup two [64, EPI_COLS] buffers of C's type, swizzled
        # (EPI_SWIZZLE; every buffer starts at a multiple of the swizzle's 256-element period).
        epi_base = storage.epi.data_ptr()
        # Virtual [TILE_M, tile_n] view of one buffer: row (r, wg) -> r * stride + wg * wg_elems,
        # accumulator column -> its output column inside the sub-tile (sub-tile index stride 0).
        if const_expr(self.swiglu):
            col_layout = cute.make_layout((2, EPI_COLS, self.num_epi_tiles), stride=(0, 1, 0))
        else:
            col_layout = cute.make_layout((EPI_COLS, self.num_epi_tiles), stride=(1, 0))
        row_layout = cute.make_layout((64, 2), stride=(EPI_COLS, self.epi_wg_elems))
        swizzle = cute.make_swizzle(*EPI_SWIZZLE[self.c_bytes])
        acc_view_layout = cute.make_composed_layout(
            swizzle,
            0,
            cute.make_layout(
                (row_layout.shape, col_layout.shape), stride=(row_layout.stride, col_layout.stride)
            ),
        )
        tCsEpi = [
            thr_mma.partition_C(
                cute.make_tensor(epi_base + buf * self.epi_buffer_elems, acc_view_layout)
            )
            for buf in range(2)
        ]
        wg_epi = [
            cute.make_tensor(
                epi_base + cwg * self.epi_wg_elems + buf * self.epi_buffer_elems,
                cute.make_composed_layout(
                    swizzle, 0, cute.make_layout((64, EPI_COLS), stride=(EPI_COLS, 1))
                ),
            )
            for buf in range(2)
        ]
        # 16-byte copies: 128 threads as rows x column chunks of store_vec elements (bf16: 32
        # rows x 4 chunks of 8; float32: 16 rows x 8 chunks of 4).
        chunks = EPI_COLS // self.store_vec
        store_copy = cute.make_tiled_copy_tv(
            cute.make_copy_atom(
                cute.nvgpu.CopyUniversalOp(), self.c_dtype, num_bits_per_copy=128
            ),
            cute.make_ordered_layout((self.threads_per_wg // chunks, chunks), order=(1, 0)),
            cute.make_layout((1, self.store_vec)),
        )
        thr_store = store_copy.get_slice(ctidx - cwg * self.threads_per_wg)
        tSsEpi = [thr_store.partition_S(wg_epi[buf]) for buf in range(2)]
        tScEpi = thr_store.partition_S(cute.make_identity_tensor((64, EPI_COLS)))

        read_state = pipeline.make_pipeline_state(
            pipeline.PipelineUserType.Consumer, self.num_stages
        )
        release_state = pipeline.make_pipeline_state(
            pipeline.PipelineUserType.Consumer, self.num_stages
        )

        cluster_id, num_clusters, m_rank, n_rank = cluster_position(
            self.cluster_m, self.cluster_size
        )
        linear_idx = cluster_id
        is_valid, seg, row_base, n_tile, k_start, num_k_tiles, row_end = self._tile(
            linear_idx, Int32(0), sOffsets, sTileStart, num_experts, m_rank, n_rank
        )
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        while is_valid:
            acc.fill(0.0)
            for k_tile in range(num_k_tiles):
                consumer_wait(mainloop, read_state)
                if const_expr(self.grouped_k):
                    valid_k = row_end - k_start - k_tile * TILE_K
                    if valid_k < TILE_K:
                        self._zero_tail_rows(sA, sB, read_state.index, valid_k, ctidx)
                        cute.arch.fence_proxy("async.shared", space="cta")
                        consumers_barrier.arrive_and_wait()
                warpgroup.fence()
                for k_block in cutlass.range_constexpr(num_k_blocks):
                    coord = (None, None, k_block, read_state.index)
                    cute.gemm(tiled_mma, acc, tCrA[coord], tCrB[coord], acc)
                warpgroup.commit_group()
                if k_tile > 0:
                    # The previous stage's WGMMAs are done once at most one group is pending.
                    warpgroup.wait_group(1)
                    mainloop.consumer_release(release_state)
                    release_state.advance()
                read_state.advance()
            warpgroup.wait_group(0)
            if num_k_tiles > 0:
                mainloop.consumer_release(release_state)
                release_state.advance()

            self._epilogue(
                acc,
                mC,
                tCsEpi,
                tSsEpi,
                tScEpi,
                store_copy,
                wg_barrier,
                seg,
                row_base,
                row_end,
                n_tile,
                cwg,
            )

            linear_idx = linear_idx + num_clusters
            is_valid, seg, row_base, n_tile, k_start, num_k_tiles, row_end = self._tile(
                linear_idx, seg, sOffsets, sTileStart, num_experts, m_rank, n_rank
            )

    @cute.jit
    def _zero_tail_rows(self, sA, sB, stage, valid_k, ctidx):
        """Zero k >= valid_k of one stage of A and B (grouped K: rows of the next expert).

        Both operands are MN-major in shared memory, so 8 consecutive M (or N) elements of one k
        are 16 contiguous bytes (the 128-byte swizzle moves whole 16-byte chunks): one vector
        store each.
        """
        zeros = cute.make_rmem_tensor((8, 1), BFloat16)
        zeros.fill(0.0)
        for operand, tile_mn in ((sA, TILE_M), (sB, self.tile_n)):
            chunks = cute.zipped_divide(operand[(None, None, stage)], (8, 1))
            per_k = tile_mn // 8
            for idx in range(valid_k * per_k + ctidx, TILE_K * per_k, self.num_consumer_threads):
                k = idx // per_k
                cute.autovec_copy(zeros, chunks[(None, (idx - k * per_k, k))])

    @cute.jit
    def _epilogue(
        self,
        acc,
        mC,
        tCsEpi,
        tSsEpi,
        tScEpi,
        store_copy,
        wg_barrier,
        seg,
        row_base,
        row_end,
        n_tile,
        cwg,
    ):
        """Write this warpgroup's 64 rows of the tile, sub-tile by sub-tile, through smem."""
        row0 = row_base + cwg * 64
        if const_expr(self.grouped_k):
            rows_valid = self.gemm_m - row0
            tile_offset = seg * (self.gemm_m * self.gemm_n) + row0 * self.gemm_n
        else:
            rows_valid = row_end - row0
            tile_offset = row0 * self.out_n
        out_col_base = n_tile * (self.tile_n // (2 if self.swiglu else 1))
        # Accumulator element i (layout ((2, 2, BN / 8)), see `GroupedGemmBf16Sm90`) sits in
        # column (i % 2) + 8 * (i // 4) of the thread's columns, row + 8 * ((i // 2) % 2): the
        # elements of sub-tile s are the contiguous range i in [s, s + 1) * per_sub.
        per_sub = 4 * (self.epi_acc_cols // 8)
        assert cute.size(acc) == 4 * (self.tile_n // 8)
        for sub in cutlass.range_constexpr(self.num_epi_tiles):
            buf = sub % 2
            for i in cutlass.range_constexpr(sub * per_sub, (sub + 1) * per_sub):
                if const_expr(self.swiglu):
                    if const_expr(i % 2 == 0):
                        gate = acc[i]
                        up = acc[i + 1]
                        # silu(g) = g * sigmoid(g); exp via ex2.approx and the reciprocal via
                        # rcp.approx (each within 2 ulp of float32), rounded to bf16 once.
                        sigmoid = cute.arch.rcp_approx(
                            Float32(1.0) + cute.math.exp(-gate, fastmath=True)
                        )
                        tCsEpi[buf][i] = (gate * sigmoid * up).to(BFloat16)
                elif const_expr(self.out_dtype == "f32"):
                    tCsEpi[buf][i] = acc[i]
                else:
                    tCsEpi[buf][i] = acc[i].to(BFloat16)
            wg_barrier.arrive_and_wait()
            col_base = out_col_base + sub * EPI_COLS
            # Every row starts 16-byte aligned (out_n % 8 == 0) and col_base % 8 == 0.
            offset = cute.assume(tile_offset + col_base, divby=8)
            gOut = cute.make_tensor(
                mC.iterator + offset,
                cute.make_layout((64, EPI_COLS), stride=(self.out_n, 1)),
            )
            self._store_subtile(tSsEpi[buf], tScEpi, store_copy, gOut, rows_valid, col_base, cwg)
        if const_expr(self.num_epi_tiles % 2 == 1):
            wg_barrier.arrive_and_wait()

    @cute.jit
    def _store_subtile(self, tSsEpi, tScEpi, store_copy, gOut, rows_valid, col_base, cwg):
        tidx, _, _ = cute.arch.thread_idx()
        thr_store = store_copy.get_slice(tidx - (cwg + 1) * self.threads_per_wg)
        tSgOut = thr_store.partition_D(gOut)
        for r in cutlass.range_constexpr(cute.size(tSgOut, mode=[1])):
            row, col = tScEpi[(0, r, 0)]
            if row < rows_valid and col_base + col < self.out_n:
                frag = cute.make_rmem_tensor_like(tSsEpi[(None, r, 0)])
                cute.autovec_copy(tSsEpi[(None, r, 0)], frag)
                cute.autovec_copy(frag, tSgOut[(None, r, 0)])


def compile_kernel(
    op: str,
    dim_k: int,
    dim_n: int,
    arch: str = "sm_90a",
    keep_ptx: bool = False,
    raster: str = "m",
    weight_nk: bool = False,
    out_dtype: str = "bf16",
    cluster: tuple[int, int] = (1, 1),
    tile_n: int | None = None,
):
    """Compile the kernel for (op, K, N) for ``arch`` without touching a GPU.

    M (rows) and E (experts) stay runtime arguments, so one compile serves every token count
    and routing (``raster``, ``weight_nk``, ``out_dtype``, ``cluster`` and ``tile_n`` (None:
    `choose_tile_n`) as in `GroupedGemmBf16Sm90`; launch a clustered kernel on a multiple of
    its cluster size). Returns the compiled callable
    ``f(a_ptr, b_ptr, c_ptr, offsets_ptr, num_rows, num_experts, num_ctas, stream)``; with
    ``keep_ptx`` its ``artifacts.PTX`` holds the PTX text. CuTeDSL also keeps compiled binaries
    in its file cache (``CUTE_DSL_CACHE_DIR``), keyed by the generated IR, so a later process
    skips the backend compile.
    """
    from cutlass.cute.runtime import make_fake_stream, make_ptr

    from nmoe_kernels._launch import use_tvm_ffi

    kernel = GroupedGemmBf16Sm90(op, dim_k, dim_n, tile_n=tile_n, raster=raster,
                                 weight_nk=weight_nk, out_dtype=out_dtype, cluster=cluster)
    options = [cute.GPUArch(arch)]
    if keep_ptx:
        options.append(cute.KeepPTX(True))
    if use_tvm_ffi():  # called with plain integers (nmoe_kernels._launch)
        options.append(cute.EnableTVMFFI(True))

    def ptr(dtype):
        return make_ptr(dtype, 0, cute.AddressSpace.gmem, assumed_align=16)

    return cute.compile[tuple(options)](
        kernel,
        ptr(BFloat16),
        ptr(BFloat16),
        ptr(kernel.c_dtype),
        make_ptr(Int32, 0, cute.AddressSpace.gmem, assumed_align=4),
        Int32(1),
        Int32(1),
        Int32(1),
        make_fake_stream(),
    )
