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
accumulator as ``acc += (xs[m, kb] * ws[e, n // 128, kb]) * partial``, in kb order (every kernel
variant below gives the same bits).

Epilogues:

- "bf16": y [M, N] bf16 = round(acc).
- "swiglu_quant": W13 columns are interleaved (column 2j = gate_j, column 2j+1 = up_j), so each
  thread holds (gate, up) pairs. In fp32: g, u = bf16(acc_gate), bf16(acc_up);
  a = bf16(silu(g) * u) -- the same roundings as the unfused bf16 path; silu(g) = g * s with the
  sigmoid s = rcp.approx(1 + exp(-g)) (``KernelConfig.fast_silu``, the default; an IEEE division
  otherwise; both within the tests' bounds, which allow a code one E4M3 step off for 1% of
  values) -- then per row and 1x128
  block of F: scale = max(amax / 448, 2^-126) (rounded up to a power of two with ue8m0),
  q = E4M3_rne(clamp(a * (1 / scale), -448, 448)). Writes q [M, F] E4M3 and the scales
  [M, Fb] fp32 MN-major over storage [Fb, M_al] (the layout the next GEMM's A scales use).

Kernel structure (warp specialized, persistent): warpgroup 0 is the producer -- one warp whose
elected lane issues TMA loads of the A and B tiles of each 128-deep K block into a multi-stage
smem ring, while all 32 lanes copy the block's promotion scales (the x scales of the tile's rows,
the w scales of its weight-scale blocks) into a small slot beside the stage with 4-byte cp.async
and arrive on the stage's full barrier once they land; warpgroups 1-2 run WGMMA, each on a
64 x 128 sub-tile (so each warpgroup's columns sit in one 128-wide weight-scale block), and read
a block's scales from its slot while the stage is held. (The scales are not loaded by TMA: a
tile's first row is arbitrary, and a TMA box of the MN-major scale column starting at an inner
coordinate that is not 16-byte aligned faults with "illegal instruction" on H200. Until
2026-11-27 the MMA threads loaded them from global memory a block ahead and the tile loop carried
the in-flight block's scales between tiles; `bench/wgmma_probe.cu` ran its version of those loads
at ~60% of the slot path's speed, but in this kernel both measured the same on H100,
bench/results/fp8_H100_smem_scales.txt. The slots stay for the simpler tile loop.)

Overlapped promotion (``KernelConfig.overlap``, the default): a warpgroup issues the wgmma of
block kb into one of two register accumulators before it waits for block kb - 1 (wait_group 1)
and promotes it, so the promotion FFMAs and the stage release run while the tensor cores work.
The K loop handles two blocks per trip in straight-line code, so ptxas can tell which
accumulator is in flight and does not serialize the wgmmas. Without it, each block's wgmma is
waited for (wait_group 0) before its promotion, and the tensor cores idle meanwhile unless the
other warpgroup fills in. On one H200 the overlap is worth 1.2-1.4x.

Clusters (``KernelConfig.cluster_m`` x ``cluster_n``, default 1 x 1): the CTAs of a cluster
along N share the A tile and those along M the B tile; each loads its slice of a shared tile and
TMA-multicasts it to its partners, and a consumer warp releases a stage to every CTA that writes
into it. A cluster takes cluster tiles (cluster_m x cluster_n CTA tiles of one segment); a CTA
tile past its segment's rows or past N (odd tile counts) runs the mainloop and stores nothing.
On one H200, clusters of 2 stayed within run-to-run noise of 1 x 1 with the overlapped
mainloop before the epilogue overlap (bench/results/fp8_H200_clusters.txt); with the current
mainloop on one H100 (2, 1) gains 4-8% at long reductions or long segments and nothing at
moonlight's W13 on 128 x 128 tiles (bench/results/fp8_H100_launch_fix_clusters.txt), but one CTA
on 128 x 256 tiles beats every cluster (bench/results/fp8_H100_ab_wide.txt), so the public ops
(`nmoe_kernels.grouped_gemm_fp8.choose_config`) use clusters only on 128 x 128 tiles, where N %
256 == 128; `kernel_config`'s default stays one CTA, launched without a cluster attribute (which
cost up to 9%).

Epilogue under the next column tile (``KernelConfig.epi_overlap``, the default): after a column
tile's K loop, the warpgroups issue the first K block of the next column tile before they run
the epilogue, so the tensor cores have that block's wgmma while the CUDA cores run the epilogue.
The loop over a CTA's tiles is peeled (its last tile after the loop) so that every such issue is
unconditional: ptxas serializes every wgmma of the kernel (warning C7514) when an in-flight
accumulator flows through a branch merge, which the CPU compile test checks for. Same K blocks
and promotion order, so the same bits.

