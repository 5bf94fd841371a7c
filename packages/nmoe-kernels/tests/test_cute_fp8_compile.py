"""The CuTeDSL FP8 grouped GEMM kernels compile for sm_90a without a GPU (CPU test).

Each kernel is compiled with all shapes symbolic and its PTX is checked for the instructions the
design depends on: FP8 wgmma m64n128k32 with fp32 accumulators (4 per 128-deep K block), two
TMA tile loads per stage (A 2-D, B 3-D over experts; the scales are plain loads) that multicast to
the cluster exactly when the cluster shares that operand (A along N, B along M), warpgroup register
reallocation, no local-memory spills (and, where ptxas is installed, no spills and no wgmma
serialization in its report), the tile-pipelined loop of ``epi_overlap``, and in the fused
epilogue the sigmoid (IEEE division, or rcp.approx with ``fast_silu``), the IEEE scale division and
reciprocal of the reference rule, quad shuffles for the row amax, saturating RNE E4M3 packing and
(with UE8M0) the integer round-up of the scale. Also: the FP8 weight re-layout helper is a
bitwise transpose of the 128x128 quantization.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings

import pytest
import torch

from nmoe_kernels import reference as ref

pytest.importorskip("cutlass")


def compiled_ptx(epilogue: str, ue8m0: bool, ptx_dir, cluster=None, overlap=None, **opts) -> str:
    """The kernel's PTX; fails where the DSL warns while compiling it (a user would see the
    warning on the op's first call)."""
    from cutlass.base_dsl.ast_helpers import DSLOptimizationWarning

    from nmoe_kernels.cute.grouped_gemm_fp8 import compile_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DSLOptimizationWarning)
        compiled = compile_kernel(
            epilogue, ue8m0, ptx_dir=str(ptx_dir), cluster=cluster, overlap=overlap, **opts
        )
    dsl = [str(w.message) for w in caught if issubclass(w.category, DSLOptimizationWarning)]
    assert not dsl, f"DSL warnings while compiling: {dsl}"
    return compiled.artifacts.PTX


