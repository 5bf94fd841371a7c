"""The CuTeDSL BF16 grouped GEMM kernels compile for sm_90a on a machine without a GPU.

Each configuration is compiled (no launch) and its PTX is checked for what the kernel design
promises: WGMMA m64nBNk16 bf16 -> f32 with the operand majorness of the op (transpose flags),
TMA bulk-tensor loads, the producer/consumer register split (setmaxnreg 40 / 232), no local
memory (spills would show as .local), the SwiGLU epilogue's exp only in the SwiGLU kernel, and
the async-proxy fence of the wgrad tail zeroing. About 1 s per compile on one core.
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl")

from nmoe_kernels.cute.grouped_gemm_bf16 import (  # noqa: E402
    GroupedGemmBf16Sm90,
    choose_tile_n,
    compile_kernel,
)

# (op, K, N, weights stored [E, N, K], expected BN, expected (transpose A, transpose B) of wgmma)
CONFIGS = [
    ("fwd", 768, 768, False, 256, (0, 1)),
    ("fwd", 768, 768, True, 256, (0, 0)),  # [E, N, K] weights: K-major B
    ("swiglu", 2048, 2816, False, 256, (0, 1)),
    ("dgrad", 384, 768, False, 192, (0, 0)),  # super W2 dgrad: dx [M, F=384]
    ("dgrad", 1408, 2048, True, 256, (0, 1)),  # moonlight W2 dgrad, [E, N, K] weights (8% pad)
    ("dgrad", 640, 2048, True, 128, (0, 1)),  # BN 128: 256 would pad 640 by 20%
    ("wgrad", 768, 768, False, 256, (1, 1)),
    ("wgrad-f32", 768, 384, False, 192, (1, 1)),  # float32 dw (super's W2 gradient)
]


@pytest.mark.parametrize(("op", "dim_k", "dim_n", "weight_nk", "tile_n", "transpose"), CONFIGS)
def test_kernel_compiles_for_sm90a(op, dim_k, dim_n, weight_nk, tile_n, transpose):
    op, _, out_dtype = op.partition("-")
    out_dtype = out_dtype or "bf16"
    kernel = GroupedGemmBf16Sm90(op, dim_k, dim_n, weight_nk=weight_nk, out_dtype=out_dtype)
    assert kernel.tile_n == tile_n
    compiled = compile_kernel(op, dim_k, dim_n, "sm_90a", keep_ptx=True, weight_nk=weight_nk,
                              out_dtype=out_dtype)
    ptx = compiled.artifacts.PTX
    if os.path.isfile(ptx):  # with CUTE_DSL_DUMP_DIR set, CuTeDSL returns the file's path
        ptx = open(ptx).read()
    assert ".target sm_90a" in ptx
    wgmma = re.findall(
        rf"wgmma\.mma_async\.sync\.aligned\.m64n{tile_n}k16\.f32\.bf16\.bf16 .*?, p, 1,\s*1, "
        r"(\d), (\d);",
        ptx,
    )
    assert wgmma, f"no m64n{tile_n}k16 bf16 WGMMA in the PTX"
    assert {tuple(int(f) for f in flags) for flags in wgmma} == {transpose}
    # 4 k16 blocks per 64-wide k tile, one WGMMA each.
    assert len(wgmma) == 4
    assert "cp.async.bulk.tensor" in ptx and "mbarrier.arrive.expect_tx" in ptx
    assert "setmaxnreg.dec.sync.aligned.u32 \t40" in ptx.replace("u32 40", "u32 \t40")
    assert "setmaxnreg.inc.sync.aligned.u32 \t232" in ptx.replace("u32 232", "u32 \t232")
    assert ".local" not in ptx, "local memory in the kernel (register spill or stack array)"
    assert "multicast::cluster" not in ptx  # one CTA: no cluster
    assert ("ex2.approx" in ptx) == (op == "swiglu")
    assert ("fence.proxy.async.shared::cta" in ptx) == (op == "wgrad")
    # 16-byte global stores in the predicated epilogue; float32 C: no conversion to bf16.
    assert "st.global.v4.b32" in ptx
    assert ("cvt.rn.bf16" in ptx) == (out_dtype == "bf16"), out_dtype


@pytest.mark.parametrize("op,raster", [("wgrad", "m"), ("wgrad", "n"), ("wgrad", "b4"),
                                       ("dgrad", "b8")])
def test_kernels_compile_in_every_tile_order(op, raster):
    compiled = compile_kernel(op, 2048, 7168, "sm_90a", keep_ptx=True, raster=raster,
                              out_dtype="f32" if op == "wgrad" else "bf16")
    ptx = compiled.artifacts.PTX
    if os.path.isfile(ptx):
        ptx = open(ptx).read()
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32", ptx)) == 4
    assert ".local" not in ptx


def test_wgrad_tile_order_rule():
    from nmoe_kernels.grouped_gemm import WGRAD_RASTER_N_BYTES, wgrad_raster

    # dsv3-local's dW2 (K = F 2048 < N = D 7168, 2048 rows per expert: 29 MB of dy per expert)
    assert wgrad_raster(2048, 7168, 65536, 32) == "n"
    assert wgrad_raster(7168, 4096, 65536, 32) == "m"  # its dW13: dw has more rows than columns
    assert wgrad_raster(384, 768, 229376, 256) == "m"  # super's dW2: 1.4 MB of dy per expert
    rows = WGRAD_RASTER_N_BYTES // (2 * 4096)  # exactly at the threshold, one expert
    assert wgrad_raster(1024, 4096, rows, 1) == "n"
    assert wgrad_raster(1024, 4096, rows - 1, 1) == "m"
    assert wgrad_raster(1024, 4096, 0, 0) == "m"  # no rows, no experts


def test_tile_and_stage_choice():
    # BN 256 when it pads N by at most 10% (1408 -> 1536), else the least padding (ties to the
    # wider tile: 384 -> 192, 1152 -> 192 as 256 would pad 11%, 640 -> 128); SwiGLU always 256.
    assert [choose_tile_n(n, "fwd") for n in (768, 384, 1408, 2048, 7168, 2816, 1152, 640,
                                               128, 2432)] == [
        256, 192, 256, 256, 256, 256, 192, 128, 128, 256]
    assert choose_tile_n(384, "swiglu") == 256
    for op, dim_k, dim_n in [("fwd", 768, 768), ("dgrad", 384, 768), ("dgrad", 1408, 2048)]:
        kernel = GroupedGemmBf16Sm90(op, dim_k, dim_n)
        stage_bytes = (128 + kernel.tile_n) * 64 * 2
        assert kernel.num_stages >= 4
        assert kernel.num_stages * stage_bytes + 2 * kernel.epi_wg_elems * 2 < 232448
    with pytest.raises(ValueError, match="multiples of 8"):
        GroupedGemmBf16Sm90("fwd", 770, 768)
    with pytest.raises(ValueError, match="op must be one of"):
        GroupedGemmBf16Sm90("bwd", 768, 768)


def test_band_rows_names_every_tile_order():
    from nmoe_kernels.cute.scheduler import RASTERS, band_rows

    assert [band_rows(r) for r in RASTERS] == [1, 0, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="raster must be one of"):
        band_rows("b3")


@pytest.mark.parametrize("op,cluster", [("fwd", (2, 1)), ("swiglu", (1, 2)), ("dgrad", (2, 2)),
                                        ("wgrad", (2, 1))])
def test_clustered_kernels_compile_with_multicast(op, cluster):
    """Clusters load each shared operand tile once per cluster and TMA-multicast it; the
    one-CTA kernel issues no multicast. Same WGMMA count, no spills."""
    compiled = compile_kernel(op, 2048, 2816, "sm_90a", keep_ptx=True, cluster=cluster)
    ptx = compiled.artifacts.PTX
    if os.path.isfile(ptx):
        ptx = open(ptx).read()
    loads = set(re.findall(r"cp\.async\.bulk\.tensor\.(\d)d\.[\w:.]*", ptx))
    mcast = {m for m in re.findall(r"cp\.async\.bulk\.tensor\.(\d)d[\w:.]*multicast::cluster",
                                   ptx)}
    # A (x or dy, 2-D) is multicast along N, B (the 3-D weights; 2-D dy for wgrad) along M
    b_dims = "2" if op == "wgrad" else "3"
    want = ({b_dims} if cluster[0] > 1 else set()) | ({"2"} if cluster[1] > 1 else set())
    assert mcast == want, (loads, mcast)
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32", ptx)) == 4
    assert ".local" not in ptx
    # stage releases reach the partner CTAs' empty barriers
    assert "mbarrier.arrive.shared::cluster" in ptx


def test_cluster_shape_is_checked():
    kernel = GroupedGemmBf16Sm90("fwd", 2048, 2816, cluster=(1, 2))
    # 11 column tiles of 256 -> 6 cluster tiles along N (the last CTA tile is a spare)
    assert (kernel.num_n_tiles, kernel.num_n_groups, kernel.cluster_size) == (11, 6, 2)
    wgrad = GroupedGemmBf16Sm90("wgrad", 1408, 2048, cluster=(2, 1))
    assert (wgrad.num_m_tiles, wgrad.num_m_groups) == (11, 6)
    for bad in [(4, 1), (1, 3), (0, 1), (2,)]:
        with pytest.raises(ValueError, match="cluster must be"):
            GroupedGemmBf16Sm90("fwd", 768, 768, cluster=bad)


def test_cluster_rule():
    from nmoe_kernels.grouped_gemm import CLUSTER_MIN_ROWS_PER_EXPERT, choose_cluster

    # (tokens x top-k rows, E) of the bench shapes: super 896 rows per expert, moonlight 1536,
    # dsv3-local 2048
    sup, moon, dsv3 = (229376, 256), (98304, 64), (65536, 32)
    # wgrad with >= 1024 rows per expert and an even number of dw row blocks: pairs
    assert choose_cluster("wgrad", 7168, 4096, *dsv3) == (2, 1)
    assert choose_cluster("wgrad", 2048, 7168, *dsv3) == (2, 1)
    assert choose_cluster("wgrad", 2048, 2816, *moon) == (2, 1)
    assert choose_cluster("wgrad", 1408, 2048, *moon) == (1, 1)  # 11 row blocks
    assert choose_cluster("wgrad", 768, 768, *sup) == (1, 1)  # short K loops
    rows = CLUSTER_MIN_ROWS_PER_EXPERT * 8
    assert choose_cluster("wgrad", 2048, 2048, rows, 8) == (2, 1)
    assert choose_cluster("wgrad", 2048, 2048, rows - 1, 8) == (1, 1)
    assert choose_cluster("wgrad", 2048, 2048, 0, 0) == (1, 1)
    # grouped-M ops: one CTA
    for op in ("fwd", "swiglu", "dgrad"):
        for shape in (sup, moon, dsv3):
            assert choose_cluster(op, 7168, 4096, *shape) == (1, 1)


def test_wgrad_tile_rule_and_compile_kernel_takes_the_tile():
    """wgrad runs BN 192 where 192 divides dw's N and the experts average < 1024 rows (super's
    wgrads), else the kernel's own `choose_tile_n`; `compile_kernel(tile_n=...)` builds it."""
    from nmoe_kernels.grouped_gemm import WGRAD_SHORT_MAX_ROWS_PER_EXPERT, wgrad_tile_n

    sup, moon, dsv3 = (229376, 256), (98304, 64), (65536, 32)
    assert wgrad_tile_n(768, *sup) == 192  # super wgrad W2 (dw 384 x 768) and W13 (768 x 768)
    assert wgrad_tile_n(384, *sup) == 192
    assert wgrad_tile_n(1000, *sup) is None  # 192 does not divide N
    for n in (2048, 2816, 7168, 4096, 768):
        assert wgrad_tile_n(n, *moon) is None and wgrad_tile_n(n, *dsv3) is None
    rows = WGRAD_SHORT_MAX_ROWS_PER_EXPERT * 8
    assert wgrad_tile_n(768, rows - 1, 8) == 192
    assert wgrad_tile_n(768, rows, 8) is None
    assert wgrad_tile_n(768, 0, 0) == 192
    compiled = compile_kernel("wgrad", 768, 768, "sm_90a", keep_ptx=True, tile_n=192)
    ptx = compiled.artifacts.PTX
    if os.path.isfile(ptx):
        ptx = open(ptx).read()
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n192k16\.f32\.bf16\.bf16", ptx)
    assert "m64n256k16" not in ptx