Tiles: 128 x 128, warpgroups stacked along M (each 64 x 128); or 128 x 256 (``tile=(128, 256)``,
`grouped_gemm_fp8_wide`: each warpgroup 64 x 256 as two column halves sharing one block
accumulator, serial promotion, 25% fewer operand bytes per FLOP; the public bf16 op's tile for
long problems). "swiglu_quant" runs *paired*
tiles: a scheduled tile is 128 rows x 256 W13 columns (the 128 SwiGLU features of one
quantization block), computed as two 128 x 128 column tiles back to back (the producer loads A
twice, from L2). After the first half, each thread keeps its 32 bf16 activations and its two
rows' maxima in its own shared-memory slots (18 words x 256 threads; registers are full with the
K loop's three accumulators); after the second half it takes the row amax over both halves (each
warpgroup owns whole rows: no exchange between warpgroups), quantizes both halves and stores 128
FP8 bytes per row. The earlier layout, ``tile=(64, 256)`` (warpgroups side by side along N, row
maxima exchanged through smem), gives the same bits, but its mainloop alone (no epilogue) took
1.12x / 1.30x / 1.26x as long at super / moonlight / dsv3-local on one H100
(bench/results/fp8_H100_diagnostics.txt, rows ``[c1x1ows]`` vs ``[c1x1os]``); it loads 25% more
A + B bytes per FLOP (not profiled whether that is the cause). The tile scheduler walks
(segment, cluster m-tile, cluster n-tile) in order: a cluster takes linear cluster tiles c, c +
clusters, ... and advances a cursor over the device offsets, so segments need no padding and no
host sync. A tile's A rows may run past its segment (they belong to the next expert or are TMA
zero fill); the epilogue stores only rows of the tile's own segment, via smem and predicated
16-byte stores. Padding rows (segment E) get zero output without a mainloop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64, const_expr
from cutlass.cute.runtime import make_ptr
from cutlass.tensor_utils import LayoutEnum

from .._launch import cu_stream, ffi_function, use_tvm_ffi
from .grouped_gemm_fp8_epilogue import (
    BLOCK_K,
    SCALE_BLOCK_N,
    WG_TILE_M,
    Fp8EpilogueMixin,
)
from .grouped_gemm_fp8_mainloop import Fp8MainloopMixin
from .grouped_gemm_fp8_schedule import Fp8ScheduleMixin
from .grouped_gemm_fp8_wide import Fp8WideMixin
from .occupancy import max_active_clusters
from .scheduler import cluster_position, producer_acquire, tma_load

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
# (CTAs along M, CTAs along N) of a cluster, per epilogue, and whether the mainloop promotes K
# block kb - 1 behind the wgmma of block kb. Chosen on one H200 (bench/results/
# fp8_H200_clusters.txt, the module docstring): the overlapped promotion pays everywhere;
# the public ops choose a cluster and tile per call (nmoe_kernels.grouped_gemm_fp8.choose_config).
# epi_overlap and fast_silu: bench/results/fp8_H100_epilogue_overlap.txt,
# fp8_H200_2026-11-26.txt (rows: e gains at super and moonlight on both cards and at K = 7168 on
# the H200; on the H100 it was 5-6% slower at K = 7168, inside that shape's ~10% noise).
DEFAULT_CLUSTER = {"bf16": (1, 1), "swiglu_quant": (1, 1)}
DEFAULT_OVERLAP = {"bf16": True, "swiglu_quant": True}
DEFAULT_EPI_OVERLAP = {"bf16": True, "swiglu_quant": True}
DEFAULT_FAST_SILU = True
# paired swiglu_quant: 32 bf16 activations and 2 row maxima per thread kept between the halves
STASH_WORDS = 18


@dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one compiled kernel (the compile cache key)."""

    epilogue: str
    ue8m0: bool
    tile_m: int
    tile_n: int
    num_stages: int
    cluster_m: int = 1  # CTAs of a cluster along M: they share (multicast) the B tile
    cluster_n: int = 1  # CTAs of a cluster along N: they share (multicast) the A tile
    overlap: bool = False  # promote K block kb - 1 while the wgmma of block kb runs
    # issue the next tile's first K block before this tile's epilogue (needs ``overlap``)
    epi_overlap: bool = False
    fast_silu: bool = False  # swiglu_quant: sigmoid through rcp.approx instead of IEEE division
    skip_epilogue: bool = False  # diagnostic only: mainloop without epilogue (writes nothing)
    # tile order inside an expert: its row tiles for one column group first (else the reverse)
    n_major: bool = False
    cluster_launch: bool = False  # diagnostic: a cluster launch attribute even for one CTA
    # tile order inside an expert: bands of this many column groups, every row tile of a band
    # before the next band (0: none; n_major is band 1)
    band: int = 0
    # 128 x 256: read both column halves' scales of a K block before its first wait (else the
    # second half's after its wgmmas are issued, where ptxas put the scale product between them)
    early_scales: bool = True

    @property
    def tile_band(self) -> int:
        """Column groups per band of the tile order (0: every column group of a row tile
        before the next row tile)."""
        return 1 if self.n_major else self.band

    @property
    def cluster_size(self) -> int:
        return self.cluster_m * self.cluster_n

    @property
    def wide(self) -> bool:
        """128 x 256 tiles: each MMA warpgroup owns 64 rows x 256 columns, computed as two
        128-column halves per K block that share one block accumulator (`Fp8WideMixin`)."""
        return (self.tile_m, self.tile_n) == (128, 256)

    @property
    def wg_layout(self) -> tuple[int, int]:
        """MMA warpgroups along (M, N); each warpgroup owns a 64 x 128 sub-tile (64 x 256 on
        wide tiles)."""
        if self.wide:
            return 2, 1
        return self.tile_m // WG_TILE_M, self.tile_n // SCALE_BLOCK_N

    @property
    def sub_tiles(self) -> int:
        """Column tiles a scheduled tile runs one after the other: 2 for swiglu_quant on
        128 x 128 tiles (the two halves of one 128-feature quantization block), else 1."""
        return 2 if self.epilogue == "swiglu_quant" and self.tile_n == 128 else 1

    @property
    def sched_n(self) -> int:
        """GEMM columns of one scheduled tile."""
        return self.tile_n * self.sub_tiles

def _slot_words(tile_m: int) -> int:
    """Scale slot of one stage: the K block's x scales of the tile's rows, then the w scales of
    its (at most 2) weight-scale blocks, padded to 16 bytes."""
    return tile_m + 4


def _stage_bytes(tile_m: int, tile_n: int) -> int:
    # A and B tiles (fp8) and the scale slot (fp32)
    return tile_m * BLOCK_K + tile_n * BLOCK_K + 4 * _slot_words(tile_m)


def _epilogue_smem_bytes(epilogue: str, tile_m: int, tile_n: int) -> int:
    if (tile_m, tile_n) == (128, 256):  # wide: one 128-column half at a time (bf16), or the
        epi_n = SCALE_BLOCK_N  # FP8 rows of the tile's whole quantization block
        return tile_m * (epi_n + 8) * 2 if epilogue == "bf16" else tile_m * (epi_n + 16)
    if epilogue == "bf16":
        return tile_m * (tile_n + 8) * 2
    if tile_n == 128:  # paired: FP8 rows of a whole quantization block + the first half's stash
        return tile_m * (SCALE_BLOCK_N + 16) + STASH_WORDS * 256 * 4
    return tile_m * (tile_n // 2 + 16) + 2 * tile_m * 4


def kernel_config(
    epilogue: str,
    ue8m0: bool = False,
    cluster: tuple[int, int] | None = None,
    overlap: bool | None = None,
    *,
    epi_overlap: bool | None = None,
    fast_silu: bool | None = None,
    tile: tuple[int, int] | None = None,
    skip_epilogue: bool = False,
    n_major: bool = False,
    cluster_launch: bool = False,
    stages: int | None = None,
    band: int = 0,
    early_scales: bool = True,
) -> KernelConfig:
    """The tile shape, stage count, cluster shape and mainloop used for ``epilogue``.

    ``cluster`` = (CTAs along M, CTAs along N), each 1 or 2; None picks `DEFAULT_CLUSTER`.
    ``overlap``: promote each K block while the next block's wgmma runs (two in-flight block
    accumulators); None picks `DEFAULT_OVERLAP`. ``epi_overlap``: issue the next tile's first K
    block before this tile's epilogue, so the tensor cores work while it runs (needs ``overlap``);
    None picks `DEFAULT_EPI_OVERLAP` where ``overlap`` holds. ``fast_silu``: compute the sigmoid of
    the swiglu_quant epilogue with ``rcp.approx`` (one MUFU op) instead of an IEEE division; None
    picks `DEFAULT_FAST_SILU`. ``tile`` = (rows, columns) of the CTA tile, (128, 128), (128, 256)
    or (64, 256); None picks (128, 128). (128, 256) is the wide tile (`Fp8WideMixin`): 25% fewer
    operand bytes per FLOP, serial promotion (``overlap`` must be False or None), N % 256 == 0,
    and ``epi_overlap`` issues the next tile's first half-block before the epilogue.
    swiglu_quant on (128, 128) runs the two column halves of each 128-feature quantization block
    one after the other in one CTA ("paired"); on (64, 256) the two warpgroups
    sit side by side and exchange row maxima through shared memory (the earlier layout, kept for
    comparison). ``skip_epilogue`` is a diagnostic (the mainloop alone; nothing is written).
    ``n_major``: the tile order inside an expert -- all its row tiles of one column group before
    the next group (its weight column blocks are read once, its rows stay in L2), instead of all
    column groups of one row tile first (the default). Same bits; on one H100 it measured within
    noise of the default at every bench shape (bench/results/fp8_H100_tile_order.txt), so the
    wrapper does not use it. ``band`` = b > 0 generalizes it: bands of b column groups, all row
    tiles of an expert's band before its next band (the last band may be narrower); the tiles
    the CTAs work on at once then share fewer weight columns and rows. Same bits.
    ``cluster_launch`` (diagnostic) launches one CTA with a 1 x 1 x 1
    cluster attribute, as the kernel did before 2026-11-27. ``stages`` (diagnostic) caps the
    pipeline stages below the most that fit in shared memory (None: the most, at most 8).
    ``early_scales`` (128 x 256 only; default on): read both column halves' scales of a K block
    before the block's first wgmma wait. Off, the second half's are read after its wgmmas are
    issued, and ptxas then waits on that shared-memory load between the wgmmas (Nsight Compute,
    bench/results/fp8_H100_ncu_probe.txt); on is 0-2% faster (bench/results/fp8_H100_ab_wide.txt).
    Same bits.
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if not isinstance(band, int) or band < 0 or (band and n_major):
        raise ValueError(f"band must be an int >= 0 (and 0 with n_major), got {band!r}")
    cluster_m, cluster_n = DEFAULT_CLUSTER[epilogue] if cluster is None else cluster
    if cluster_m not in (1, 2) or cluster_n not in (1, 2):
        raise ValueError(f"cluster must be (1 or 2, 1 or 2), got {cluster!r}")
    tile_m, tile_n = (128, 128) if tile is None else tuple(tile)
    if (tile_m, tile_n) not in ((128, 128), (128, 256), (64, 256)):
        raise ValueError(f"tile must be (128, 128), (128, 256) or (64, 256), got {tile!r}")
    wide = (tile_m, tile_n) == (128, 256)
    if wide and overlap:
        raise ValueError(
            "the (128, 256) tile promotes serially (its warpgroups take turns on the tensor "
            "cores): pass overlap=False or None"
        )
    overlap = (not wide and DEFAULT_OVERLAP[epilogue]) if overlap is None else bool(overlap)
    if epi_overlap is None:
        epi_overlap = DEFAULT_EPI_OVERLAP[epilogue] and (overlap or wide)
    epi_overlap = bool(epi_overlap)
    if epi_overlap and not (overlap or wide):
        raise ValueError("epi_overlap needs the overlapped mainloop (overlap=True)")
    fast_silu = DEFAULT_FAST_SILU if fast_silu is None else bool(fast_silu)
    smem_capacity = 232448  # sm_90: 227 KiB of dynamic shared memory per CTA
    reserved = 2048  # mbarriers, alignment padding
    free = smem_capacity - reserved - _epilogue_smem_bytes(epilogue, tile_m, tile_n)
    num_stages = min(8, free // _stage_bytes(tile_m, tile_n))
    if stages is not None:
        if not 2 <= stages <= num_stages:
            raise ValueError(
                f"stages must be in [2, {num_stages}] for the {epilogue} kernel on {tile_m} x "
                f"{tile_n} tiles (shared memory), got {stages!r}"
            )
        num_stages = int(stages)
    return KernelConfig(
        epilogue,
        bool(ue8m0 and epilogue == "swiglu_quant"),
        tile_m,
        tile_n,
        num_stages,
        cluster_m,
        cluster_n,
        overlap,
        epi_overlap,
        bool(fast_silu and epilogue == "swiglu_quant"),
        bool(skip_epilogue),
        bool(n_major),
        bool(cluster_launch),
        int(band),
        bool(early_scales and wide),
    )


class GroupedGemmFp8Kernel(Fp8ScheduleMixin, Fp8MainloopMixin, Fp8WideMixin, Fp8EpilogueMixin):
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
        self.cluster_m = config.cluster_m
        self.cluster_n = config.cluster_n
        self.cluster_size = config.cluster_size
        self.cluster_rows = self.tile_m * self.cluster_m
        self.sub_tiles = config.sub_tiles
        self.sched_n = config.sched_n
        self.paired = self.fused and self.sub_tiles == 2
        self.wide = config.wide
        self.hooks = "_wide" if self.wide else "_narrow"  # the consumer's per-tile methods
        self.ab_dtype = cutlass.Float8E4M3FN
        self.acc_dtype = Float32
        self.slot_words = _slot_words(self.tile_m)

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
        n = cute.assume(n, divby=self.sched_n)
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

        # A is shared by the CTAs of a cluster along N, B by those along M: each of the sharing
        # CTAs loads a slice of the tile and multicasts it to all of them.
        g2s = cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp()
        g2s_mcast = cute.nvgpu.cpasync.CopyBulkTensorTileG2SMulticastOp()
        tma_a, m_a_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
            g2s_mcast if const_expr(self.cluster_n > 1) else g2s,
            m_a,
            cute.slice_(a_smem_staged, (None, None, 0)),
            (tile_m, BLOCK_K),
            num_multicast=self.cluster_n,
        )
        tma_b, m_b_tma = cute.nvgpu.cpasync.make_tiled_tma_atom(
            g2s_mcast if const_expr(self.cluster_m > 1) else g2s,
            m_b,
            cute.slice_(b_smem_staged, (None, None, 0)),
            (tile_n, BLOCK_K),
            num_multicast=self.cluster_m,
        )

        if const_expr(self.fused):  # fp8 rows of a quantization block, padded by 16 B
            out_smem = cute.make_layout(
                (tile_m, self.sched_n // 2), stride=(self.sched_n // 2 + 16, 1)
            )
        else:  # bf16 rows padded by 16 B (wide tiles: one 128-column half at a time)
            epi_n = SCALE_BLOCK_N if const_expr(self.wide) else tile_n
            out_smem = cute.make_layout((tile_m, epi_n), stride=(epi_n + 8, 1))
        out_dtype = self.ab_dtype if const_expr(self.fused) else cutlass.BFloat16
        amax_words = 2 * tile_m if const_expr(self.fused) else 4
        stash_words = STASH_WORDS * self.num_mma_threads if const_expr(self.paired) else 4

        @cute.struct
        class SharedStorage:
            pipe_barriers: cute.struct.MemRange[Int64, self.num_stages * 2]
            s_a: cute.struct.Align[
                cute.struct.MemRange[self.ab_dtype, cute.cosize(a_smem_staged)], 1024
            ]
            s_b: cute.struct.Align[
                cute.struct.MemRange[self.ab_dtype, cute.cosize(b_smem_staged)], 1024
            ]
            s_out: cute.struct.Align[cute.struct.MemRange[out_dtype, cute.cosize(out_smem)], 128]
            s_amax: cute.struct.Align[cute.struct.MemRange[Float32, amax_words], 16]
            s_stash: cute.struct.Align[cute.struct.MemRange[Int32, stash_words], 16]
            s_sc: cute.struct.Align[
                cute.struct.MemRange[Float32, self.slot_words * self.num_stages], 16
            ]

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
            # No cluster attribute for one CTA: a cluster launch of 1 x 1 x 1 ran this kernel up
            # to 9% slower on H100 (bench/results/fp8_H100_launch_attr.txt, variant "l").
            cluster=[self.cluster_size, 1, 1]
            if const_expr(self.cluster_size > 1 or self.config.cluster_launch) else None,
            min_blocks_per_mp=1,
            stream=stream,
        )

    # ------------------------------------------------------------------ device side

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
        # the scale slot of each stage: (slot word, stage)
        s_sc = storage.s_sc.get_tensor(
            cute.make_layout((self.slot_words, self.num_stages), stride=(1, self.slot_words))
        )
        # paired swiglu_quant: word w of MMA thread t at w * threads + t (thread-private slots)
        stash_threads = self.num_mma_threads if const_expr(self.paired) else 1
        s_stash = storage.s_stash.get_tensor(
            cute.make_layout((STASH_WORDS if const_expr(self.paired) else 4, stash_threads),
                             stride=(stash_threads, 1))
        )

        tx_bytes = cute.size_in_bytes(
            self.ab_dtype, cute.slice_(a_smem_staged, (None, None, 0))
        ) + cute.size_in_bytes(self.ab_dtype, cute.slice_(b_smem_staged, (None, None, 0)))
        # A stage of this CTA is written by the CTAs sharing its row (A) or column (B) of the
        # cluster, so each consumer warp releases it to all of them (cluster_m + cluster_n - 1
        # arrivals per warp on every such CTA's empty barrier). With a cluster, create() also
        # syncs the cluster after the barrier init, before any multicast or remote arrive.
        mcast_peers = self.cluster_m + self.cluster_n - 1
        # A stage is full after the TMA thread's arrival (with its bytes) and one arrival per
        # producer lane once that lane's scale copies have landed (`_load_scales`).
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.pipe_barriers.data_ptr(),
            num_stages=self.num_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1 + 32),
            consumer_group=pipeline.CooperativeGroup(
                pipeline.Agent.Thread, mcast_peers * self.num_mma_threads // 32
            ),
            tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, self.cluster_m, self.cluster_n, 1)),
        )
        num_n_tiles = cute.size(m_b_tma, mode=[0]) // self.sched_n  # scheduled tiles along N
        num_k_blocks = cute.size(m_b_tma, mode=[1]) // BLOCK_K

        wg_idx = cute.arch.make_warp_uniform(tidx // self.threads_per_wg)
        if wg_idx == 0:
            cute.arch.setmaxregister_decrease(self.producer_regs)
            if warp_idx == 0:
                self._producer(
                    tma_a, m_a_tma, tma_b, m_b_tma, s_a, s_b, s_sc, mainloop, m_sfa, m_sfb,
                    m_offsets, num_experts, num_rows, num_n_tiles, num_k_blocks, tidx % 32,
                )  # fmt: skip
        else:
            cute.arch.setmaxregister_increase(self.mma_regs)
            self._consumer(
                tidx - self.threads_per_wg, wg_idx - 1, tiled_mma, s_a, s_b, s_out, s_amax,
                s_stash, s_sc, mainloop, m_out, m_out_sf, m_offsets, num_experts, num_rows,
                num_n_tiles, num_k_blocks,
            )  # fmt: skip

    @cute.jit
    def _producer(
        self,
        tma_a: cute.CopyAtom,
        m_a_tma: cute.Tensor,
        tma_b: cute.CopyAtom,
        m_b_tma: cute.Tensor,
        s_a: cute.Tensor,
        s_b: cute.Tensor,
        s_sc: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        m_sfa: cute.Tensor,
        m_sfb: cute.Tensor,
        m_offsets: cute.Tensor,
        num_experts: Int32,
        num_rows: Int32,
        num_n_tiles: Int32,
        num_k_blocks: Int32,
        lane: Int32,
    ):
        """One warp: TMA loads of the A and B tiles of every K block of this CTA's tiles (one
        elected lane), and every lane's share of the block's promotion scales (`_load_scales`).

        In a cluster, this CTA loads its slice of the A tile (1 / cluster_n of the rows) and of
        the B tile (1 / cluster_m) and multicasts each to the CTAs that share it; each CTA copies
        its own scales.
        """
        tile_m = self.tile_m
        cluster_id, num_clusters, m_rank, n_rank = cluster_position(
            self.cluster_m, self.cluster_size
        )
        cta_layout = cute.make_layout((self.cluster_m, self.cluster_n))
        cta_coord = (m_rank, n_rank)
        a_mcast_mask = cute.make_layout_image_mask(cta_layout, cta_coord, mode=1)
        b_mcast_mask = cute.make_layout_image_mask(cta_layout, cta_coord, mode=0)
        num_n_groups = (num_n_tiles + self.cluster_n - 1) // self.cluster_n
        # B: (TMA, n_tile, k_block, expert), fixed over the kernel.
        g_b = cute.local_tile(m_b_tma, (self.tile_n, BLOCK_K), (None, None, None))
        t_b_s, t_b_g = cute.nvgpu.cpasync.tma_partition(
            tma_b, m_rank, cute.make_layout(self.cluster_m),
            cute.group_modes(s_b, 0, 2), cute.group_modes(g_b, 0, 2),
        )  # fmt: skip
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        tile = Int32(cluster_id)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._first_cursor(m_offsets)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
            tile, num_n_groups, m_offsets, num_experts, num_rows,
            expert, tiles_before, seg_start, seg_end, expert_tiles,
        )  # fmt: skip
        while expert <= num_experts:
            row0, n_tile = self._cta_tile(
                tile, num_n_groups, tiles_before, seg_start, m_rank, n_rank, expert_tiles
            )
            # A CTA tile past the N edge (odd tile count) loads the last column block: it keeps
            # the cluster's pipeline going, and its epilogue stores nothing.
            n_tile = cutlass.min(n_tile, num_n_tiles - 1)
            if expert < num_experts:  # the padding segment loads nothing
                g_a = cute.local_tile(
                    cute.domain_offset((row0, 0), m_a_tma), (tile_m, BLOCK_K), (0, None)
                )
                t_a_s, t_a_g = cute.nvgpu.cpasync.tma_partition(
                    tma_a, n_rank, cute.make_layout(self.cluster_n),
                    cute.group_modes(s_a, 0, 2), cute.group_modes(g_a, 0, 2),
                )  # fmt: skip
                for h in cutlass.range_constexpr(self.sub_tiles):  # column tiles, in order
                    b_tile = n_tile * self.sub_tiles + h
                    for kb in cutlass.range(0, num_k_blocks, 1, unroll=1):
                        producer_acquire(mainloop, state)
                        barrier = mainloop.producer_get_barrier(state)
                        tma_load(tma_a, t_a_g[(None, kb)], t_a_s[(None, state.index)], barrier,
                                 a_mcast_mask, self.cluster_n > 1)
                        tma_load(tma_b, t_b_g[(None, b_tile, kb, expert)],
                                 t_b_s[(None, state.index)], barrier, b_mcast_mask,
                                 self.cluster_m > 1)
                        self._load_scales(
                            s_sc, state.index, m_sfa, m_sfb, row0, kb,
                            b_tile * (self.tile_n // SCALE_BLOCK_N), expert, num_rows, lane,
                            barrier,
                        )  # fmt: skip
                        mainloop.producer_commit(state)
                        state.advance()
            tile = tile + num_clusters
            expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
                tile, num_n_groups, m_offsets, num_experts, num_rows,
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
        s_stash: cute.Tensor,
        s_sc: cute.Tensor,
        mainloop: pipeline.PipelineTmaAsync,
        m_out: cute.Tensor,
        m_out_sf: cute.Tensor,
        m_offsets: cute.Tensor,
        num_experts: Int32,
        num_rows: Int32,
        num_n_tiles: Int32,
        num_k_blocks: Int32,
    ):
        """Two MMA warpgroups: the persistent loop over this CTA's tiles. The K loop and the
        epilogue of a tile come from the tile shape's hooks (`_narrow_*` in `Fp8MainloopMixin`
        for 128 x 128 and 64 x 256 tiles, `_wide_*` in `Fp8WideMixin` for 128 x 256); the
        promotion scales come from each stage's scale slot, so nothing but the pipeline state
        carries from one tile to the next."""
        setup, first, pipelined, zero_tile, plain_tile = (
            getattr(self, self.hooks + name)
            for name in ("_setup", "_first", "_pipelined", "_zero_tile", "_plain_tile")
        )
        cid, num_clusters, m_rank, n_rank = cluster_position(self.cluster_m, self.cluster_size)
        num_n_groups = (num_n_tiles + self.cluster_n - 1) // self.cluster_n
        # mma: the K loop's fixed operands (tiled_mma is passed apart: the loops rebind it);
        # epi: everything the epilogue needs besides the accumulators and the tile
        mma, epi = setup(
            mma_tidx, mma_wg, tiled_mma, s_a, s_b, s_out, s_amax, s_stash, mainloop, s_sc, m_out,
            m_out_sf,
        )  # fmt: skip

        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.num_stages)
        release_state = pipeline.make_pipeline_state(
            pipeline.PipelineUserType.Consumer, self.num_stages
        )  # the overlapped mainloop releases one block behind `state`
        tile = Int32(cid)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._first_cursor(m_offsets)
        expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
            tile, num_n_groups, m_offsets, num_experts, num_rows,
            expert, tiles_before, seg_start, seg_end, expert_tiles,
        )  # fmt: skip
        row0, n_tile, valid_rows = self._tile_coords(
            tile, num_n_groups, tiles_before, seg_start, seg_end, m_rank, n_rank, num_n_tiles,
            expert_tiles,
        )
        if const_expr(self.config.epi_overlap):
            # Pipelined over tiles (module docstring): expert tiles come first in a CTA's order,
            # then padding tiles; the expert-tile loop is peeled (its last tile after it).
            if expert < num_experts:
                state, tiled_mma = first(mma, tiled_mma, state)
                tile = tile + num_clusters
                expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
                    tile, num_n_groups, m_offsets, num_experts, num_rows,
                    expert, tiles_before, seg_start, seg_end, expert_tiles,
                )  # fmt: skip
                while expert < num_experts:
                    nrow0, nn_tile, nvalid_rows = self._tile_coords(
                        tile, num_n_groups, tiles_before, seg_start, seg_end, m_rank, n_rank,
                        num_n_tiles, expert_tiles,
                    )  # fmt: skip
                    state, release_state, tiled_mma = pipelined(
                        mma, epi, tiled_mma, state, release_state, row0, n_tile, valid_rows,
                        num_k_blocks, True,
                    )  # fmt: skip
                    row0, n_tile, valid_rows = nrow0, nn_tile, nvalid_rows
                    tile = tile + num_clusters
                    expert, tiles_before, seg_start, seg_end, expert_tiles = (
                        self._advance_cursor(
                            tile, num_n_groups, m_offsets, num_experts, num_rows,
                            expert, tiles_before, seg_start, seg_end, expert_tiles,
                        )
                    )  # fmt: skip
                # the CTA's last expert tile
                state, release_state, tiled_mma = pipelined(
                    mma, epi, tiled_mma, state, release_state, row0, n_tile, valid_rows,
                    num_k_blocks, False,
                )  # fmt: skip
            while expert <= num_experts:  # padding tiles: zero output, no mainloop
                row0, n_tile, valid_rows = self._tile_coords(
                    tile, num_n_groups, tiles_before, seg_start, seg_end, m_rank, n_rank,
                    num_n_tiles, expert_tiles,
                )  # fmt: skip
                zero_tile(mma, epi, row0, valid_rows, n_tile)
                tile = tile + num_clusters
                expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
                    tile, num_n_groups, m_offsets, num_experts, num_rows,
                    expert, tiles_before, seg_start, seg_end, expert_tiles,
                )  # fmt: skip
        else:
            while expert <= num_experts:
                state, release_state, tiled_mma = plain_tile(
                    mma, epi, tiled_mma, state, release_state, row0, n_tile, valid_rows, expert,
                    num_experts, num_k_blocks,
                )  # fmt: skip
                tile = tile + num_clusters
                expert, tiles_before, seg_start, seg_end, expert_tiles = self._advance_cursor(
                    tile, num_n_groups, m_offsets, num_experts, num_rows,
                    expert, tiles_before, seg_start, seg_end, expert_tiles,
                )  # fmt: skip
                row0, n_tile, valid_rows = self._tile_coords(
                    tile, num_n_groups, tiles_before, seg_start, seg_end, m_rank, n_rank,
                    num_n_tiles, expert_tiles,
                )  # fmt: skip

    @cute.jit
    def _epilogue(
        self,
        epi: tuple,
        acc: cute.Tensor,
        h: cutlass.Constexpr[int],
        row0: Int32,
        valid_rows: Int32,
        n_tile: Int32,
    ):
        """The configured epilogue of column tile ``h`` of a scheduled tile (``skip_epilogue``:
        only in a branch that never runs, which keeps the mainloop's results live)."""
        (
            thr_mma, t_c_coord, s_out, s_amax, s_stash, m_out, m_out_sf, mma_tidx, mma_wg,
            wg_tidx, wg_n_idx, wg_barrier, mma_barrier,
        ) = epi  # fmt: skip
        if const_expr(self.config.skip_epilogue):
            run = valid_rows < Int32(-(1 << 30))
        else:
            run = True
        if run:
            if const_expr(not self.fused):
                self._epilogue_bf16(
                    acc, thr_mma, s_out, m_out, row0, valid_rows, n_tile * self.wg_n + wg_n_idx,
                    mma_wg, wg_tidx, wg_barrier,
                )  # fmt: skip
            elif const_expr(not self.paired):
                self._epilogue_swiglu_quant(
                    acc, t_c_coord, s_out, s_amax, m_out, m_out_sf, row0, valid_rows, n_tile,
                    mma_tidx, wg_tidx, wg_n_idx, mma_barrier,
                )  # fmt: skip
            elif const_expr(h == 0):
                self._epilogue_swiglu_first_half(acc, s_stash, mma_tidx)
            else:
                self._epilogue_swiglu_second_half(
                    acc, t_c_coord, s_stash, s_out, m_out, m_out_sf, row0, valid_rows, n_tile,
                    mma_tidx, mma_wg, wg_tidx, wg_barrier,
                )  # fmt: skip
        cute.arch.sync_warp()  # reconverge after the predicated stores, before wgmma