def ptxas_report(ptx: str, tmp_path) -> str | None:
    """ptxas -v output for the PTX (None where ptxas is not installed)."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return None
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    done = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout + done.stderr


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


@pytest.mark.parametrize(
    ("epilogue", "ue8m0", "cluster", "overlap", "opts"),
    [
        ("bf16", False, None, None, {}),
        ("bf16", False, (1, 1), False, {}),
        ("bf16", False, (2, 2), False, {}),
        ("bf16", False, (1, 2), True, {}),
        ("bf16", False, (2, 1), True, {}),  # LONG_CLUSTER["bf16"]
        ("bf16", False, (1, 1), True, {"epi_overlap": False}),
        ("bf16", False, (1, 1), True, {"epi_overlap": True}),
        ("swiglu_quant", False, None, None, {}),
        ("swiglu_quant", True, None, None, {}),
        ("swiglu_quant", False, (2, 1), True, {}),
        ("swiglu_quant", False, (1, 2), True, {}),  # LONG_CLUSTER["swiglu_quant"]
        ("swiglu_quant", False, (1, 1), True, {"epi_overlap": False, "fast_silu": False}),
        ("swiglu_quant", False, (1, 1), False, {"epi_overlap": False}),
        ("swiglu_quant", True, (1, 2), True, {"epi_overlap": True, "fast_silu": False}),
        ("swiglu_quant", False, None, None, {"tile": (64, 256)}),
        ("swiglu_quant", False, None, None, {"tile": (64, 256), "epi_overlap": False}),
        ("bf16", False, None, None, {"tile": (64, 256)}),
        ("bf16", False, None, None, {"n_major": True}),
        ("swiglu_quant", False, None, None, {"n_major": True}),
        ("bf16", False, None, None, {"band": 4}),
        ("bf16", False, (2, 1), None, {"tile": (128, 256), "band": 2}),
        # the 128 x 256 tile (`grouped_gemm_fp8_wide`); (2, 1) is LONG_TILE["bf16"]'s cluster
        ("bf16", False, (2, 1), None, {"tile": (128, 256)}),
        ("bf16", False, None, None, {"tile": (128, 256)}),
        ("bf16", False, (1, 2), False, {"tile": (128, 256), "epi_overlap": False}),
        ("swiglu_quant", False, None, None, {"tile": (128, 256)}),
        ("swiglu_quant", True, (2, 2), None, {"tile": (128, 256), "fast_silu": False}),
        ("swiglu_quant", False, None, None, {"tile": (128, 256), "epi_overlap": False}),
    ],
)
def test_kernel_compiles_for_sm90a(epilogue, ue8m0, cluster, overlap, opts, tmp_path):
    from nmoe_kernels.cute.grouped_gemm_fp8 import kernel_config

    config = kernel_config(epilogue, ue8m0, cluster, overlap, **opts)
    ptx = compiled_ptx(epilogue, ue8m0, tmp_path, cluster, overlap, **opts)
    assert ".target sm_90a" in ptx
    wgmma = r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3"
    # Issue sites of a K block's 4 wgmma: with the overlapped promotion, `_mainloop_first` (1)
    # and `_mainloop_rest` (3: the loop's two blocks and the even-count tail), per column tile
    # (S = 2 for paired swiglu_quant tiles). The epilogue-overlapped loop is peeled (its last
    # tile after it): prologue first + S x (rest + first) in the loop + S rests and S - 1 firsts
    # after it = 8 S sites, and the epilogue appears twice plus once for padding tiles.
    # The 128 x 256 tile: `_wide_first` (1 site) and `_wide_rest` (3: the loop's second half and
    # next block, the last block's second half), peeled like the above with epi_overlap; two
    # wait_group 0 per finished block, none with 1.
    subs = config.sub_tiles
    if config.wide:
        sites, rests = (8, 2) if config.epi_overlap else (4, 1)
        waits1, waits0 = 0, 4 * rests
    else:
        if config.epi_overlap:
            sites, rests = 8 * subs, 2 * subs
        elif config.overlap:
            sites, rests = 4 * subs, subs
        else:
            sites, rests = subs, 0
        waits1 = 3 * rests
        waits0 = 2 * rests if config.overlap else subs  # serial: promote after every block
    assert count(wgmma, ptx) == 4 * sites
    assert count(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx) == waits1
    assert count(r"wgmma\.wait_group\.sync\.aligned\s+0;", ptx) == waits0
    local = r"\.shared::cta\.global\.tile\.mbarrier::complete_tx::bytes\.L2"
    mcast = r"\.shared::cluster\.global\.tile\.mbarrier::complete_tx::bytes\.multicast::cluster"
    a_load = mcast if config.cluster_n > 1 else local  # A [M, K]
    b_load = mcast if config.cluster_m > 1 else local  # B [E, N, K]
    # one A and one B load per K block, in a producer loop per column tile
    assert count(r"cp\.async\.bulk\.tensor\.2d" + a_load, ptx) == subs
    assert count(r"cp\.async\.bulk\.tensor\.3d" + b_load, ptx) == subs
    assert count(r"cp\.async\.bulk\.tensor", ptx) == 2 * subs
    # the producer lanes' promotion scales (`_load_scales`): per K block, 4-byte copies of the
    # tile's x scales (tile_m / 32 per lane) and its weight scales (one, on the first lanes),
    # then one arrival per lane when they land; the full barriers count those 32 arrivals
    scale_copies = (config.tile_m // 32 + 1) * subs
    assert count(r"cp\.async\.ca\.shared\.global[^;]*, 4, 4;", ptx) == scale_copies
    assert count(r"cp\.async\.mbarrier\.arrive\.noinc", ptx) == subs
    assert count(r"ld\.global\.f32", ptx) == 0  # no scale loads left in the MMA warps
    full_init = r"mov\.b32\s+(%r\d+), 33;(?s:.*?)mbarrier\.init\.shared\.b64\s+\[[^\]]+\], \1;"
    assert re.search(full_init, ptx)
    # a consumer releases a stage to the other CTAs of the cluster through mapa'd barriers
    assert (count(r"mapa\.shared::cluster", ptx) >= 1) == (config.cluster_size > 1)
    assert count(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40", ptx) == 1
    assert count(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232", ptx) == 1
    assert ".local" not in ptx, "register spills to local memory"
    assert count(r"st\.global\.v4", ptx) >= 1  # 16-byte predicated row stores
    if epilogue == "swiglu_quant":
        copies = 2 if config.epi_overlap else 1  # epilogues of tiles with a mainloop
        epis = copies + (1 if config.epi_overlap else 0)  # with the padding-tile epilogue
        # per thread, paired and wide tiles: 64 features of one quantization block (paired: 32
        # per half, quantized in the second); 64 x 256: 32
        paired = subs == 2 or config.wide
        # FP8 packing (2 per cvt) of 64 / 32 values; the padding copy of the paired epilogue
        # still quantizes the stashed half (16 + 1), the wide and 64 x 256 ones a constant (1)
        padding_cvts = (17 if subs == 2 else 1) if config.epi_overlap else 0
        e4m3 = r"cvt\.rn\.satfinite\.e4m3x2\.f32"
        assert count(e4m3, ptx) == (32 if paired else 16) * copies + padding_cvts
        # row amax: 2 rows x 2 quad steps per half
        assert count(r"shfl\.sync\.bfly\.b32", ptx) == (8 if paired else 4) * epis
        div448 = r"div\.rn\.f32\s+%r\d+, %r\d+, 0f43E00000"
        assert count(div448, ptx) == 2 * epis  # amax / 448, IEEE
        assert count(r"rcp\.rn\.f32", ptx) == 2 * epis  # 1 / scale, correctly rounded
        assert "div.approx" not in ptx and "div.full" not in ptx
        # the sigmoid: one IEEE division or one rcp.approx per (gate, up) pair
        sigmoids = (64 if paired else 32) * copies
        if config.fast_silu:
            assert count(r"rcp\.approx\.ftz\.f32", ptx) == sigmoids
            assert count(r"div\.rn\.f32", ptx) == 2 * epis
        else:
            assert "rcp.approx" not in ptx
            assert count(r"div\.rn\.f32", ptx) == sigmoids + 2 * epis
        assert (count(r"8388607;", ptx) == 2 * epis) == ue8m0  # scale round-up to a power of 2
    else:
        assert "cvt.rn.satfinite.e4m3x2.f32" not in ptx
        assert count(r"cvt\.rn\.bf16x2\.f32|cvt\.rn\.bf16\.f32", ptx) >= 32
    report = ptxas_report(ptx, tmp_path)
    if report is not None:
        # C7514: ptxas found an in-flight wgmma accumulator read (e.g. through a branch merge)
        # and serialized every wgmma of the kernel
        assert "C7514" not in report and "serialized" not in report, report
        # Clusters of the paired swiglu_quant tile spill 8 bytes (a stack slot; LONG_CLUSTER's
        # (1, 2) still ran 14-16% faster than one CTA at K = 7168), and the 128 x 256 bf16 tile
        # with epi_overlap 4 bytes (one stack slot: the public ops' kernel, measured fastest in
        # spite of it, bench/results/fp8_H100_ab_wide.txt); the rest spill nothing.
        spilled = int(re.search(r"(\d+) bytes spill stores", report)[1])
        if config.wide and epilogue == "bf16" and config.epi_overlap:
            assert spilled <= 4, report
        elif config.cluster_size == 1 or (
            epilogue, config.cluster_m, config.cluster_n
        ) == ("bf16", 2, 1):
            assert spilled == 0, report


def test_kernel_config_fits_shared_memory():
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    for epilogue in g.EPILOGUES:
        for tile, min_stages in ((None, 4), ((128, 256), 3), ((64, 256), 4)):
            config = g.kernel_config(epilogue, tile=tile)
            stage = g._stage_bytes(config.tile_m, config.tile_n)
            epi = g._epilogue_smem_bytes(epilogue, config.tile_m, config.tile_n)
            assert config.num_stages >= min_stages
            assert config.num_stages * stage + epi + 2048 <= 232448


def test_wide_tile_config_rejects_the_overlapped_promotion_and_bad_stages():
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    config = g.kernel_config("bf16", tile=(128, 256))
    assert config.wide and config.wg_layout == (2, 1) and config.sched_n == 256
    assert not config.overlap and config.epi_overlap and config.sub_tiles == 1
    assert g.kernel_config("swiglu_quant", tile=(128, 256)).num_stages == 4
    with pytest.raises(ValueError, match="promotes serially"):
        g.kernel_config("bf16", overlap=True, tile=(128, 256))
    with pytest.raises(ValueError, match="tile must be"):
        g.kernel_config("bf16", tile=(256, 128))
    with pytest.raises(ValueError, match=r"stages must be in \[2, 3\]"):
        g.kernel_config("bf16", tile=(128, 256), stages=4)
    assert g.kernel_config("bf16", stages=2).num_stages == 2


def test_tile_band_config():
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    assert g.kernel_config("bf16").tile_band == 0
    assert g.kernel_config("bf16", n_major=True).tile_band == 1
    assert g.kernel_config("bf16", band=3).tile_band == 3
    for bad in ({"band": -1}, {"band": 2.0}, {"band": 2, "n_major": True}):
        with pytest.raises(ValueError, match="band must be an int >= 0"):
            g.kernel_config("bf16", **bad)


def test_grid_size_bounds_the_tile_count():
    """grid_size never exceeds the tiles of any segmentation (or the SM count)."""
    from nmoe_kernels.cute import grouped_gemm_fp8 as g

    gen = torch.Generator().manual_seed(torch.seed())
    for cluster, tile in [((1, 1), None), ((1, 2), None), ((2, 1), None), ((2, 2), None),
                          ((2, 1), (128, 256)), ((1, 2), (128, 256))]:
        config = g.kernel_config("bf16", cluster=cluster, tile=tile)
        for _ in range(100):
            num_experts = int(torch.randint(1, 40, (1,), generator=gen))
            counts = torch.randint(0, 400, (num_experts,), generator=gen)
            pad = int(torch.randint(0, 200, (1,), generator=gen))
            num_rows = int(counts.sum()) + pad
            n = config.sched_n * int(torch.randint(1, 5, (1,), generator=gen))
            rows = config.tile_m * config.cluster_m
            tiles = sum((int(c) + rows - 1) // rows for c in [*counts, pad])
            tiles *= -(-(n // config.tile_n) // config.cluster_n)  # cluster tiles along N
            grid = g.grid_size(num_rows, n, num_experts, config, 10**9)
            # every cluster tile gets a cluster when SMs are plenty; whole clusters only
            assert grid >= max(tiles, 1) * config.cluster_size
            assert grid % config.cluster_size == 0
            assert g.grid_size(num_rows, n, num_experts, config, 132) <= 132
            capped = g.grid_size(num_rows, n, num_experts, config, 132, 30)
            assert capped <= 30 * config.cluster_size


def test_fp8_weights_to_nk_is_the_transposed_quantization(torch_seed):
    from nmoe_kernels.grouped_gemm_fp8 import fp8_weights_to_nk

    w_EKN = torch.randn(3, 256, 384) * torch.rand(3, 1, 384)
    wq, ws = ref.quantize_fp8_128x128(w_EKN)
    wq_nk, ws_nk = fp8_weights_to_nk(wq, ws)
    want_q, want_s = ref.quantize_fp8_128x128(w_EKN.transpose(1, 2).contiguous())
    assert torch.equal(wq_nk.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(ws_nk, want_s)
    assert wq_nk.is_contiguous() and ws_nk.is_contiguous()


def test_wrappers_reject_cpu_tensors_with_a_clear_error():
    from nmoe_kernels.grouped_gemm_fp8 import grouped_gemm_fp8_blockscaled

    xq = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    xs = torch.ones(4, 1)
    wq = torch.zeros(1, 128, 128, dtype=torch.float8_e4m3fn)
    ws = torch.ones(1, 1, 1)
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="x_fp8_MK must be a CUDA tensor"):
        grouped_gemm_fp8_blockscaled(xq, xs, wq, ws, offsets)


def test_choose_cluster_multicasts_long_reductions_and_long_segments():
    """The public ops' cluster: one CTA at the shapes where clusters measured slower (short K,
    short segments), `LONG_CLUSTER` at K >= 4096 or >= 2048 rows per expert."""
    from nmoe_kernels import grouped_gemm_fp8 as g
    from nmoe_kernels.cute.grouped_gemm_fp8 import EPILOGUES

    for epilogue in EPILOGUES:
        long = g.LONG_CLUSTER[epilogue]
        assert g.choose_cluster(epilogue, 229376, 768, 256) == (1, 1)  # super
        assert g.choose_cluster(epilogue, 98304, 2048, 64) == (1, 1)  # moonlight W13
        assert g.choose_cluster(epilogue, 65536, 2048, 32) == long  # dsv3-local W2
        assert g.choose_cluster(epilogue, 98304, 1408, 64) == (1, 1)  # moonlight W2
        assert g.choose_cluster(epilogue, 65536, 7168, 32) == long  # dsv3-local W13
        assert g.choose_cluster(epilogue, 32768, 2048, 4) == long  # DeepGEMM's rows, short K
        assert g.choose_cluster(epilogue, 128, 4096, 8) == long  # the K bound is inclusive
        assert g.choose_cluster(epilogue, 2048 * 8 - 1, 4095, 8) == (1, 1)
        assert g.choose_cluster(epilogue, 2048 * 8, 4095, 8) == long
        assert g.choose_cluster(epilogue, 0, 128, 0) == (1, 1)
    assert g.LONG_CLUSTER == {"bf16": (2, 1), "swiglu_quant": (1, 2)}
    with pytest.raises(ValueError, match="epilogue must be one of"):
        g.choose_cluster("fp8", 1, 128, 1)


def test_choose_config_runs_one_cta_on_wide_tiles_where_n_allows():
    """(cluster, tile): one CTA on the 128 x 256 tile for both epilogues when N % 256 == 0;
    otherwise 128 x 128 (None) with `choose_cluster`'s cluster."""
    from nmoe_kernels import grouped_gemm_fp8 as g

    wide = ((1, 1), (128, 256))
    assert g.WIDE_TILE == (128, 256)
    for epilogue in ("bf16", "swiglu_quant"):
        assert g.choose_config(epilogue, 65536, 4096, 7168, 32) == wide  # dsv3 W13
        assert g.choose_config(epilogue, 98304, 2816, 2048, 64) == wide  # moonlight W13
        assert g.choose_config(epilogue, 229376, 768, 768, 256) == wide  # super W13
    assert g.choose_config("bf16", 65536, 7168, 2048, 32) == wide  # dsv3 W2
    assert g.choose_config("bf16", 32768, 4096, 7168, 4) == wide  # DeepGEMM
    assert g.choose_config("bf16", 98304, 2048, 1408, 64) == wide  # moonlight W2
    assert g.choose_config("bf16", 65536, 384, 7168, 32) == ((2, 1), None)  # N % 256 == 128
    assert g.choose_config("bf16", 65536, 384, 2048, 32) == ((2, 1), None)  # 2048 rows/expert
    assert g.choose_config("bf16", 98304, 384, 1408, 64) == ((1, 1), None)  # short
    assert g.choose_config("swiglu_quant", 65536, 384, 7168, 32) == ((1, 2), None)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        g.choose_config("fp8", 1, 256, 128, 1)