def grid_size(
    num_rows: int,
    n: int,
    num_experts: int,
    config: KernelConfig,
    num_sms: int,
    max_clusters: int | None = None,
) -> int:
    """Persistent CTAs to launch: whole clusters, at most one CTA per SM (and at most
    ``max_clusters`` clusters, the device's co-resident limit), never more than the cluster-tile
    upper bound.

    Each of the E + 1 segments (experts, then padding) adds at most one partial cluster m-tile,
    so cluster m-tiles <= M // (tile_m * cluster_m) + E + 1; cluster n-tiles =
    ceil(N / tile_n / cluster_n).
    """
    cluster_rows = config.tile_m * config.cluster_m
    n_groups = -(-(n // config.sched_n) // config.cluster_n)
    max_tiles = (num_rows // cluster_rows + num_experts + 1) * n_groups
    clusters = num_sms // config.cluster_size
    if max_clusters is not None:
        clusters = min(clusters, max_clusters)
    return config.cluster_size * max(1, min(clusters, max_tiles))


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


def compile_kernel(
    epilogue: str,
    ue8m0: bool = False,
    *,
    ptx_dir: str | None = None,
    cluster: tuple[int, int] | None = None,
    overlap: bool | None = None,
    **variant,
):
    """Compile the kernel for ``epilogue`` for sm_90a (all shapes symbolic); needs no GPU.

    Returns the compiled callable that `launch` runs (pass `launch` the same ``cluster`` and
    ``tile``). With ``ptx_dir`` the PTX is also written there and kept in the result's
    ``.artifacts.PTX``. ``cluster`` = (CTAs along M, along N), None for `DEFAULT_CLUSTER`;
    ``overlap`` and the keyword ``variant`` options (``epi_overlap``, ``fast_silu``, ``tile``,
    ``skip_epilogue``) as in `kernel_config`.
    """
    kernel = GroupedGemmFp8Kernel(kernel_config(epilogue, ue8m0, cluster, overlap, **variant))
    pointers = _pointer_args(epilogue, 0, 0, 0, 0, 0, 0, 0)
    sizes = tuple(Int32(v) for v in (128, 256, 128, 1, 128, 1))
    options = "--gpu-arch=sm_90a"
    if ptx_dir is not None:
        options += f" --keep-ptx --dump-dir={ptx_dir}"
    if use_tvm_ffi():  # `launch` then calls it with plain integers (nmoe_kernels._launch)
        options += " --enable-tvm-ffi"
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
    *,
    cluster: tuple[int, int] | None = None,
    tile: tuple[int, int] | None = None,
) -> None:
    """Run a `compile_kernel` result on device addresses (the wrapper validates them).

    ``cluster`` and ``tile`` must be the ones the kernel was compiled with.
    """
    config = _launch_config(epilogue, None if cluster is None else tuple(cluster),
                            None if tile is None else tuple(tile))
    if n % config.sched_n:
        raise ValueError(
            f"N = {n} must be a multiple of {config.sched_n} for the {epilogue} kernel on "
            f"{config.tile_m} x {config.tile_n} tiles"
        )
    max_clusters = None
    if config.cluster_size > 1:
        import torch

        max_clusters = max_active_clusters(config.cluster_size, torch.cuda.current_device())
    num_ctas = grid_size(num_rows, n, num_experts, config, num_sms, max_clusters)
    function = ffi_function(compiled)
    if function is not None:  # TVM FFI: addresses, sizes and the stream as plain integers
        function(a, sfa, b, sfb, out, out_sf, offsets, num_rows, n, k, num_experts,
                 rows_aligned, num_ctas, stream)
        return
    compiled(
        *_pointer_args(epilogue, a, sfa, b, sfb, out, out_sf, offsets),
        Int32(num_rows),
        Int32(n),
        Int32(k),
        Int32(num_experts),
        Int32(rows_aligned),
        Int32(num_ctas),
        cu_stream(stream),
    )


@functools.cache
def _launch_config(epilogue: str, cluster, tile) -> KernelConfig:
    """`kernel_config` for `launch` (tile shape, cluster, scheduling width), computed once per
    (epilogue, cluster, tile) instead of on every call."""
    return kernel_config(epilogue, cluster=cluster, tile=tile)
